"""Adaptive sleep, halt="learned": adaptive computation time with the model's halting unit.

After pass n of a window, row b's unit gives a halting probability p_n. The row stops at the
first pass where p_1 + ... + p_n >= 1 - HALT_EPSILON (or at pass N); pass n < stop weighs
p_n, the stopping pass what remains, and the weighted mean of the passes' fast states (and
features) crosses the window. The toy layout of test_adaptive_sleep.py: 3 sleep chunks of 4
tokens, then a 3-token prediction chunk. A random unit (kernel scaled by UNIT_SCALE) halts rows
at different passes on different windows (checked below).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sleep_jax
from sleep_jax.model.lm import zero_fast_state
from sleep_jax.sleep.config import HALT_EPSILON, SleepConfig
from sleep_jax.sleep.consolidate import sleep_forward
from sleep_jax.train.metrics import summarize, window_sums
from tests.sleep.test_adaptive_sleep import (
  CONTEXT,
  CPU_FORM,
  VOCAB,
  WINDOW,
  loss_and_grads,
  predictions,
  schedule,
  tokens,
)

# The toy layout, schedule, tokens and loss of the halt="converge" tests.
MODEL = dict(vocab_size=VOCAB, pattern="AGAG", d_model=16, num_heads=2, head_dim=8, mlp_dim=32)
UNIT_SCALE = 3.0  # a random halting unit this large halts rows at 1..4 passes (checked)


def with_unit(model, kernel_scale=UNIT_SCALE, bias=0.0, seed=1):
  """`model` with its halting unit set: kernel random * kernel_scale, bias as given."""
  graphdef, state = nnx.split(model)
  params = nnx.to_pure_dict(state)
  shape = params["halting"]["kernel"].shape
  params["halting"]["kernel"] = kernel_scale * jax.random.normal(jax.random.key(seed), shape)
  params["halting"]["bias"] = jnp.full((1,), bias)
  nnx.replace_by_pure_dict(state, params)
  return nnx.merge(graphdef, state)


@pytest.fixture(scope="module")
def model():
  return with_unit(sleep_jax.build_model(MODEL | CPU_FORM | dict(halting_unit=True), seed=0))


def forward(model, toks, early_stop=False, **sleep):
  """(logits, fast state, WindowStats) of `sleep_forward`, jitted."""
  graphdef, state = nnx.split(model)
  cfg = SleepConfig.from_config(schedule(**sleep))
  run = lambda params: sleep_forward(
    graphdef, params, jnp.asarray(toks), cfg, early_stop=early_stop, with_stats=True
  )
  return jax.jit(run)(nnx.to_pure_dict(state))


def reference(model, toks, passes):
  """Adaptive computation time as written, one row at a time in Python.

  Returns the prediction logits [B, P, vocab], the passes taken [B, W] and the expected
  passes sum_n n * weight_n [B, W]."""
  stack_pass = nnx.jit(lambda model, h, state: model.stack_pass(h, state))
  halting = nnx.jit(lambda model, h: model.halting_logit(h))
  prior = 0.0 if passes == 1 else -math.log(passes - 1)
  logits, taken, expected = [], [], []
  for row in toks:
    state = zero_fast_state(model.cfg, 1)
    row_taken, row_expected = [], []
    for start in range(0, CONTEXT, WINDOW):
      h = model.embed(row[None, start : start + WINDOW])
      spent, mixed, expect = 0.0, None, 0.0
      for n in range(1, passes + 1):
        h, state = stack_pass(model, h, state)
        p = float(jax.nn.sigmoid(halting(model, h)[0] + prior))
        stop = n == passes or spent + p >= 1.0 - HALT_EPSILON
        weight = 1.0 - spent if stop else p
        term = [weight * np.asarray(s, np.float64) for s in state]
        mixed = term if mixed is None else [m + t for m, t in zip(mixed, term, strict=True)]
        expect += n * weight
        spent += p
        if stop:
          break
      state = tuple(jnp.asarray(m, jnp.float32) for m in mixed)
      row_taken.append(n)
      row_expected.append(expect)
    h, _ = stack_pass(model, model.embed(row[None, CONTEXT:]), state)
    logits.append(np.asarray(model.logits(h))[0])
    taken.append(row_taken)
    expected.append(row_expected)
  return np.stack(logits), np.array(taken), np.array(expected)


def test_learned_halting_is_adaptive_computation_time_written_out_row_by_row(model):
  toks = tokens(1, batch=4)
  expected_logits, taken, expected_passes = reference(model, toks, 4)
  assert len(np.unique(taken)) > 2  # rows halt at different passes: the masks are exercised
  logits, _, stats = forward(model, toks, passes=4, halt="learned")
  np.testing.assert_allclose(logits, expected_logits, rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(stats.passes, taken)
  np.testing.assert_allclose(stats.expected, expected_passes, rtol=1e-5)


def test_one_pass_learned_is_fixed_n_bit_for_bit_and_the_unit_gets_no_gradient(model):
  toks = tokens(2)
  never_loss, never = loss_and_grads(model, toks, passes=1)
  learned_loss, learned = loss_and_grads(model, toks, passes=1, halt="learned")
  assert never_loss == learned_loss
  for a, b in zip(jax.tree.leaves(never), jax.tree.leaves(learned), strict=True):
    np.testing.assert_array_equal(a, b)
  assert not np.any(learned["halting"]["kernel"]) and not np.any(learned["halting"]["bias"])


def test_a_unit_that_always_halts_sleeps_one_pass_and_one_that_never_does_sleeps_n(model):
  toks = tokens(3)
  always = with_unit(model, kernel_scale=0.0, bias=100.0)
  never = with_unit(model, kernel_scale=0.0, bias=-100.0)
  np.testing.assert_array_equal(
    predictions(always, toks, passes=4, halt="learned"), predictions(always, toks, passes=1)
  )
  # Passes 1..3 weigh sigmoid(-100 - log 3) ~ 1e-44: the last pass takes (all but) everything.
  np.testing.assert_allclose(
    predictions(never, toks, passes=4, halt="learned"),
    predictions(never, toks, passes=4),
    rtol=1e-6,
    atol=1e-6,
  )
  assert np.all(forward(always, toks, passes=4, halt="learned")[2].passes == 1)
  assert np.all(forward(never, toks, passes=4, halt="learned")[2].passes == 4)


def test_a_fresh_unit_weighs_all_n_passes_equally():
  fresh = sleep_jax.build_model(MODEL | CPU_FORM | dict(halting_unit=True), seed=0)
  _, _, stats = forward(fresh, tokens(4), passes=4, halt="learned")
  np.testing.assert_array_equal(stats.passes, 4)
  np.testing.assert_allclose(stats.expected, (1 + 2 + 3 + 4) / 4, rtol=1e-6)


def test_rows_halt_independently_each_as_it_would_alone(model):
  toks = tokens(5)
  batched = predictions(model, toks, passes=4, halt="learned")
  for row in range(toks.shape[0]):
    alone = predictions(model, toks[row : row + 1], passes=4, halt="learned")
    np.testing.assert_allclose(batched[row : row + 1], alone, rtol=1e-5, atol=1e-6)


def test_streaming_sleeps_by_the_same_rule_as_apply(model):
  toks = tokens(6, batch=2)
  sleep = schedule(3, halt="learned")
  state = sleep_jax.stream_init(model, 2, sleep_config=sleep)
  streamed, _ = sleep_jax.stream_feed(model, state, toks, sleep_config=sleep)
  expected = predictions(model, toks, passes=3, halt="learned")
  np.testing.assert_allclose(np.asarray(streamed)[:, CONTEXT:], expected, rtol=1e-5, atol=1e-5)


def test_inference_stops_once_every_row_halted_with_the_masked_scans_values(model):
  toks = tokens(7)
  trained = forward(model, toks, passes=4, halt="learned")
  inferred = forward(model, toks, early_stop=True, passes=4, halt="learned")
  for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(inferred), strict=True):
    np.testing.assert_array_equal(a, b)


def test_the_ponder_cost_pulls_toward_fewer_passes(model):
  """d(expected passes)/d(halting bias) < 0: a larger bias halts sooner."""
  graphdef, state = nnx.split(model)
  cfg = SleepConfig.from_config(schedule(4, halt="learned"))
  toks = jnp.asarray(tokens(8))

  def expected_passes(params):
    return jnp.mean(sleep_forward(graphdef, params, toks, cfg, with_stats=True)[2].expected)

  grads = jax.jit(jax.grad(expected_passes))(nnx.to_pure_dict(state))
  assert float(grads["halting"]["bias"][0]) < 0


@pytest.mark.slow  # three compiles and a gradient
def test_gradients_through_the_halting_weights_match_finite_differences(model):
  """Between changes of a row's stopping pass the loss is smooth in every parameter,
  the halting unit's included: its directional derivative is the gradient's."""
  toks = tokens(9)
  graphdef, state = nnx.split(model)
  params = nnx.to_pure_dict(state)
  cfg = SleepConfig.from_config(schedule(4, halt="learned", ponder_cost=0.1))

  @jax.jit
  def loss(params):
    logits, _, stats = sleep_forward(graphdef, params, jnp.asarray(toks), cfg, with_stats=True)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0]) + 0.1 * jnp.mean(stats.expected)

  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(0), len(leaves))
  direction = treedef.unflatten([jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
  along = lambda eps: jax.tree.map(lambda p, d: p + eps * d, params, direction)
  grad = jax.grad(loss)(params)
  assert np.any(grad["halting"]["kernel"])  # the unit learns through the weights
  analytic = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grad), jax.tree.leaves(direction)))
  central = lambda eps: (loss(along(eps)) - loss(along(-eps))) / (2 * eps)
  # Two step sizes agreeing says no stopping pass changed inside the interval.
  np.testing.assert_allclose(central(1e-4), central(5e-5), rtol=1e-2)
  np.testing.assert_allclose(central(1e-4), analytic, rtol=1e-2)


def test_window_sums_summarise_to_mean_passes_and_a_histogram():
  passes = jnp.array([[1, 4, 4], [2, 4, 1]])
  no_predictions = dict(loss=0.0, tokens=0.0, correct=0.0, exact=0.0, examples=0.0)
  no_predictions.update(position_correct=np.zeros(3), position_tokens=np.zeros(3))
  summary = summarize(no_predictions | window_sums(passes, passes.astype(jnp.float32), 4))
  assert summary["passes_mean"] == pytest.approx(16 / 6)
  assert [summary[f"passes_hist/{n}"] for n in (1, 2, 3, 4)] == pytest.approx(
    [2 / 6, 1 / 6, 0.0, 3 / 6]
  )


@pytest.mark.parametrize(
  "model_overrides, sleep_overrides, message",
  [
    (dict(pattern="AAAA"), dict(halt="learned"), "no gated-delta block"),
    (dict(pattern="AAAA"), dict(halt="converge", halt_tol=0.1), "no gated-delta block"),
    (dict(), dict(halt="learned"), "model.halting_unit=True"),
  ],
)
def test_a_model_that_cannot_halt_by_the_rule_is_refused_naming_the_fix(
  model_overrides, sleep_overrides, message
):
  plain = sleep_jax.build_model(MODEL | CPU_FORM | model_overrides, seed=0)
  with pytest.raises(ValueError, match=message):
    sleep_jax.apply(plain, tokens(0), sleep_config=schedule(2, **sleep_overrides))
