"""Specification of `sleep_jax.ops.causal_attention` and of the fused kernel behind it.

The fused Triton kernels run in the Pallas interpreter on the CPU ("pallas"), against explicit
float32 einsums ("reference") and XLA's `jax.nn.dot_product_attention` ("xla"), in values and
in the gradients of q, k and v. Shapes: B batch, T tokens, H query heads, G key/value heads,
D head width.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sleep_jax.ops.attention.api import causal_attention, fits_one_program, resolve_impl

_ALLOW_TRITON = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]


def make_inputs(batch, tokens, heads, kv_heads, width, dtype=jnp.float32, seed=0):
  rng = np.random.default_rng(seed)
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), dtype)
  return (
    normal(batch, tokens, heads, width),
    normal(batch, tokens, kv_heads, width),
    normal(batch, tokens, kv_heads, width),
    jnp.asarray(rng.normal(size=(batch, tokens, heads, width)), jnp.float32),  # output weights
  )


def value_and_grads(impl, q, k, v, weights):
  loss = lambda q, k, v: jnp.sum(causal_attention(q, k, v, impl=impl).astype(jnp.float32) * weights)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)


def max_error(got, want):
  """Largest |got - want| over the largest |want| (0 when both are 0)."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  scale = np.abs(want).max()
  return np.abs(got - want).max() / scale if scale else np.abs(got).max()


CASES = {
  "one window of the paper (T=24, D=64)": (2, 24, 4, 4, 64),
  "T=1": (2, 1, 2, 2, 16),
  "odd T, grouped-query heads": (1, 5, 4, 2, 16),
  "the longest window (T=64), one key head": (2, 64, 2, 1, 32),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("impl", ["pallas", "xla"])
def test_matches_the_reference_in_values_and_gradients(impl, case):
  q, k, v, weights = make_inputs(*CASES[case])
  (value, grads), (want_value, want_grads) = (
    value_and_grads(impl, q, k, v, weights),
    value_and_grads("reference", q, k, v, weights),
  )
  assert max_error(value, want_value) < 1e-5
  for name, got, want in zip("qkv", grads, want_grads):
    assert max_error(got, want) < 1e-5, name


def test_bfloat16_stays_close_to_float32():
  q, k, v, weights = make_inputs(2, 24, 4, 4, 64)
  low = [x.astype(jnp.bfloat16) for x in (q, k, v)]
  (value, grads), (want_value, want_grads) = (
    value_and_grads("pallas", *low, weights),
    value_and_grads("reference", q, k, v, weights),
  )
  assert max_error(value, want_value) < 1e-2
  for name, got, want in zip("qkv", grads, want_grads):
    assert max_error(got, want) < 2e-2, name


def test_a_query_sees_only_itself_and_the_past():
  q, k, v, _ = make_inputs(1, 24, 2, 2, 16)
  out = causal_attention(q, k, v, impl="pallas")
  changed = causal_attention(q, k.at[:, 10:].set(9.0), v.at[:, 10:].set(-3.0), impl="pallas")
  np.testing.assert_array_equal(out[:, :10], changed[:, :10])
  assert not np.allclose(out[:, 10:], changed[:, 10:])


def _exported(platform, tokens, width=64, dtype=jnp.float32):
  q = jax.ShapeDtypeStruct((2, tokens, 4, width), dtype)
  grad = jax.grad(lambda q, k, v: causal_attention(q, k, v).astype(jnp.float32).sum(), (0, 1, 2))
  exported = jax.export.export(jax.jit(grad), platforms=[platform], disabled_checks=_ALLOW_TRITON)
  return exported(q, q, q).mlir_module()


def test_auto_is_the_fused_kernel_on_gpus_where_a_window_fits_and_xla_elsewhere():
  assert "causal_attention_forward" in _exported("cuda", 24)
  assert "causal_attention_backward" in _exported("cuda", 24)
  assert "causal_attention_forward" not in _exported("cuda", 75)  # past MAX_TOKENS
  assert "causal_attention_forward" not in _exported("cuda", 64, width=128)  # 32 KiB tiles
  assert "causal_attention_forward" in _exported("cuda", 64, width=128, dtype=jnp.bfloat16)
  assert "causal_attention_forward" not in _exported("cpu", 24)
  assert (resolve_impl("auto", "cpu"), resolve_impl("auto", "cuda")) == ("xla", "auto")
  assert fits_one_program(24, 64, jnp.float32) and not fits_one_program(24, 48, jnp.float32)


def test_sharded_over_batch_and_heads_it_runs_per_shard_with_no_collective():
  mesh = jax.make_mesh((4, 2), ("data", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  q, k, v, weights = make_inputs(4, 24, 4, 2, 16)
  sharding = NamedSharding(mesh, P("data", None, "tensor", None))
  run = functools.partial(value_and_grads, "pallas")
  want = run(q, k, v, weights)
  with jax.set_mesh(mesh):
    got = run(*(jax.device_put(x, sharding) for x in (q, k, v, weights)))
    grad = jax.grad(lambda q, k, v: causal_attention(q, k, v).astype(jnp.float32).sum(), (0, 1, 2))
    hlo = (
      jax.jit(grad, in_shardings=(sharding,) * 3)
      .lower(*(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v)))
      .compile()
      .as_text()
    )
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert max_error(a, b) < 1e-6
  for collective in ("all-gather", "all-to-all", "all-reduce", "collective-permute"):
    assert collective not in hlo, collective


def test_heads_split_over_an_axis_of_another_name_run_per_shard_when_named():
  mesh = jax.make_mesh((4, 2), ("batch", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  q, k, v, _ = make_inputs(4, 24, 4, 2, 16)
  sharding = NamedSharding(mesh, P("batch", None, "model", None))
  loss = lambda q, k, v: causal_attention(
    q, k, v, impl="xla", batch_axes="batch", head_axes="model"
  ).sum()
  with jax.set_mesh(mesh):
    jitted = jax.jit(jax.value_and_grad(loss, (0, 1, 2)), in_shardings=(sharding,) * 3)
    hlo = jitted.lower(q, k, v).compile().as_text()
    got = jitted(q, k, v)
  want = jax.value_and_grad(lambda q, k, v: causal_attention(q, k, v, impl="xla").sum(), (0, 1, 2))(
    q, k, v
  )
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert max_error(a, b) < 1e-5
  for collective in ("all-gather", "all-to-all", "collective-permute"):
    assert collective not in hlo, collective


@pytest.mark.parametrize(
  "shapes, impl, message",
  [
    (((2, 24, 4, 16), (2, 24, 3, 16), (2, 24, 3, 16)), "xla", "not a multiple"),
    (((2, 24, 4, 16), (2, 20, 4, 16), (2, 20, 4, 16)), "xla", "expected q"),
    (((2, 24, 16), (2, 24, 16), (2, 24, 16)), "xla", "must be"),
    (((2, 24, 4, 16),) * 3, "flash", "unknown impl"),
    (((2, 100, 4, 16),) * 3, "pallas", "at most 64 tokens"),
  ],
)
def test_bad_input_is_a_clear_error(shapes, impl, message):
  q, k, v = (jnp.zeros(shape) for shape in shapes)
  with pytest.raises(ValueError, match=message):
    causal_attention(q, k, v, impl=impl)
