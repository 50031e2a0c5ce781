"""The gated delta rule under sharding: per-shard kernels, equal to one device, no collectives.

Specification (DESIGN.md section 6): jitted over inputs split along batch and heads inside
`with jax.set_mesh(mesh)`, `gated_delta_rule` runs on each device's own block, forward and
backward, and gives what one device gives. The platform's kernel is picked when lowering, so
the same function exports Triton kernels for CUDA from this CPU host.
"""

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

from sleep_jax.ops import gated_delta_rule, partition

COLLECTIVES = ("all-gather", "all-to-all", "all-reduce", "collective-permute", "reduce-scatter")


def make_inputs(batch=4, tokens=21, heads=4, key_dim=8, value_dim=12, seed=0):
  rng = np.random.default_rng(seed)
  k = rng.normal(size=(batch, tokens, heads, key_dim))
  k /= np.linalg.norm(k, axis=-1, keepdims=True)
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  return (
    f32(rng.normal(size=(batch, tokens, heads, key_dim))),
    f32(k),
    f32(rng.normal(size=(batch, tokens, heads, value_dim))),
    f32(-rng.uniform(0.01, 1.0, size=(batch, tokens, heads))),
    f32(rng.uniform(0.05, 0.95, size=(batch, tokens, heads))),
    f32(rng.normal(size=(batch, heads, key_dim, value_dim))),
  )


def loss_and_grads(impl, **axes):
  """Forward outputs and the gradients of all six inputs, as one jittable function."""

  def loss(*args):
    o, state = gated_delta_rule(*args[:5], initial_state=args[5], impl=impl, chunk_size=8, **axes)
    return jnp.sum(o * jnp.cos(o)) + jnp.sum(state**2), (o, state)

  def run(*args):
    (_, outputs), grads = jax.value_and_grad(loss, argnums=range(6), has_aux=True)(*args)
    return outputs, grads

  return run


def input_shardings(mesh, batch_axes, head_axes):
  spec = lambda layout: NamedSharding(mesh, partition._spec(layout, batch_axes, head_axes))
  return tuple(spec(layout) for layout in ("bthk", "bthk", "bthv", "bth", "bth", "bhkv"))


MESHES = {
  "data 4 x tensor 2": ((4, 2), ("data", "tensor")),
  "data 8": ((8,), ("data",)),
  "x 2 x y 4, any axis names": ((2, 4), ("x", "y")),
}


@pytest.mark.parametrize("impl", ["chunked", "pallas"])
@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_sharded_op_equals_one_device_in_values_and_gradients(impl, mesh_name):
  shape, names = MESHES[mesh_name]
  mesh = auto_mesh(shape, names)
  # Batch over the first axis, heads over the second (named explicitly for "x", "y").
  axes = {} if "tensor" in names or len(names) == 1 else {"batch_axes": "x", "head_axes": "y"}
  batch_axes = tuple(a for a in names if a != "tensor") if not axes else ("x",)
  head_axes = ("tensor",) if "tensor" in names else (("y",) if axes else ())
  inputs = make_inputs(batch=8, heads=4)
  expected = jax.jit(loss_and_grads(impl))(*inputs)
  with jax.set_mesh(mesh):
    sharded = jax.jit(
      loss_and_grads(impl, **axes), in_shardings=input_shardings(mesh, batch_axes, head_axes)
    )
    got = sharded(*inputs)
    hlo = sharded.lower(*inputs).compile().as_text()
  # Per-shard matmuls may sum in another order than the whole batch's: float32 rounding only.
  for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    g, e = np.asarray(g, np.float64), np.asarray(e, np.float64)
    assert np.abs(g - e).max() <= 1e-5 * np.abs(e).max()
  found = [c for c in COLLECTIVES if c in hlo]
  assert not found, f"the sharded op communicates: {found}"


