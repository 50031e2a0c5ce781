"""Specification of `sleep_jax.ops.gated_delta_rule` and of every implementation behind it.

Implementations: "reference" (per-token scan, the oracle), "chunked" (WY form with the lean
custom VJP), "chunked_autodiff" (same forward, plain autodiff), and the two Pallas kernels
run in interpret mode on the CPU ("pallas_gpu": the fused Triton kernel; "pallas_gpu_staged":
the staged GPU form, XLA stages around a Triton state walk; "pallas_tpu": the Mosaic kernel
under the TPU interpreter). Shapes: B batch, T tokens, H heads, K key/query width,
V value width.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from sleep_jax.ops import gated_delta_rule
from sleep_jax.ops.gated_delta import kernel_math
from sleep_jax.ops.gated_delta.api import resolve_impl
from sleep_jax.ops.gated_delta.chunked import (
  _invert_unit_lower,
  gated_delta_rule_chunked,
  gated_delta_rule_chunked_autodiff,
)
from sleep_jax.ops.gated_delta.pallas_gpu import gated_delta_rule_pallas_gpu
from sleep_jax.ops.gated_delta.pallas_gpu_staged import gated_delta_rule_pallas_gpu_staged
from sleep_jax.ops.gated_delta.pallas_tpu import gated_delta_rule_pallas_tpu
from sleep_jax.ops.gated_delta.reference import gated_delta_rule_reference

INPUT_NAMES = ("q", "k", "v", "g", "beta", "initial_state")

IMPLEMENTATIONS = {
  "reference": functools.partial(gated_delta_rule, impl="reference"),
  "chunked": functools.partial(gated_delta_rule, impl="chunked"),
  "auto": functools.partial(gated_delta_rule, impl="auto"),
  "chunked_autodiff": gated_delta_rule_chunked_autodiff,
  "pallas_gpu": functools.partial(gated_delta_rule_pallas_gpu, interpret=True),
  "pallas_gpu_staged": functools.partial(gated_delta_rule_pallas_gpu_staged, interpret=True),
  "pallas_tpu": functools.partial(gated_delta_rule_pallas_tpu, interpret=True),
}
FAST = ["chunked", "chunked_autodiff", "pallas_gpu", "pallas_gpu_staged", "pallas_tpu"]
PALLAS = ["pallas_gpu", "pallas_gpu_staged", "pallas_tpu"]


def impls(names, slow=("chunked_autodiff", "pallas_tpu")):
  """`names` as pytest params; those in `slow` (the costliest to interpret or a second opinion
  already covered elsewhere) only run with `-m slow`, to keep the default suite short."""
  return [pytest.param(name, marks=[pytest.mark.slow] if name in slow else []) for name in names]


def make_inputs(
  seed,
  batch=1,
  tokens=8,
  heads=1,
  key_dim=4,
  value_dim=4,
  *,
  log_decay=None,
  with_state=True,
  dtype=np.float32,
):
  """Random inputs as the GDN layer produces them: unit keys, g <= 0, beta in (0, 1)."""
  rng = np.random.default_rng(seed)
  keys = rng.normal(size=(batch, tokens, heads, key_dim))
  keys /= np.linalg.norm(keys, axis=-1, keepdims=True)
  if log_decay is None:
    g = -rng.uniform(0.01, 1.0, size=(batch, tokens, heads))
  else:
    g = np.full((batch, tokens, heads), log_decay)
  inputs = {
    "q": rng.normal(size=(batch, tokens, heads, key_dim)),
    "k": keys,
    "v": rng.normal(size=(batch, tokens, heads, value_dim)),
    "g": g,
    "beta": rng.uniform(0.05, 0.95, size=(batch, tokens, heads)),
    "initial_state": (rng.normal(size=(batch, heads, key_dim, value_dim)) if with_state else None),
  }
  return {name: None if x is None else jnp.asarray(x, dtype) for name, x in inputs.items()}


def numpy_recurrence(q, k, v, g, beta, initial_state=None, scale=None):
  """The recurrence written out token by token and head by head, in float64 numpy."""
  q, k, v, g, beta = (np.asarray(x, np.float64) for x in (q, k, v, g, beta))
  batch, tokens, heads, key_dim = q.shape
  scale = key_dim**-0.5 if scale is None else scale
  state = np.zeros((batch, heads, key_dim, v.shape[-1]))
  if initial_state is not None:
    state[:] = np.asarray(initial_state, np.float64)
  out = np.zeros(v.shape)
  for b in range(batch):
    for h in range(heads):
      s = state[b, h]
      for t in range(tokens):
        s = s * np.exp(g[b, t, h])
        error = beta[b, t, h] * (v[b, t, h] - s.T @ k[b, t, h])
        s = s + np.outer(k[b, t, h], error)
        out[b, t, h] = s.T @ (scale * q[b, t, h])
      state[b, h] = s
  return out, state


def assert_close(actual, expected, rel, what=""):
  """Max abs error at most `rel` times the largest magnitude of `expected`."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
  bound = rel * max(np.abs(expected).max(), 1e-30)
  error = np.abs(actual - expected).max()
  assert error <= bound, f"{what}: max abs error {error:.3g} > {bound:.3g}"


