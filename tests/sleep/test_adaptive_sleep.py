"""Adaptive sleep, halt="converge": a row stops sleeping on a window once its fast state settles.

The toy layout of test_sleep.py: 3 sleep chunks of 4 tokens, then a 3-token prediction chunk.
At random initialisation a pass changes the state by a relative 0.3 or more, so tol=1.0 halts
rows at different passes on different windows (checked below), and the tests use it for that.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sleep_jax
from sleep_jax.model.lm import zero_fast_state
from sleep_jax.sleep.config import SleepConfig
from sleep_jax.sleep.consolidate import relative_change, sleep_forward

WINDOW, CONTEXT, PREDICT, VOCAB = 4, 12, 3, 7
CPU_FORM = dict(fast_weight_impl="chunked", attention_impl="xla")
MIXED_TOL = 1.0  # halts some rows on some windows, not all (test_mixed_tol_halts_mid_way)


@pytest.fixture(scope="module")
def model():
  cfg = dict(vocab_size=VOCAB, pattern="AGAG", d_model=16, num_heads=2, head_dim=8, mlp_dim=32)
  return sleep_jax.build_model(cfg | CPU_FORM, seed=0)


def schedule(passes, **overrides):
  return dict(passes=passes, window=WINDOW, eviction="hard", context_len=CONTEXT) | overrides


def tokens(seed=0, batch=3):
  return np.random.default_rng(seed).integers(0, VOCAB, (batch, CONTEXT + PREDICT), np.int32)


def predictions(model, toks, **sleep):
  return np.asarray(sleep_jax.apply(model, toks, sleep_config=schedule(**sleep)))[:, CONTEXT:]


def loss_and_grads(model, toks, **sleep):
  graphdef, state = nnx.split(model)
  cfg = SleepConfig.from_config(schedule(**sleep))

  def loss(params):
    logits, _ = sleep_forward(graphdef, params, jnp.asarray(toks), cfg)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

  return jax.jit(jax.value_and_grad(loss))(nnx.to_pure_dict(state))


def test_relative_change_is_the_largest_blockwise_frobenius_ratio():
  old = (jnp.array([[[[3.0, 4.0]]], [[[0.0, 0.0]]]]), jnp.ones((2, 1, 1, 2)))
  new = (jnp.array([[[[3.0, 5.0]]], [[[1e-13, 0.0]]]]), jnp.full((2, 1, 1, 2), 1.5))
  # row 0: block 0 gives 1/5, block 1 gives 0.5 * sqrt(2) / sqrt(2); row 1: 1e-13 / 1e-12.
  np.testing.assert_allclose(relative_change(old, new), [0.5, 0.5], rtol=1e-6)


@pytest.mark.parametrize(
  "passes",
  [1, pytest.param(2, marks=pytest.mark.slow), pytest.param(4, marks=pytest.mark.integration)],
)
def test_converge_with_zero_tolerance_is_fixed_n_bit_for_bit(model, passes):
  toks = tokens(passes)
  never = loss_and_grads(model, toks, passes=passes)
  converge = loss_and_grads(model, toks, passes=passes, halt="converge", halt_tol=0.0)
  for a, b in zip(jax.tree.leaves(never), jax.tree.leaves(converge), strict=True):
    np.testing.assert_array_equal(a, b)


def test_converge_with_infinite_tolerance_is_one_pass(model):
  toks = tokens(7)
  np.testing.assert_array_equal(
    predictions(model, toks, passes=4, halt="converge", halt_tol=np.inf),
    predictions(model, toks, passes=1),
  )


def test_mixed_tol_halts_mid_way(model):
  toks = tokens(8)
  adaptive = predictions(model, toks, passes=4, halt="converge", halt_tol=MIXED_TOL)
  for n in (1, 2, 3, 4):
    assert np.max(np.abs(adaptive - predictions(model, toks, passes=n))) > 1e-3, n


def test_rows_halt_independently_each_as_it_would_alone(model):
  toks = tokens(9)
  batched = predictions(model, toks, passes=4, halt="converge", halt_tol=MIXED_TOL)
  for row in range(toks.shape[0]):
    alone = predictions(model, toks[row : row + 1], passes=4, halt="converge", halt_tol=MIXED_TOL)
    np.testing.assert_allclose(batched[row : row + 1], alone, rtol=1e-6, atol=1e-6)


def test_streaming_sleeps_by_the_same_rule_as_apply(model):
  toks = tokens(10, batch=2)
  sleep = schedule(3, halt="converge", halt_tol=MIXED_TOL)
  state = sleep_jax.stream_init(model, 2, sleep_config=sleep)
  streamed, _ = sleep_jax.stream_feed(model, state, toks, sleep_config=sleep)
  expected = predictions(model, toks, passes=3, halt="converge", halt_tol=MIXED_TOL)
  np.testing.assert_allclose(np.asarray(streamed)[:, CONTEXT:], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
  "overrides, field",
  [
    (dict(halt="sometimes"), "sleep.halt"),
    (dict(halt="converge", halt_tol=-0.1), "sleep.halt_tol"),
    (dict(halt="converge", halt_tol=float("nan")), "sleep.halt_tol"),
    (dict(ponder_cost=-1.0), "sleep.ponder_cost"),
    (dict(halt="learned", grad_passes=1), "sleep.grad_passes"),
    (dict(halt="converge", eviction="none"), "sleep.halt"),
    (dict(halt="converge", grad_passes=1), "sleep.grad_passes"),
  ],
)
def test_bad_halting_settings_name_the_field(overrides, field):
  with pytest.raises(ValueError, match=field.replace(".", r"\.")):
    SleepConfig.from_config(schedule(2, **overrides))


def reference_predictions(model, toks, passes, tol):
  """The rule as written, one row at a time in Python: passes until the state settles.

  Returns the prediction logits [B, P, vocab] and the passes each row took per window [B, W]."""
  logits, used = [], []
  stack_pass = nnx.jit(lambda model, h, state: model.stack_pass(h, state))
  for row in toks:
    state = zero_fast_state(model.cfg, 1)
    row_used = []
    for start in range(0, CONTEXT, WINDOW):
      h = model.embed(row[None, start : start + WINDOW])
      taken = 0
      while taken < passes:
        h, new = stack_pass(model, h, state)
        taken += 1
        change = max(
          float(jnp.linalg.norm(b - a) / max(float(jnp.linalg.norm(a)), 1e-12))
          for a, b in zip(state, new, strict=True)
        )
        state = new
        if change < tol:
          break
      row_used.append(taken)
    h, _ = stack_pass(model, model.embed(row[None, CONTEXT:]), state)
    logits.append(np.asarray(model.logits(h))[0])
    used.append(row_used)
  return np.stack(logits), np.array(used)


def test_converge_equals_the_rule_written_out_row_by_row(model):
  toks = tokens(11)
  expected, used = reference_predictions(model, toks, 4, MIXED_TOL)
  assert len(np.unique(used)) > 1  # windows halt at different passes: the masks are exercised
  np.testing.assert_allclose(
    predictions(model, toks, passes=4, halt="converge", halt_tol=MIXED_TOL),
    expected,
    rtol=1e-5,
    atol=1e-5,
  )


@pytest.mark.slow  # three compiles and a gradient: ~8 s
def test_gradients_through_the_halting_masks_match_finite_differences(model):
  """Between mask flips the loss is smooth: its directional derivative is the gradient's."""
  toks = tokens(12)
  graphdef, state = nnx.split(model)
  params = nnx.to_pure_dict(state)
  cfg = SleepConfig.from_config(schedule(4, halt="converge", halt_tol=MIXED_TOL))

  @jax.jit
  def loss(params):
    logits, _ = sleep_forward(graphdef, params, jnp.asarray(toks), cfg)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(0), len(leaves))
  direction = treedef.unflatten([jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
  along = lambda eps: jax.tree.map(lambda p, d: p + eps * d, params, direction)
  grad = jax.grad(loss)(params)
  analytic = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grad), jax.tree.leaves(direction)))
  central = lambda eps: (loss(along(eps)) - loss(along(-eps))) / (2 * eps)
  # Two step sizes agreeing says no mask flipped inside the interval.
  np.testing.assert_allclose(central(1e-4), central(5e-5), rtol=1e-2)
  np.testing.assert_allclose(central(1e-4), analytic, rtol=1e-2)


