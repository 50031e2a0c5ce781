"""The device mesh and the logical-axis rules that turn parameter annotations into shardings.

The mesh has three named axes (`config.parallel.mesh`): `data` (data parallelism: each device
a different slice of the batch, parameters replicated), `fsdp` (the batch is split over it too,
and so are the parameters and the optimizer state that mirrors them, gathered layer by layer
when used), and `tensor` (attention and gated-delta heads and the MLP width are split over it).
Sizes multiply to the device count; one size may be -1 (the rest). Across TPU slices the
`data` axis spans the slices (DCN) and the others stay within a slice (ICI).

Every parameter carries `logical_axes` metadata (e.g. ("embed", "mlp")); `config.parallel.rules`
maps each logical axis to mesh axes or None (replicated). The batch goes over data x fsdp.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from sleep_jax.ops.partition import PROJECT_AXES, TENSOR_AXIS, as_axes  # the ops' convention
from sleep_jax.parallel.config import MESH_AXES, ParallelConfig

assert MESH_AXES == PROJECT_AXES and MESH_AXES[-1] == TENSOR_AXIS  # the ops know these names
BATCH_AXES = ("data", "fsdp")  # the batch is split over both; fsdp also splits parameters


def mesh_shape(mesh_sizes: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
  """The sizes of (data, fsdp, tensor) for `num_devices`, with a -1 size filled in.

  Raises:
    ValueError: unknown axis names, more than one -1, or sizes that do not multiply to the
      device count; the message names the fix.
  """
  unknown = sorted(set(mesh_sizes) - set(MESH_AXES))
  if unknown:
    raise ValueError(f"parallel.mesh has unknown axes {unknown}; the axes are {MESH_AXES}")
  sizes = [int(mesh_sizes.get(axis, 1)) for axis in MESH_AXES]
  described = ", ".join(f"{a}={s}" for a, s in zip(MESH_AXES, sizes))
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"parallel.mesh ({described}): sizes are positive, and at most one is -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(
        f"parallel.mesh ({described}): {num_devices} devices are not a multiple "
        f"of the fixed sizes' product {known}"
      )
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(
      f"parallel.mesh ({described}) multiplies to {math.prod(sizes)}, but there "
      f"are {num_devices} devices; make the sizes multiply to {num_devices} "
      "(or set one of them to -1)"
    )
  return tuple(sizes)


def make_mesh(
  parallel_config: ParallelConfig | Mapping[str, Any], devices: Sequence[Any] | None = None
) -> Mesh:
  """The (data, fsdp, tensor) mesh over `devices` (default: every device of every process).

  Devices of several TPU slices get a hybrid mesh: `data` is split across slices first (the
  slow DCN link carries only the gradient reduction), fsdp and tensor stay inside a slice.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(ParallelConfig.from_config(parallel_config).mesh, len(devices))
  num_slices = len({getattr(d, "slice_index", 0) for d in devices})
  if num_slices > 1:
    if shape[0] % num_slices:
      raise ValueError(
        f"parallel.mesh.data={shape[0]} must be a multiple of the {num_slices} "
        "slices: the data axis spans slices"
      )
    ici = (shape[0] // num_slices, *shape[1:])
    grid = mesh_utils.create_hybrid_device_mesh(ici, (num_slices, 1, 1), devices)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * 3)
  # Auto axes: shardings are given to jit and propagated by XLA (the classic pjit model).
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def batch_shards(mesh: Mesh) -> int:
  """How many slices the batch is cut into (data x fsdp)."""
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Examples split over data x fsdp; the sequence axis is whole on every device."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def op_split(rules: Iterable[tuple[str, Any]]) -> dict[str, tuple[str, ...]]:
  """How the fused ops split their inputs under these rules (`ops.partition.split_axes`
  keywords): the batch over data x fsdp, the heads as the "heads" rule splits the projections
  that make them (so a rule other than the default moves the kernels' split with it)."""
  heads = dict((name, target) for name, target in rules).get("heads")
  return {"batch_axes": BATCH_AXES, "head_axes": as_axes(heads)}


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def logical_to_spec(
  logical_axes: Iterable[str | None], rules: Iterable[tuple[str, Any]]
) -> PartitionSpec:
  """PartitionSpec of an array whose dimensions carry these logical names."""
  table = {name: (tuple(target) if isinstance(target, list) else target) for name, target in rules}
  unknown = [a for a in logical_axes if a is not None and a not in table]
  if unknown:
    raise ValueError(f"logical axes {unknown} have no entry in parallel.rules {sorted(table)}")
  return PartitionSpec(*(None if a is None else table[a] for a in logical_axes))