@functools.partial(jax.jit, static_argnames=("impl", "chunk_size", "scale"))
def run(impl, inputs, chunk_size=64, scale=None):
  # Jitted: op-by-op dispatch of the unrolled chunked form is far slower than one compile.
  return IMPLEMENTATIONS[impl](**inputs, chunk_size=chunk_size, scale=scale)


@functools.partial(jax.jit, static_argnames=("impl", "chunk_size"))
def loss_and_grads(inputs, cotangents, impl, chunk_size):
  """Gradients of sum(o * co) + sum(S * cS): random cotangents for both outputs."""

  def loss(differentiable):
    out, state = IMPLEMENTATIONS[impl](**differentiable, chunk_size=chunk_size)
    return jnp.sum(out.astype(jnp.float32) * cotangents[0]) + jnp.sum(state * cotangents[1])

  return jax.value_and_grad(loss)(inputs)


def random_cotangents(inputs, seed=123):
  rng = np.random.default_rng(seed)
  batch, _, heads, key_dim = inputs["q"].shape
  value_dim = inputs["v"].shape[-1]
  return (
    jnp.asarray(rng.normal(size=inputs["v"].shape), jnp.float32),
    jnp.asarray(rng.normal(size=(batch, heads, key_dim, value_dim)), jnp.float32),
  )


def with_zero_state(inputs):
  """Makes initial_state explicit so that its gradient exists even when it is zeros."""
  if inputs["initial_state"] is not None:
    return inputs
  batch, _, heads, key_dim = inputs["q"].shape
  return {**inputs, "initial_state": jnp.zeros((batch, heads, key_dim, inputs["v"].shape[-1]))}


# --- the oracle ---------------------------------------------------------------------------------


@pytest.mark.parametrize("with_state", [False, True])
def test_reference_equals_the_float64_numpy_recurrence(with_state):
  inputs = make_inputs(0, batch=2, tokens=9, heads=2, key_dim=4, value_dim=3, with_state=with_state)
  out, state = gated_delta_rule_reference(**inputs)
  expected_out, expected_state = numpy_recurrence(**inputs)
  assert out.dtype == jnp.float32 and state.dtype == jnp.float32
  assert_close(out, expected_out, 1e-5, "o")
  assert_close(state, expected_state, 1e-5, "final_state")


def test_scale_multiplies_the_queries():
  inputs = make_inputs(1, tokens=5)
  for impl in ("chunked", "pallas_gpu"):
    out, _ = run(impl, inputs, scale=0.3)
    assert_close(out, numpy_recurrence(**inputs, scale=0.3)[0], 1e-5, impl)


