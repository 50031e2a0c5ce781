"""NVIDIA GPU topologies by name, as compile-only devices on a host without a GPU.

With the CUDA plugin of the installed jax (`jax-cuda12-plugin`) and ptxas
(`nvidia-cuda-nvcc-cu12`), `jax.experimental.topologies.get_topology_desc(platform="cuda", ...)`
gives devices of any H100/H200 job, and jitted functions lowered over them compile with the
real XLA:GPU pipeline on this host: fusion, SPMD partitioning and collectives, Pallas' Triton
lowering, Triton to PTX, ptxas to a cubin for sm_90a. That catches what a compiler can:
shared memory over the limit, Pallas lowering rules, ptxas errors, and (in ptxas' own report,
`sleep_jax.parallel.compiled.ptxas_report`) register spills. It cannot time, autotune or run
anything, and XLA:GPU does not refuse a program larger than the GPU's memory: compare the peak
with `device_memory_bytes` (../shared/GPU_AOT.md has the whole list).

Names (case-insensitive):
  h100, h200          one GPU
  h100-8, h200-8      one host with 8 GPUs
  h100-2x8            2 hosts (processes) with 8 GPUs each
  h100:1x2x4          jax's own "slices x hosts x GPUs per host" after a GPU name; a bare
                      "1x2x4" means H100s

Each GPU is described by XLA's own target config (a text GpuTargetConfigProto) in
gpu_targets/, with its source.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import re
import shutil

TARGETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_targets")
# GPU name -> its target config file in gpu_targets/.
GPU_TARGETS = {"h100": "h100_sxm.txtpb", "h200": "h200.txtpb"}
DEFAULT_GPU = "h100"  # what a bare "slices x hosts x GPUs" string compiles for
PLUGIN_PACKAGE = "jax-cuda12-plugin"
PTXAS_PACKAGE = "nvidia-cuda-nvcc-cu12"
ACCEPTED = (
  "GPU topologies: h100, h200 (one GPU), h100-8 (one host of 8), h100-2x8 (hosts x GPUs), or "
  "jax's slices x hosts x GPUs after a GPU name, e.g. h100:1x2x4"
)


@dataclasses.dataclass(frozen=True)
class GpuTopology:
  name: str  # as the user wrote it
  gpu: str  # a key of GPU_TARGETS
  jax_name: str  # "slices x hosts x GPUs per host", as get_topology_desc takes it

  @property
  def num_devices(self) -> int:
    slices, hosts, gpus = (int(x) for x in self.jax_name.split("x"))
    return slices * hosts * gpus


def is_gpu_topology(name: str) -> bool:
  """Whether `name` names a GPU topology (as opposed to a TPU slice)."""
  lowered = name.lower()
  return bool(re.fullmatch(r"\d+x\d+x\d+", lowered)) or lowered.split(":")[0].split("-")[0] in (
    GPU_TARGETS
  )


def resolve(name: str) -> GpuTopology:
  """A GPU topology name -> the GPU and jax's "slices x hosts x GPUs" string.

  Raises:
    ValueError: an unknown GPU or a malformed count, naming the accepted forms.
  """
  lowered = name.lower()
  bare = re.fullmatch(r"(\d+)x(\d+)x(\d+)", lowered)
  if bare:
    gpu, grid = DEFAULT_GPU, bare.groups()
  else:
    match = re.fullmatch(r"([a-z]\w*)(?:-(?:(\d+)x)?(\d+)|:(\d+)x(\d+)x(\d+))?", lowered)
    if not match or match.group(1) not in GPU_TARGETS:
      raise ValueError(
        f"unknown GPU topology {name!r}; known GPUs {sorted(GPU_TARGETS)}. {ACCEPTED}"
      )
    gpu, hosts, per_host, *jax_grid = match.groups()
    grid = jax_grid if jax_grid[0] else ("1", hosts or "1", per_host or "1")
  if any(int(x) < 1 for x in grid):
    raise ValueError(f"GPU topology {name!r}: every count must be at least 1. {ACCEPTED}")
  return GpuTopology(name, gpu, "x".join(str(int(x)) for x in grid))


@functools.cache
def target_config(gpu: str) -> str:
  """The text GpuTargetConfigProto of a GPU of GPU_TARGETS."""
  with open(os.path.join(TARGETS_DIR, GPU_TARGETS[gpu])) as f:
    return f.read()


def _config_field(text: str, field: str) -> str:
  match = re.search(rf"^\s*{field}: (.+)$", text, re.MULTILINE)
  if match is None:
    raise ValueError(f"no {field} in the target config")
  return match.group(1).strip().strip('"')


def device_memory_bytes(device) -> int:
  """Memory of one GPU, from the target config whose device description is its kind."""
  for gpu in GPU_TARGETS:
    text = target_config(gpu)
    if _config_field(text, "device_description_str") == device.device_kind:
      return int(_config_field(text, "device_memory_size"))
  raise ValueError(f"no target config describes a {device.device_kind!r}")


def _find_module(name: str):
  """`importlib.util.find_spec`, None also where a parent package is missing (it raises there)."""
  try:
    return importlib.util.find_spec(name)
  except ModuleNotFoundError:
    return None


def ptxas_path() -> str | None:
  """The ptxas XLA uses: the `nvidia-cuda-nvcc-cu12` package's, else one on the PATH."""
  spec = _find_module("nvidia.cuda_nvcc")
  for folder in [] if spec is None else list(spec.submodule_search_locations or []):
    candidate = os.path.join(folder, "bin", "ptxas")
    if os.access(candidate, os.X_OK):
      return candidate
  return shutil.which("ptxas")


