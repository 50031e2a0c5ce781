"""Running a fused op shard by shard over inputs split along batch and heads.

Pallas kernels (Mosaic on TPUs, Triton on GPUs) are opaque to XLA's SPMD partitioner: jitted
over sharded inputs they either fail ("Mosaic kernels cannot be automatically partitioned") or
get every input gathered onto every device. Ops whose work is independent per example and per
head (the gated delta rule is) are therefore wrapped here in a `jax.shard_map` over the mesh in
context (`with jax.set_mesh(mesh)`): each device runs the kernel on its own [B/b, ..., H/h, ...]
block, forward and backward, with no collective at all.

Why shard_map and not `custom_partitioning`: shard_map is differentiable, so one wrapper covers
the forward kernel, the backward kernel and their residuals (custom_partitioning needs a
partitioner for each kernel and a sharding rule for each residual); it runs no Python callback
inside XLA's compiler; and `jax.export` accepts it (custom_partitioning's custom call is not
exportable). What it needs is the split to use, which under Auto mesh axes (the trainer's) the
traced values do not carry. It is chosen in this order:
  1. axes passed by the caller (`batch_axes=`, `head_axes=`);
  2. the split in context (`with split_axes(batch_axes=..., head_axes=...)`): the trainer's
     steps are traced inside the one its `config.parallel.rules` give (the "heads" rule), so
     the model's calls of the ops follow the parameters' split whatever the rules say;
  3. the inputs' own shardings, when the mesh's axes are Explicit;
  4. the project's mesh convention (sleep_jax.parallel): heads over the "tensor" axis, the batch
     over every other axis. On a mesh with axes the project does not name (a "model" axis, as
     many codebases call the one they split heads over) the convention may not be the inputs'
     split, and XLA would then gather the inputs around the kernel: a warning, once per mesh,
     names `head_axes=`.
Axes whose size does not divide the dimension are left out (that dimension is then replicated
over them). A split that differs from the inputs' actual sharding stays correct: XLA reshards
at the boundary, at the cost of a collective.
"""

from __future__ import annotations

import contextlib
import contextvars
import warnings
from collections.abc import Callable, Iterator, Sequence

import jax
from jax.sharding import AxisType, PartitionSpec

TENSOR_AXIS = "tensor"  # the mesh axis the project splits heads over (sleep_jax.parallel.mesh)
PROJECT_AXES = ("data", "fsdp", TENSOR_AXIS)  # the project's mesh axes (parallel.config)
Axes = tuple[str, ...]

# (batch axes, head axes) set by `split_axes`, or None.
_SPLIT_IN_CONTEXT: contextvars.ContextVar[tuple[Axes, Axes] | None] = contextvars.ContextVar(
  "sleep_jax_op_split", default=None
)
_WARNED_MESHES: set[Axes] = set()


def as_axes(axes: str | Sequence[str] | None) -> Axes:
  """A mesh-axes entry (None, one name, or several) as a tuple of names."""
  if axes is None:
    return ()
  return (axes,) if isinstance(axes, str) else tuple(axes)


def _dividing(axes: Axes, mesh, size: int) -> Axes:
  """The axes, in order, whose sizes multiply to a divisor of `size` (greedily)."""
  kept, product = [], 1
  for axis in axes:
    if size % (product * mesh.shape[axis]) == 0:
      kept.append(axis)
      product *= mesh.shape[axis]
  return tuple(kept)


@contextlib.contextmanager
def split_axes(*, batch_axes, head_axes) -> Iterator[None]:
  """Within it, the ops split the batch and heads over these mesh axes (a name, names or None)
  wherever their caller names none; entered while a function is traced, it holds for the
  calls that function makes."""
  token = _SPLIT_IN_CONTEXT.set((as_axes(batch_axes), as_axes(head_axes)))
  try:
    yield
  finally:
    _SPLIT_IN_CONTEXT.reset(token)