@pytest.mark.parametrize(
  "impl,tokens",
  [("reference", 1), ("reference", 5), ("chunked", 3), ("chunked", 11), ("chunked_autodiff", 11)],
)
def test_gradients_match_finite_differences_in_float64(impl, tokens):
  with jax.enable_x64(True):
    inputs = make_inputs(
      2, batch=1, tokens=tokens, heads=2, key_dim=3, value_dim=2, dtype=np.float64
    )

    @jax.jit
    def outputs(*args):
      return IMPLEMENTATIONS[impl](**dict(zip(INPUT_NAMES, args)), chunk_size=4)

    assert outputs(*inputs.values())[1].dtype == jnp.float64
    check_grads(outputs, tuple(inputs.values()), order=1, modes=["rev"])


# --- every fast implementation == reference == float64 numpy ------------------------------------

CASES = {
  "one token": dict(batch=1, tokens=1, heads=1, key_dim=4, value_dim=4, chunk_size=16),
  "T=37 not a multiple of C=16, K != V, H > 1, B > 1": dict(
    batch=2, tokens=37, heads=3, key_dim=6, value_dim=10, chunk_size=16
  ),
  "T=24 shorter than the chunk": dict(
    batch=1, tokens=24, heads=1, key_dim=4, value_dim=4, chunk_size=64
  ),
  "T=80 in chunks of 48, above chunked.SMALL_CHUNK": dict(
    batch=1, tokens=80, heads=2, key_dim=4, value_dim=4, chunk_size=48
  ),
}
# The interpreted kernels cost seconds per case: the default suite runs them on the richest
# case (with and without a state) and on T=1; the rest of the matrix is `slow`.
_PALLAS_IN_DEFAULT_SUITE = {"one token", "T=37 not a multiple of C=16, K != V, H > 1, B > 1"}


def _matrix():
  for impl in FAST:
    for case in CASES:
      for with_state in (False, True):
        slow = impl in PALLAS and (
          case not in _PALLAS_IN_DEFAULT_SUITE or (case == "one token" and with_state)
        )
        marks = [pytest.mark.slow] if slow else []
        state_id = "initial state" if with_state else "zero state"
        yield pytest.param(impl, case, with_state, marks=marks, id=f"{impl}-{case}-{state_id}")


@pytest.mark.parametrize("impl,case,with_state", list(_matrix()))
def test_matches_reference_and_numpy_in_values_and_gradients(impl, case, with_state):
  dims = dict(CASES[case])
  chunk_size = dims.pop("chunk_size")
  inputs = with_zero_state(make_inputs(3, **dims, with_state=with_state))
  cotangents = random_cotangents(inputs)

  out, state = run(impl, inputs, chunk_size)
  expected_out, expected_state = numpy_recurrence(**inputs)
  assert out.dtype == jnp.float32 and state.dtype == jnp.float32
  assert_close(out, expected_out, 1e-5, "o vs numpy")
  assert_close(state, expected_state, 1e-5, "final_state vs numpy")

  loss, grads = loss_and_grads(inputs, cotangents, impl, chunk_size)
  expected_loss, expected_grads = loss_and_grads(inputs, cotangents, "reference", chunk_size)
  assert_close(loss, expected_loss, 1e-5, "loss")
  for name in INPUT_NAMES:
    assert_close(grads[name], expected_grads[name], 1e-4, f"d loss / d {name}")


# Masked doubling up to chunked.SMALL_CHUNK = 32 (1, 5, 24, 32), block pairs above (33, 37).
@pytest.mark.parametrize("size", [1, 5, 24, 32, 33, 37])
def test_unit_lower_inverses_match_numpy(size):
  rng = np.random.default_rng(size)
  strict_lower = np.tril(rng.uniform(-1, 1, size=(2, size, size)), -1)
  expected = np.linalg.inv(np.eye(size) + strict_lower)
  inverse = jax.jit(_invert_unit_lower)(jnp.asarray(strict_lower, jnp.float32))
  assert_close(inverse, expected, 1e-6, "block inversion (chunked)")
  # The kernels never form the inverse: they solve with I + A (and its transpose) on the tiles
  # it multiplies. Solving against the identity gives the inverse (and its transpose).
  identity = jnp.broadcast_to(jnp.eye(size, dtype=jnp.float32), strict_lower.shape)
  lower = jnp.asarray(strict_lower, jnp.float32)
  substituted = jax.jit(jax.vmap(kernel_math.forward_substitute))(lower, identity)
  assert_close(substituted, expected, 1e-6, "forward substitution (kernels)")
  back_substituted = jax.jit(jax.vmap(kernel_math.back_substitute))(lower, identity)
  assert_close(back_substituted, np.swapaxes(expected, -1, -2), 1e-6, "back substitution")


