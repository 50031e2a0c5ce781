"""The train step compiles for real TPU topologies from this CPU host (XLA:TPU and Mosaic).

Marker `tpu_compile`: needs libtpu (the `tpu` extra), which the default install leaves out;
.ci/run installs it for a step of its own and runs `pytest -m tpu_compile` in one process.
Without libtpu the tests skip with the reason.
"""

import re

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from configs import depo as depo_configs
from configs import rule110 as rule110_configs
from sleep_jax.ops import gated_delta_rule
from sleep_jax.parallel import topology as topology_lib
from sleep_jax.train import aot

libtpu = pytest.importorskip("libtpu", reason="needs libtpu: python -m pip install -e '.[tpu]'")
pytestmark = pytest.mark.tpu_compile


def check(result, *, devices, processes):
  assert result["num_devices"] == devices and result["num_processes"] == processes
  # Forward and backward kernels of both gated-delta layers (scan bodies hold one call each).
  assert result["mosaic_kernels"] >= 4 and result["eval_mosaic_kernels"] >= 2
  assert 0 < result["peak_memory_bytes_per_device"] <= result["hbm_bytes_per_device"]
  assert result["fits"] and result["flops_per_step"] > 0


@pytest.mark.parametrize(
  "topology, num_slices, devices, processes",
  [
    ("v5e:2x2", 1, 4, 1),
    ("v5e:4x4", 1, 16, 4),  # four hosts
    ("v5e:2x2", 2, 8, 2),  # two slices over DCN
  ],
)
def test_tiny_config_compiles_with_mosaic_kernels(topology, num_slices, devices, processes):
  config = rule110_configs.get_config("tiny")
  batch = 8 * max(devices, processes)  # whole data blocks per process, whole rows per device
  config.train.batch_size = config.eval.batch_size = batch
  config.eval.num_examples = config.eval.num_slice_examples = batch
  check(
    aot.compile_for_topology(config, topology, num_slices=num_slices),
    devices=devices,
    processes=processes,
  )


def test_paper_rule110_compiles_for_a_v5e_slice_and_fits():
  result = aot.compile_for_topology(rule110_configs.get_config("paper"), "v5e-8")
  check(result, devices=8, processes=2)
  assert result["batch_size"] == 512


def test_a_step_larger_than_hbm_is_a_does_not_fit_row_and_bounds_the_largest_batch():
  config = rule110_configs.get_config("tiny")
  config.train.batch_size = 4 * 2**16  # 64k examples per chip of a v5e:2x2 (16 GiB each)
  result = aot.compile_for_topology(config, "v5e:2x2")
  assert not result["fits"] and "RESOURCE_EXHAUSTED" in result["error"]
  assert result["peak_memory_bytes_per_device"] > result["hbm_bytes_per_device"] > 15 * 2**30
  assert result["mosaic_kernels"] is None and "| NO |" in aot.format_table([result])
  # Doubling from a batch that fits stops at the first that does not, instead of failing.
  largest = aot.largest_fitting_batch(
    config, "v5e:2x2", start_per_device=2**13, limit_per_device=2**16
  )  # (64k per chip needs ~59 GiB of temporaries: about 0.9 MiB per example)
  assert largest["per_device_batch"] in (2**13, 2**14)
  assert largest["peak_memory_bytes_per_device"] <= 16 * 2**30


def test_fsdp_and_tensor_parallel_meshes_compile_on_tpu():
  config = depo_configs.get_config("tiny")
  config.parallel.mesh.update(data=1, fsdp=2, tensor=2)
  result = aot.compile_for_topology(config, "v5e:2x2")
  assert result["mesh"] == {"data": 1, "fsdp": 2, "tensor": 2}
  check(result, devices=4, processes=1)


def test_sharded_op_compiles_to_per_shard_mosaic_kernels_without_gathers():
  devices = topology_lib.tpu_devices("v5e:2x2")
  mesh = jax.make_mesh(
    (2, 2), ("data", "tensor"), devices=devices, axis_types=(jax.sharding.AxisType.Auto,) * 2
  )
  b, t, h, d = 4, 256, 4, 128
  x4, x3 = P("data", None, "tensor", None), P("data", None, "tensor")
  specs = (x4, x4, x4, x3, x3, P("data", "tensor", None, None))
  shapes = (
    [jax.ShapeDtypeStruct((b, t, h, d), jnp.bfloat16)] * 3
    + [jax.ShapeDtypeStruct((b, t, h), jnp.float32)] * 2
    + [jax.ShapeDtypeStruct((b, h, d, d), jnp.float32)]
  )

  def loss(*args):
    o, state = gated_delta_rule(*args[:5], initial_state=args[5])  # impl="auto"
    return o.astype(jnp.float32).sum() + state.sum()

  with jax.set_mesh(mesh):
    grads = jax.jit(
      jax.grad(loss, argnums=range(6)), in_shardings=tuple(NamedSharding(mesh, s) for s in specs)
    )
    hlo = grads.lower(*shapes).compile().as_text()
  assert len(re.findall(r'custom_call_target="tpu_custom_call"', hlo)) == 2  # forward, backward
  for collective in ("all-gather", "all-to-all", "collective-permute"):
    assert collective not in hlo, collective