def _warn_of_unknown_axes(mesh, free: Axes, head_axes: Axes) -> None:
  """Once per mesh: axes the project does not name were taken by the convention."""
  unknown = tuple(a for a in free if a not in PROJECT_AXES)
  if not unknown or mesh.axis_names in _WARNED_MESHES:
    return
  _WARNED_MESHES.add(mesh.axis_names)
  warnings.warn(
    f"sleep_jax.ops: the mesh in context has axes {unknown} that the project's convention "
    f"does not name ({PROJECT_AXES}); the fused ops split the batch over them and the heads "
    f"over {head_axes or 'no axis'}. If the inputs' heads are split over one of them, pass "
    f"head_axes= (e.g. head_axes={unknown[-1]!r}) and batch_axes= to the op, or trace under "
    "sleep_jax.ops.partition.split_axes(...); otherwise XLA gathers the inputs around the "
    "kernel on every call.",
    stacklevel=4,
  )


def _free_axes(mesh) -> Axes:
  """Mesh axes of size > 1 not already manual (an enclosing shard_map owns those)."""
  return tuple(
    name
    for name, kind in zip(mesh.axis_names, mesh.axis_types)
    if kind != AxisType.Manual and mesh.shape[name] > 1
  )


def batch_and_head_axes(x_bth, *, batch_axes=None, head_axes=None) -> tuple[Axes, Axes]:
  """The mesh axes to split dimension 0 (batch) and 2 (heads) of `x_bth` over.

  Args:
    x_bth: an input of the op laid out [B, T, H, ...] (a tracer or array).
    batch_axes, head_axes: the caller's choice (a mesh axis name or a tuple of names), or None
      to take it from the split in context, the input's Explicit sharding or the project's mesh
      convention (the module docstring).

  Returns:
    (batch_axes, head_axes), both () when there is no mesh in context or it has one device.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return (), ()
  free = _free_axes(mesh)
  if not free:
    return (), ()
  batch, heads = x_bth.shape[0], x_bth.shape[2]
  if batch_axes is None and head_axes is None:
    in_context = _SPLIT_IN_CONTEXT.get()
    if in_context is not None:
      batch_axes, head_axes = in_context
    elif any(kind == AxisType.Explicit for kind in mesh.axis_types):
      spec = jax.typeof(x_bth).sharding.spec  # Explicit axes: the value says how it is split
      batch_axes, head_axes = spec[0], spec[2]
    else:
      head_axes = tuple(a for a in free if a == TENSOR_AXIS)
      batch_axes = tuple(a for a in free if a != TENSOR_AXIS)
      _warn_of_unknown_axes(mesh, free, head_axes)
  missing = sorted(set(as_axes(batch_axes) + as_axes(head_axes)) - set(mesh.axis_names))
  if missing:
    raise ValueError(f"mesh axes {missing} are not in the mesh in context {mesh.axis_names}")
  batch_axes = tuple(a for a in as_axes(batch_axes) if a in free)
  head_axes = tuple(a for a in as_axes(head_axes) if a in free and a not in batch_axes)
  return _dividing(batch_axes, mesh, batch), _dividing(head_axes, mesh, heads)


def _spec(layout: str, batch_axes: Axes, head_axes: Axes) -> PartitionSpec:
  """A PartitionSpec from a layout string: "b" -> batch axes, "h" -> head axes, else whole."""
  pick = {"b": batch_axes or None, "h": head_axes or None}
  return PartitionSpec(*(pick.get(letter) for letter in layout))


def shard_over_batch_and_heads(
  fn: Callable,
  *,
  in_layouts: Sequence[str],
  out_layouts: Sequence[str],
  batch_axes: Axes,
  head_axes: Axes,
) -> Callable:
  """`fn` run per shard, its inputs and outputs split as their layouts say.

  Args:
    fn: a function of arrays, correct on any batch and head slice of its inputs.
    in_layouts, out_layouts: one string per input / output naming its dimensions, e.g. "bthk"
      for [B,T,H,K] or "bhkv" for a state [B,H,K,V]; only "b" and "h" are split.
    batch_axes, head_axes: from `batch_and_head_axes`; when both are empty `fn` is returned.

  Returns:
    A function with `fn`'s signature.
  """
  if not batch_axes and not head_axes:
    return fn
  in_specs = tuple(_spec(layout, batch_axes, head_axes) for layout in in_layouts)
  out_specs = tuple(_spec(layout, batch_axes, head_axes) for layout in out_layouts)
  # check_vma=False: Pallas outputs carry no varying-axes annotation for the checker to read.
  return jax.shard_map(fn, in_specs=in_specs, out_specs=out_specs, check_vma=False)