def test_auto_is_chunked_on_cpu_and_pallas_interprets_the_gpu_kernel():
  assert resolve_impl("auto", "cpu") == "chunked"
  assert resolve_impl("auto", "cuda") == "pallas_staged"  # see docs/results/gpu/report.md
  assert resolve_impl("auto", "tpu") == "pallas"
  inputs = make_inputs(4, tokens=3)
  for got, want in zip(run("auto", inputs, 2), run("chunked", inputs, 2)):
    np.testing.assert_array_equal(got, want)
  pallas = jax.jit(functools.partial(gated_delta_rule, impl="pallas", chunk_size=2))(**inputs)
  for got, want in zip(pallas, run("pallas_gpu", inputs, 2)):
    np.testing.assert_array_equal(got, want)


# --- numerical robustness -----------------------------------------------------------------------


@pytest.mark.parametrize("impl", impls(["reference", *FAST]))
def test_strong_decay_gives_finite_values_and_gradients(impl):
  # Same shapes as a case above, so compiled functions are reused. g = -20 per token: the
  # cumulative decay reaches -740 in a chunk of 37, where exp underflows to exactly 0.
  inputs = make_inputs(5, batch=2, tokens=37, heads=3, key_dim=6, value_dim=10, log_decay=-20.0)
  loss, grads = loss_and_grads(inputs, random_cotangents(inputs), impl, 16)
  out, state = run(impl, inputs, 16)
  for name, x in [("o", out), ("final_state", state), ("loss", loss), *grads.items()]:
    assert np.isfinite(np.asarray(x)).all(), name
  # exp(-20) ~ 2e-9: the state is essentially the last token's write alone.
  assert_close(out, numpy_recurrence(**inputs)[0], 1e-5, "o vs numpy")


@pytest.mark.parametrize("impl", impls(["chunked", "chunked_autodiff"]))
def test_long_sequence_gives_finite_values_and_gradients(impl):
  # T = 16K, with a decay mild enough that the state carries information across all chunks.
  inputs = make_inputs(12, batch=1, tokens=16_384, heads=1, key_dim=4, value_dim=4)
  inputs["g"] = inputs["g"] * 0.01
  loss, grads = loss_and_grads(inputs, random_cotangents(inputs), impl, 64)
  out, state = run(impl, inputs, 64)
  for name, x in [("o", out), ("final_state", state), ("loss", loss), *grads.items()]:
    assert np.isfinite(np.asarray(x)).all(), name
  expected_out, expected_state = run("reference", inputs, 64)
  assert_close(out, expected_out, 1e-4, "o vs reference")
  assert_close(state, expected_state, 1e-4, "final_state vs reference")


@pytest.mark.parametrize("impl", impls(["reference", *FAST], slow=("chunked_autodiff",)))
def test_splitting_the_sequence_and_carrying_the_state_changes_nothing(impl):
  inputs = make_inputs(6, batch=2, tokens=30, heads=2, key_dim=4, value_dim=5)
  whole_out, whole_state = run(impl, inputs, 8)

  def part(lo, hi, state):
    sliced = {name: inputs[name][:, lo:hi] for name in INPUT_NAMES[:5]}
    return run(impl, {**sliced, "initial_state": state}, 8)

  first_out, mid_state = part(0, 13, inputs["initial_state"])
  second_out, end_state = part(13, 30, mid_state)
  assert_close(jnp.concatenate([first_out, second_out], axis=1), whole_out, 1e-5, "o")
  assert_close(end_state, whole_state, 1e-5, "final_state")


