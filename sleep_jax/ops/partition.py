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
  2. the inputs' own shardings, when the mesh's axes are Explicit;
  3. the project's mesh convention (sleep_jax.parallel): heads over the "tensor" axis, the batch
     over every other axis.
Axes whose size does not divide the dimension are left out (that dimension is then replicated
over them). A split that differs from the inputs' actual sharding stays correct: XLA reshards
at the boundary, at the cost of a collective.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
from jax.sharding import AxisType, PartitionSpec

TENSOR_AXIS = "tensor"  # the mesh axis the project splits heads over (sleep_jax.parallel.mesh)
Axes = tuple[str, ...]


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
      to take it from the input's Explicit sharding or the project's mesh convention.

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
    if any(kind == AxisType.Explicit for kind in mesh.axis_types):
      spec = jax.typeof(x_bth).sharding.spec  # Explicit axes: the value says how it is split
      batch_axes, head_axes = spec[0], spec[2]
    else:
      head_axes = tuple(a for a in free if a == TENSOR_AXIS)
      batch_axes = tuple(a for a in free if a != TENSOR_AXIS)
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
