"""The device mesh and the logical-axis rules that turn parameter annotations into shardings.

Every parameter carries `logical_axes` metadata (e.g. ("embed", "mlp")); `config.parallel.rules`
maps each logical axis to a mesh axis or None (replicated). The default mesh is one "data" axis
over all local devices with parameters replicated: plain data parallelism. FSDP or tensor
parallelism is a change of the rules table (and the mesh), not of the model code.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec
from flax import nnx

DATA_AXIS = "data"


def data_parallel_size(parallel_config: Mapping[str, Any]) -> int:
  """The size of the data axis: `config.parallel.data`, or all local devices when it is -1."""
  size = parallel_config["data"]
  available = jax.local_device_count()
  if size == -1:
    return available
  if not 1 <= size <= available:
    raise ValueError(f"parallel.data={size} but {available} local devices are available")
  return size


def make_mesh(parallel_config: Mapping[str, Any]) -> Mesh:
  """A 1-D ("data",) mesh over the first `data_parallel_size` local devices."""
  size = data_parallel_size(parallel_config)
  # Auto axes: shardings are given to jit and propagated by XLA (the classic pjit model).
  return jax.make_mesh((size,), (DATA_AXIS,), axis_types=(AxisType.Auto,),
                       devices=jax.local_devices()[:size])


def logical_to_spec(logical_axes: Iterable[str | None], rules: Iterable[tuple[str, Any]]) -> PartitionSpec:
  """PartitionSpec of an array whose dimensions carry these logical names."""
  table = dict(rules)
  unknown = [a for a in logical_axes if a is not None and a not in table]
  if unknown:
    raise ValueError(f"logical axes {unknown} have no entry in parallel.rules {sorted(table)}")
  return PartitionSpec(*(None if a is None else table[a] for a in logical_axes))


def param_shardings(abstract_state: nnx.State, mesh: Mesh, rules) -> Any:
  """NamedShardings for a model's parameters, as a nested dict like `nnx.to_pure_dict`."""
  specs = jax.tree.map(
      lambda v: NamedSharding(mesh, logical_to_spec(v.get_metadata()["logical_axes"], rules)),
      abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.to_pure_dict(specs)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Examples split over the data axis; the sequence axis is whole on every device."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def _path_keys(path) -> tuple:
  return tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path)


def shardings_by_param_path(tree: Any, param_shardings: Any, *, default: NamedSharding) -> Any:
  """Shardings for a tree (e.g. optimizer state) whose leaves mirror parameters.

  A leaf whose key path ends with a parameter's key path (optax's moments nest the params'
  dict inside their own state) gets that parameter's sharding; any other leaf (step counters)
  gets `default`.
  """
  by_path = {_path_keys(path): sharding for path, sharding in
             jax.tree_util.tree_flatten_with_path(param_shardings)[0]}

  def pick(path, _):
    keys = _path_keys(path)
    for start in range(len(keys)):
      if keys[start:] in by_path:
        return by_path[keys[start:]]
    return default

  return jax.tree_util.tree_map_with_path(pick, tree)