@pytest.mark.parametrize("impl", impls(["reference", *FAST]))
def test_bfloat16_inputs_stay_close_to_float32(impl):
  # bf16 keeps 8 mantissa bits (~0.4% relative rounding) on the inputs and the output; the state
  # itself stays float32, so the error does not grow with T. Measured ~0.8% of the largest value;
  # tolerance 2%. Gradients come back in the inputs' dtypes.
  inputs = make_inputs(7, batch=1, tokens=40, heads=2, key_dim=8, value_dim=8)
  low = {
    name: x if name == "initial_state" else x.astype(jnp.bfloat16) for name, x in inputs.items()
  }
  out, state = run(impl, low, 16)
  assert out.dtype == jnp.bfloat16 and state.dtype == jnp.float32
  expected_out, expected_state = run(impl, inputs, 16)
  assert_close(out, expected_out, 2e-2, "o")
  assert_close(state, expected_state, 2e-2, "final_state")
  _, grads = loss_and_grads(low, random_cotangents(low), impl, 16)
  _, expected_grads = loss_and_grads(inputs, random_cotangents(inputs), impl, 16)
  for name in INPUT_NAMES:
    assert grads[name].dtype == low[name].dtype, name
    assert np.isfinite(np.asarray(grads[name], np.float32)).all(), name
    assert_close(grads[name], expected_grads[name], 5e-2, f"d loss / d {name}")


# --- input validation ---------------------------------------------------------------------------


def _bad(**changes):
  inputs = make_inputs(8, batch=2, tokens=6, heads=2, key_dim=4, value_dim=3)
  for name, shape in changes.items():
    inputs[name] = jnp.zeros(shape)
  return inputs


BAD_INPUTS = {
  "k batch differs": (_bad(k=(1, 6, 2, 4)), "k has shape"),
  "k tokens differ": (_bad(k=(2, 5, 2, 4)), "k has shape"),
  "k heads differ": (_bad(k=(2, 6, 1, 4)), "k has shape"),
  "K of q vs k": (_bad(k=(2, 6, 2, 5)), "k has shape"),
  "v tokens differ": (_bad(v=(2, 5, 2, 3)), "v has shape"),
  "v heads differ": (_bad(v=(2, 6, 3, 3)), "v has shape"),
  "g shape": (_bad(g=(2, 6, 3)), "g has shape"),
  "g rank": (_bad(g=(2, 6, 2, 1)), "g must have 3 dims"),
  "beta shape": (_bad(beta=(2, 5, 2)), "beta has shape"),
  "initial_state shape": (_bad(initial_state=(2, 2, 3, 4)), "initial_state has shape"),
  "q rank": (_bad(q=(2, 6, 8)), "q must have 4 dims"),
  "empty sequence": (
    _bad(q=(2, 0, 2, 4), k=(2, 0, 2, 4), v=(2, 0, 2, 3), g=(2, 0, 2), beta=(2, 0, 2)),
    "T == 0",
  ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
@pytest.mark.parametrize("impl", ["chunked", "pallas"])
def test_bad_shapes_raise_value_error(case, impl):
  inputs, message = BAD_INPUTS[case]
  with pytest.raises(ValueError, match=message):
    gated_delta_rule(**inputs, impl=impl)


def test_unknown_impl_and_bad_chunk_size_raise_value_error():
  inputs = make_inputs(9)
  with pytest.raises(ValueError, match="unknown impl 'triton'"):
    gated_delta_rule(**inputs, impl="triton")
  with pytest.raises(ValueError, match="chunk_size"):
    gated_delta_rule(**inputs, chunk_size=0)


def test_direct_chunked_call_matches_api():
  inputs = make_inputs(11, tokens=12)
  chunked = jax.jit(gated_delta_rule_chunked, static_argnames="chunk_size")
  for got, want in zip(chunked(**inputs, chunk_size=5), run("chunked", inputs, 5)):
    np.testing.assert_array_equal(got, want)