def missing_toolchain() -> str | None:
  """What to install before compiling for a GPU on this host, or None when nothing is missing."""
  import jax

  if _find_module("jax_plugins.xla_cuda12") is None:
    return (
      "compiling for a GPU topology needs the CUDA plugin of this jax and ptxas: python -m pip "
      f'install "{PLUGIN_PACKAGE}=={jax.__version__}" {PTXAS_PACKAGE}  (make install-gpu-compile)'
    )
  if ptxas_path() is None:
    return (
      "compiling for a GPU topology needs ptxas (Triton and XLA emit PTX): python -m pip "
      f"install {PTXAS_PACKAGE}"
    )
  return None


def gpu_devices(name: str) -> list:
  """The compile-only devices of GPU topology `name`.

  Raises:
    ValueError: unknown topology.
    RuntimeError: the CUDA plugin or ptxas is missing (the message names the package).
  """
  topology = resolve(name)
  missing = missing_toolchain()
  if missing:
    raise RuntimeError(missing)
  from jax.experimental import topologies

  try:
    description = topologies.get_topology_desc(
      platform="cuda", target_config=target_config(topology.gpu), topology=topology.jax_name
    )
  except NotImplementedError as error:
    # On a host without a GPU the plugin checks the CUDA install as it registers, and fails,
    # unless JAX_PLATFORMS leaves CUDA out; then it offers no topology.
    raise RuntimeError(
      "the CUDA plugin did not register: on a host without a GPU, run with JAX_PLATFORMS=cpu "
      "set before jax starts (launch/aot.py and the bench scripts set it)"
    ) from error
  return list(description.devices)


def compiler_options() -> dict:
  """Per-compile XLA options a deviceless GPU compile needs on the installed jaxlib.

  jaxlib 0.10's XLA:GPU, with no autotuner to pick tiles, fails on some matmul fusions ("Couldn't
  find output tile sizes that satisfy hlo: ... dot"); its cuBLAS path compiles them. 0.11
  compiles them as they are.
  """
  import jaxlib

  if jaxlib.__version__.startswith("0.10."):
    return {"xla_gpu_enable_triton_gemm": False}
  return {}