def param_shardings(abstract_state: nnx.State, mesh: Mesh, rules) -> Any:
  """NamedShardings for a model's parameters, as a nested dict like `nnx.to_pure_dict`.

  Raises:
    ValueError: a rule names an axis the mesh lacks, or a parameter dimension is not divisible
      by the mesh axes it is split over (naming the parameter, its shape and the fix).
  """

  def sharding(path, variable):
    spec = logical_to_spec(variable.get_metadata()["logical_axes"], rules)
    for dim, (size, entry) in enumerate(zip(variable.shape, spec)):
      axes = as_axes(entry)
      missing = [a for a in axes if a not in mesh.shape]
      if missing:
        raise ValueError(f"parallel.rules maps to mesh axes {missing}, not in {MESH_AXES}")
      parts = math.prod(mesh.shape[a] for a in axes)
      if size % parts:
        name = "/".join(str(k) for k in _path_keys(path))
        raise ValueError(
          f"parameter {name} {tuple(variable.shape)}: dimension {dim} ({size}) is split over "
          f"mesh axes {axes} of total size {parts}, which does not divide it. Change "
          "parallel.mesh, or map that logical axis to None in parallel.rules."
        )
    return NamedSharding(mesh, spec)

  specs = jax.tree_util.tree_map_with_path(
    sharding, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable)
  )
  return nnx.to_pure_dict(specs)


def process_batch_rows(sharding: NamedSharding, batch_size: int) -> slice:
  """The rows of a global [batch, ...] array that this process's devices hold, as one slice.

  Every process feeds only these rows (`jax.make_array_from_process_local_data`).
  """
  shape = (batch_size, 1)
  rows = {
    index[0].indices(batch_size)[:2]
    for index in sharding.addressable_devices_indices_map(shape).values()
  }
  starts = sorted(rows)
  start, stop = starts[0][0], max(stop for _, stop in starts)
  covered = sum(b - a for a, b in starts)
  if covered != stop - start:
    raise ValueError(
      f"this process's devices hold non-contiguous rows {starts} of the batch; "
      "order the mesh so each process holds one block of the data axes"
    )
  return slice(start, stop)


def to_global_batch(
  local_batch: Mapping[str, np.ndarray], sharding: NamedSharding, batch_size: int
) -> dict[str, jax.Array]:
  """Global arrays from this process's rows (from `process_batch_rows`) of every field."""
  return {
    name: jax.make_array_from_process_local_data(sharding, rows, (batch_size, *rows.shape[1:]))
    for name, rows in local_batch.items()
  }


def _path_keys(path) -> tuple:
  return tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path)


def shardings_by_param_path(tree: Any, param_shardings: Any, *, default: NamedSharding) -> Any:
  """Shardings for a tree (e.g. optimizer state) whose leaves mirror parameters.

  A leaf whose key path ends with a parameter's key path (optax's moments nest the params'
  dict inside their own state) gets that parameter's sharding; any other leaf (step counters)
  gets `default`.
  """
  by_path = {
    _path_keys(path): sharding
    for path, sharding in jax.tree_util.tree_flatten_with_path(param_shardings)[0]
  }

  def pick(path, _):
    keys = _path_keys(path)
    for start in range(len(keys)):
      if keys[start:] in by_path:
        return by_path[keys[start:]]
    return default

  return jax.tree_util.tree_map_with_path(pick, tree)