def test_inference_stops_the_passes_once_every_row_halted_with_the_masked_scans_values(model):
  toks = tokens(13)
  graphdef, state = nnx.split(model)
  params = nnx.to_pure_dict(state)
  cfg = SleepConfig.from_config(schedule(4, halt="converge", halt_tol=MIXED_TOL))
  forward = lambda early_stop: sleep_forward(
    graphdef, params, jnp.asarray(toks), cfg, None, early_stop
  )
  trained, _ = jax.jit(lambda: forward(False))()
  inferred, _ = jax.jit(lambda: forward(True))()
  np.testing.assert_array_equal(inferred, trained)
  primitives = lambda early_stop: str(jax.make_jaxpr(lambda: forward(early_stop))())
  # The while loop's condition reads whether any row still sleeps; training scans all N.
  assert "while" in primitives(True) and "reduce_or" in primitives(True)
  assert "while" not in primitives(False)


def test_the_state_change_bench_predicts_the_passes_converge_takes(model):
  """bench/state_change.py's r_n (fixed-N sleep) decides halting as halt="converge" does:
  a row's passes on its first window are the first n with r_n < tol (at most N)."""
  from bench import state_change

  toks = tokens(14, batch=6)
  changes = state_change.state_changes(model, toks, WINDOW, CONTEXT, 4)
  assert changes.shape == (6, CONTEXT // WINDOW, 4)
  tol = float(np.median(changes[:, 0, 1]))  # between the rows' r_2 on the first window
  graphdef, state = nnx.split(model)
  cfg = SleepConfig.from_config(schedule(4, halt="converge", halt_tol=tol))
  _, _, stats = jax.jit(
    lambda p: sleep_forward(graphdef, p, jnp.asarray(toks), cfg, with_stats=True)
  )(nnx.to_pure_dict(state))
  below = changes[:, 0] < tol  # the first window: both start from S = 0
  expected = np.where(below.any(axis=1), below.argmax(axis=1) + 1, 4)
  assert len(np.unique(expected)) > 1  # rows halt at different passes
  np.testing.assert_array_equal(stats.passes[:, 0], expected)
  summary = state_change.summarize_changes(changes)
  assert list(summary) == ["r2", "r3", "r4"]
  np.testing.assert_allclose(summary["r3"][2], np.median(changes[:, 1:, 2]))
