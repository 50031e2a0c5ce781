"""Meshes from config, TPU topology names, multi-process start-up and per-process data."""

import sys

import jax
import numpy as np
import pytest

from configs import rule110 as rule110_configs
from sleep_jax.data import tasks
from sleep_jax.ops import partition
from sleep_jax.parallel import distributed, topology
from sleep_jax.parallel import mesh as mesh_lib
from sleep_jax.parallel.config import DEFAULT_RULES
from sleep_jax.train import program as program_lib


@pytest.mark.parametrize(
  "sizes, devices, expected",
  [
    (dict(data=-1), 8, (8, 1, 1)),
    (dict(data=-1, tensor=2), 8, (4, 1, 2)),
    (dict(data=2, fsdp=-1, tensor=2), 8, (2, 2, 2)),
    (dict(data=1, fsdp=8, tensor=1), 8, (1, 8, 1)),
  ],
)
def test_mesh_shape_fills_in_the_rest(sizes, devices, expected):
  assert mesh_lib.mesh_shape(sizes, devices) == expected


@pytest.mark.parametrize(
  "sizes, message",
  [
    (dict(data=3), "multiplies to 3, but there are 8 devices"),
    (dict(data=-1, fsdp=-1), "at most one is -1"),
    (dict(data=-1, tensor=3), "not a multiple of the fixed sizes' product 3"),
    (dict(model=2), "unknown axes"),
  ],
)
def test_bad_mesh_sizes_name_the_fix(sizes, message):
  with pytest.raises(ValueError, match=message):
    mesh_lib.mesh_shape(sizes, 8)


def test_make_mesh_covers_every_device_with_the_three_axes():
  mesh = mesh_lib.make_mesh({"mesh": dict(data=2, fsdp=2, tensor=2)})
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert mesh_lib.batch_shards(mesh) == 4
  assert mesh_lib.batch_sharding(mesh).shard_shape((16, 100)) == (4, 100)


@pytest.mark.parametrize(
  "name, jax_name, megacore",
  [
    ("v5e-8", "v5e:2x4", False),
    ("v5e-16", "v5e:4x4", False),
    ("v6e-8", "v6e:2x4", False),
    ("v5p-8", "v5:2x2x1", True),
    ("v5p-32", "v5:2x2x4", True),
    ("v5p-128", "v5:4x4x4", True),
    ("v4-8", "v4:2x2x1", True),
    ("v5e:4x4", "v5e:4x4", False),
    ("v5:2x2x4", "v5:2x2x4", True),
  ],
)
def test_cloud_tpu_names_map_to_jax_topologies(name, jax_name, megacore):
  resolved = topology.resolve(name)
  assert resolved.jax_name == jax_name
  assert (resolved.chip_config_name == "megacore") == megacore


@pytest.mark.parametrize(
  "name, message",
  [
    ("v9-8", "unknown TPU topology"),
    ("v5e-12", "power-of-two"),
    ("v5p-7", "2 per chip"),
    ("v4-2", "at least 4 chips"),
  ],
)
def test_unknown_topologies_are_clear_errors(name, message):
  with pytest.raises(ValueError, match=message):
    topology.resolve(name)


def test_missing_libtpu_names_the_tpu_extra(monkeypatch):
  monkeypatch.setitem(sys.modules, "libtpu", None)  # import libtpu -> ImportError
  with pytest.raises(RuntimeError, match=r'pip install -e "\.\[tpu\]"'):
    topology.tpu_devices("v5e-8")


def test_single_process_needs_no_initialisation():
  assert distributed.initialize(environ={}) is False


@pytest.mark.parametrize(
  "environ, message",
  [
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234"}, r"missing \['num_processes', 'process_id'\]"),
    (
      {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"},
      r"process_id=2 is not in \[0, 2\)",
    ),
  ],
)
def test_partial_multi_process_descriptions_are_clear_errors(environ, message):
  with pytest.raises(ValueError, match=message):
    distributed.initialize(environ=environ)


def test_flags_take_precedence_over_the_environment():
  group = distributed.ProcessGroup(num_processes=1, process_id=0, coordinator_address="a:1")
  environ = {"JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3", "JAX_COORDINATOR_ADDRESS": "b:2"}
  assert distributed.initialize(group, environ=environ) is False  # one process: nothing to join


def test_each_process_makes_only_its_rows_and_together_they_make_the_batch():
  task = tasks.get_task(rule110_configs.get_config("tiny").task)
  whole = next(iter(tasks.train_dataset(task, seed=3, batch_size=32)))
  # Four processes, each making its own 8 rows of every batch, from its own blocks.
  parts = [
    next(iter(tasks.train_dataset(task, seed=3, batch_size=32, rows=slice(8 * p, 8 * p + 8))))
    for p in range(4)
  ]
  for name, value in whole.items():
    np.testing.assert_array_equal(np.concatenate([part[name] for part in parts]), value)
  with pytest.raises(ValueError, match="blocks of 8"):
    tasks.train_dataset(task, seed=3, batch_size=32, rows=slice(0, 12))


def test_process_rows_of_a_single_process_are_the_whole_batch():
  mesh = mesh_lib.make_mesh({"mesh": dict(data=4, tensor=2)})
  assert mesh_lib.process_batch_rows(mesh_lib.batch_sharding(mesh), 16) == slice(0, 16)
  assert jax.process_count() == 1


def test_a_batch_that_processes_cannot_share_in_whole_blocks_is_refused():
  from sleep_jax.train import program

  config = rule110_configs.get_config("tiny")  # batch 16
  program.validate(config, num_devices=8, num_processes=2)  # 8 rows each: fine
  with pytest.raises(ValueError, match="each of the 4 processes .* multiple of 32"):
    program.validate(config, num_devices=8, num_processes=4)


def test_aot_cli_rejects_an_unknown_topology_before_compiling():
  import os
  import subprocess

  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  out = subprocess.run(
    [sys.executable, "launch/aot.py", "--config=configs/rule110.py:tiny", "--topology=v5e-12"],
    capture_output=True,
    text=True,
    cwd=repo,
    timeout=120,
  )
  assert out.returncode != 0 and "power-of-two number of chips" in out.stderr


@pytest.mark.parametrize("heads_rule, head_axes", [("tensor", ("tensor",)), (None, ())])
def test_the_steps_run_the_fused_ops_split_as_the_rules_split_the_heads(
  monkeypatch, heads_rule, head_axes
):
  # The rules, not the ops' mesh convention, say where the heads are: with heads replicated
  # (mapped to None) the kernels must not split them over "tensor" (outputs would be gathered).
  splits = []
  real = partition.batch_and_head_axes
  monkeypatch.setattr(
    partition, "batch_and_head_axes", lambda x, **axes: splits.append(real(x, **axes)) or splits[-1]
  )
  config = rule110_configs.get_config("tiny")
  config.parallel.mesh = {"data": 2, "fsdp": 1, "tensor": 2}
  config.parallel.rules = tuple(
    (name, heads_rule if name in ("heads", "gate_heads") else target)
    for name, target in DEFAULT_RULES
  )
  built = program_lib.build_program(config, jax.devices()[:4])
  built.train_step.lower(built.abstract_state, built.abstract_batch(config.train.batch_size))
  assert splits and set(splits) == {(("data",), head_axes)}
  assert mesh_lib.op_split(config.parallel.rules)["head_axes"] == head_axes