def test_explicit_axes_follow_the_inputs_own_sharding():
  mesh = jax.make_mesh((2, 4), ("rows", "cols"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
  inputs = make_inputs(batch=8, heads=4)
  expected = jax.jit(loss_and_grads("chunked"))(*inputs)
  with jax.set_mesh(mesh):
    placed = jax.device_put(inputs, input_shardings(mesh, ("cols",), ("rows",)))
    assert partition.batch_and_head_axes(placed[0]) == (("cols",), ("rows",))
    got = jax.jit(loss_and_grads("chunked"))(*placed)
  for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    g, e = np.asarray(g, np.float64), np.asarray(e, np.float64)
    assert np.abs(g - e).max() <= 1e-5 * np.abs(e).max()


def test_without_a_mesh_the_op_is_not_wrapped():
  assert partition.batch_and_head_axes(jnp.zeros((4, 3, 2, 5))) == ((), ())


def auto_mesh(shape, names):
  return jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(names))


def test_axes_that_do_not_divide_are_left_out():
  mesh = auto_mesh((4, 2), ("data", "tensor"))
  with jax.set_mesh(mesh):
    # batch 6: data=4 does not divide it; heads 3: tensor=2 does not divide them.
    assert partition.batch_and_head_axes(jnp.zeros((6, 3, 3, 5))) == ((), ())
    assert partition.batch_and_head_axes(jnp.zeros((8, 3, 2, 5))) == (("data",), ("tensor",))


def test_unknown_mesh_axes_are_a_clear_error():
  mesh = auto_mesh((8,), ("data",))
  with jax.set_mesh(mesh), pytest.raises(ValueError, match=r"mesh axes \['model'\] are not in"):
    gated_delta_rule(*make_inputs()[:5], head_axes="model")


def _export_for_cuda(mesh, batch_axes, head_axes):
  run = loss_and_grads("auto")
  with jax.set_mesh(mesh):
    jitted = jax.jit(run, in_shardings=input_shardings(mesh, batch_axes, head_axes))
    abstract = [
      jax.ShapeDtypeStruct(x.shape, jnp.bfloat16 if x.ndim == 4 and i < 3 else x.dtype)
      for i, x in enumerate(make_inputs(batch=8, tokens=64, heads=4, key_dim=64, value_dim=64))
    ]
    allow = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    return jax.export.export(jitted, platforms=["cuda"], disabled_checks=allow)(*abstract)


def test_auto_exports_per_shard_triton_kernels_for_cuda_from_a_cpu_host():
  mesh = auto_mesh((4, 2), ("data", "tensor"))
  module = _export_for_cuda(mesh, ("data",), ("tensor",)).mlir_module()
  assert module.count("__gpu$xla.gpu.triton") >= 2, "expected forward and backward kernels"
  # The kernels see one shard: batch 8 / data 4 = 2 and heads 4 / tensor 2 = 2, head-major.
  assert re.search(r"tensor<2x2x64x64xbf16>", module), "kernel operands are not per shard"
  assert not re.search(r"tensor<8x4x64x64xbf16>", module), "a kernel sees the whole batch"
  assert "all-gather" not in module and "all_gather" not in module


def test_auto_lowers_to_plain_xla_for_the_cpu():
  hlo = jax.jit(loss_and_grads("auto")).lower(*make_inputs()).compile().as_text()
  assert "triton" not in hlo and "tpu_custom_call" not in hlo


def collectives_in(fn, inputs, mesh, batch_axes, head_axes) -> list[str]:
  with jax.set_mesh(mesh):
    jitted = jax.jit(fn, in_shardings=input_shardings(mesh, batch_axes, head_axes))
    hlo = jitted.lower(*inputs).compile().as_text()
  return [c for c in COLLECTIVES if c in hlo]


def test_a_mesh_axis_the_project_does_not_name_warns_once_and_naming_it_removes_the_collectives(
  monkeypatch,
):
  # Heads split over "model", as many codebases name that axis: the convention takes "model"
  # for a batch axis, so XLA moves the inputs around the kernel. Said once, with the fix.
  monkeypatch.setattr(partition, "_WARNED_MESHES", set())
  mesh = auto_mesh((2, 4), ("data", "model"))
  inputs = make_inputs(batch=8, heads=4)
  with pytest.warns(UserWarning, match=r"\('model',\).*head_axes=") as caught:
    moved = collectives_in(loss_and_grads("chunked"), inputs, mesh, ("data",), ("model",))
  assert len(caught) == 1 and moved
  with jax.set_mesh(mesh), warnings.catch_warnings():
    warnings.simplefilter("error")  # the same mesh again: no second warning
    partition.batch_and_head_axes(inputs[0])
  named = loss_and_grads("chunked", batch_axes="data", head_axes="model")
  assert collectives_in(named, inputs, mesh, ("data",), ("model",)) == []


def test_the_split_in_context_is_used_where_the_caller_names_none(monkeypatch):
  monkeypatch.setattr(partition, "_WARNED_MESHES", set())
  mesh = auto_mesh((2, 4), ("data", "model"))
  inputs = make_inputs(batch=8, heads=4)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    with partition.split_axes(batch_axes="data", head_axes="model"):
      with jax.set_mesh(mesh):
        assert partition.batch_and_head_axes(inputs[0]) == (("data",), ("model",))
      moved = collectives_in(loss_and_grads("chunked"), inputs, mesh, ("data",), ("model",))
  assert moved == []
  with jax.set_mesh(mesh), pytest.warns(UserWarning):  # outside it, the convention again
    assert partition.batch_and_head_axes(inputs[0]) == (("data", "model"), ())
