"""GPU topology names, their target configs and the errors a host without the toolchain gets.

Nothing here compiles for a GPU (tests/gpu_compile does, with the CUDA plugin and ptxas).
"""

import sys

import pytest

from sleep_jax.parallel import gpu_topology
from sleep_jax.train import aot


@pytest.mark.parametrize(
  "name, gpu, jax_name, devices",
  [
    ("h100", "h100", "1x1x1", 1),
    ("H200-8", "h200", "1x1x8", 8),
    ("h100-2x8", "h100", "1x2x8", 16),
    ("h200:2x1x4", "h200", "2x1x4", 8),
    ("1x2x4", "h100", "1x2x4", 8),  # jax's own string alone: H100s
  ],
)
def test_names_resolve_to_a_gpu_and_jax_topology(name, gpu, jax_name, devices):
  assert gpu_topology.is_gpu_topology(name)
  resolved = gpu_topology.resolve(name)
  assert (resolved.gpu, resolved.jax_name, resolved.num_devices) == (gpu, jax_name, devices)


@pytest.mark.parametrize("name", ["v5e-8", "v5p-32", "v5e:4x4", "v4-8"])
def test_tpu_names_are_not_gpu_topologies(name):
  assert not gpu_topology.is_gpu_topology(name)


@pytest.mark.parametrize("name", ["a100-8", "h100-0", "h100-8x", "h100:1x2", "b200"])
def test_an_unknown_gpu_topology_names_the_accepted_forms(name):
  with pytest.raises(ValueError, match=r"h100-2x8 \(hosts x GPUs\)"):
    if gpu_topology.is_gpu_topology(name):
      gpu_topology.resolve(name)
    else:  # what launch/aot.py does with a name that is neither
      aot.topology_devices(name)


def test_a_gpu_topology_takes_no_tpu_slices():
  with pytest.raises(ValueError, match="num_slices=2 is for TPU slices"):
    aot.topology_devices("h100-8", num_slices=2)


class _Device:
  def __init__(self, kind):
    self.device_kind = kind


def test_device_memory_comes_from_the_target_config():
  h100 = gpu_topology.device_memory_bytes(_Device("NVIDIA H100 80GB HBM3"))
  h200 = gpu_topology.device_memory_bytes(_Device("NVIDIA H200 141GB HBM3e"))
  assert (h100, h200) == (84_942_979_072, 151_397_597_184)
  with pytest.raises(ValueError, match="no target config"):
    gpu_topology.device_memory_bytes(_Device("NVIDIA A100"))


@pytest.mark.parametrize("gpu", sorted(gpu_topology.GPU_TARGETS))
def test_target_configs_describe_hopper_with_its_shared_memory_limit(gpu):
  text = gpu_topology.target_config(gpu)
  assert "shared_memory_per_block_optin: 232448" in text and "major: 9" in text
  assert "collective_memory_granularity" not in text.split("sleep_jax compiles")[1]


def _uninstalled(monkeypatch, package, module):
  """Make `package.module` unimportable as on a host without it: its parent is not found."""
  monkeypatch.setitem(sys.modules, package, None)
  monkeypatch.delitem(sys.modules, f"{package}.{module}", raising=False)


def test_a_missing_plugin_names_the_package_to_install(monkeypatch):
  _uninstalled(monkeypatch, "jax_plugins", "xla_cuda12")
  with pytest.raises(RuntimeError, match=r"pip install \"jax-cuda12-plugin==\d"):
    gpu_topology.gpu_devices("h100-8")


def test_a_missing_ptxas_names_the_package_to_install(monkeypatch):
  find = gpu_topology._find_module
  plugin = lambda name: object() if name == "jax_plugins.xla_cuda12" else find(name)
  monkeypatch.setattr(gpu_topology, "_find_module", plugin)
  _uninstalled(monkeypatch, "nvidia", "cuda_nvcc")
  monkeypatch.setattr(gpu_topology.shutil, "which", lambda name: None)
  assert gpu_topology.ptxas_path() is None
  with pytest.raises(RuntimeError, match="pip install nvidia-cuda-nvcc-cu12"):
    gpu_topology.gpu_devices("h100")
