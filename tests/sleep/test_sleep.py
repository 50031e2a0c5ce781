"""Sleep semantics through the public API and the pure `sleep_forward`.

A toy layout keeps compiles short: 3 sleep chunks of 4 tokens, then a 3-token prediction chunk.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sleep_jax
from sleep_jax.model.lm import zero_fast_state
from sleep_jax.sleep.config import SleepConfig, training_flops_ratio
from sleep_jax.sleep.consolidate import sleep_forward

WINDOW, CHUNKS, PREDICT, VOCAB = 4, 3, 3, 7
CONTEXT = WINDOW * CHUNKS
# What "auto" lowers to on a CPU, named so that tracing outside a program skips the GPU and TPU
# kernels' branches too (sleep_jax.ops.gated_delta.api._by_platform).
CPU_FORM = dict(fast_weight_impl="chunked", attention_impl="xla")


def model_config(pattern="AGAG"):
  cfg = dict(vocab_size=VOCAB, pattern=pattern, d_model=16, num_heads=2, head_dim=8, mlp_dim=32)
  return cfg | CPU_FORM


def sleep_config(passes=1, **overrides):
  return (
    dict(
      passes=passes,
      window=WINDOW,
      eviction="hard",
      context_len=CONTEXT,
      grad_passes=None,
      remat=True,
    )
    | overrides
  )


def random_tokens(seed, batch=2):
  return np.random.default_rng(seed).integers(
    0, VOCAB, size=(batch, CONTEXT + PREDICT), dtype=np.int32
  )


def prediction_logits(model, tokens, **sleep_overrides):
  return np.asarray(
    sleep_jax.apply(model, tokens, sleep_config=sleep_config(**sleep_overrides))[:, CONTEXT:]
  )


@pytest.fixture(scope="module")
def hybrid():
  return sleep_jax.build_model(model_config("AGAG"), seed=0)


@pytest.fixture(scope="module")
def attention_only():
  return sleep_jax.build_model(model_config("AAAA"), seed=0)


def with_new_context(tokens, seed):
  changed = tokens.copy()
  changed[:, :CONTEXT] = random_tokens(seed)[:, :CONTEXT]
  assert not np.array_equal(changed, tokens)
  return changed


def test_apply_returns_float32_logits_with_zeros_at_sleep_positions(hybrid):
  logits = sleep_jax.apply(hybrid, random_tokens(0), sleep_config=sleep_config())
  assert logits.shape == (2, CONTEXT + PREDICT, VOCAB) and logits.dtype == jnp.float32
  np.testing.assert_array_equal(logits[:, :CONTEXT], 0.0)
  assert np.all(np.abs(np.asarray(logits[:, CONTEXT:])) > 0)


def test_attention_only_cannot_see_evicted_chunks_and_ignores_passes(attention_only):
  tokens = random_tokens(1)
  base = prediction_logits(attention_only, tokens)
  np.testing.assert_array_equal(
    prediction_logits(attention_only, with_new_context(tokens, 2)), base
  )
  np.testing.assert_array_equal(prediction_logits(attention_only, tokens, passes=3), base)


def test_hybrid_predictions_depend_on_evicted_tokens_and_on_passes(hybrid):
  tokens = random_tokens(1)
  base = prediction_logits(hybrid, tokens)
  assert np.max(np.abs(prediction_logits(hybrid, with_new_context(tokens, 2)) - base)) > 1e-4
  assert np.max(np.abs(prediction_logits(hybrid, tokens, passes=2) - base)) > 1e-4


def test_every_evicted_chunk_reaches_the_prediction(hybrid):
  tokens = random_tokens(3)
  base = prediction_logits(hybrid, tokens)
  for chunk in range(CHUNKS):
    changed = tokens.copy()
    changed[:, chunk * WINDOW] = (changed[:, chunk * WINDOW] + 1) % VOCAB
    assert np.max(np.abs(prediction_logits(hybrid, changed) - base)) > 1e-6, chunk


def test_prediction_chunk_is_causal(hybrid):
  tokens = random_tokens(4)
  base = prediction_logits(hybrid, tokens, passes=2)
  changed = tokens.copy()
  changed[:, -1] = (changed[:, -1] + 1) % VOCAB
  moved = prediction_logits(hybrid, changed, passes=2)
  np.testing.assert_array_equal(moved[:, :-1], base[:, :-1])
  assert np.max(np.abs(moved[:, -1] - base[:, -1])) > 1e-6


@pytest.mark.parametrize("passes", [1, 2])
def test_sleep_equals_a_hand_written_chunk_by_chunk_forward(hybrid, passes):
  tokens = random_tokens(5)
  state = zero_fast_state(hybrid.cfg, tokens.shape[0])
  for chunk in range(CHUNKS):
    h = hybrid.embed(tokens[:, chunk * WINDOW : (chunk + 1) * WINDOW])
    for _ in range(passes):
      h, state = hybrid.stack_pass(h, state)  # h is dropped after the chunk: only S survives
  h, _ = hybrid.stack_pass(hybrid.embed(tokens[:, CONTEXT:]), state)
  expected = np.asarray(hybrid.logits(h))
  np.testing.assert_allclose(
    prediction_logits(hybrid, tokens, passes=passes), expected, rtol=1e-5, atol=1e-5
  )


def loss_and_grads(model, tokens, fast_state, **sleep_overrides):
  graphdef, state = nnx.split(model)
  cfg = SleepConfig.from_config(sleep_config(**sleep_overrides))
  program = _loss_and_grads_program(graphdef, cfg)
  return program(nnx.to_pure_dict(state), fast_state, jnp.asarray(tokens))


@functools.cache
def _loss_and_grads_program(graphdef, cfg):
  """One jitted program per model and schedule, the tokens an argument (not a constant), so
  that tests asking for the same schedule share one compile."""

  def loss(params, fast_state, tokens):
    logits, _ = sleep_forward(graphdef, params, tokens, cfg, fast_state)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def incoming_state(model, seed, batch=2):
  keys = jax.random.split(jax.random.key(seed), model.cfg.num_fast_weight_layers)
  return tuple(
    0.1 * jax.random.normal(k, s.shape) for k, s in zip(keys, zero_fast_state(model.cfg, batch))
  )


@pytest.mark.integration  # three training gradients of the whole model
def test_grad_passes_blocks_gradients_to_the_earlier_passes(hybrid):
  tokens, s0 = random_tokens(6), incoming_state(hybrid, 0)
  full_loss, (full_params, full_s0) = loss_and_grads(hybrid, tokens, s0, passes=2)
  cut_loss, (cut_params, cut_s0) = loss_and_grads(hybrid, tokens, s0, passes=2, grad_passes=1)
  np.testing.assert_allclose(cut_loss, full_loss, rtol=1e-6)  # the forward is unchanged
  # The incoming state enters the first chunk's first pass: it gets no gradient when cut.
  assert all(float(jnp.abs(g).max()) > 0 for g in full_s0)
  assert all(float(jnp.abs(g).max()) == 0 for g in cut_s0)
  differs = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), full_params, cut_params)
  assert max(jax.tree.leaves(differs)) > 1e-6
  # grad_passes = passes is the same as no truncation.
  _, (same_params, _) = loss_and_grads(hybrid, tokens, s0, passes=2, grad_passes=2)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), same_params, full_params
  )


@pytest.mark.integration  # two training gradients of the whole model
def test_remat_gives_identical_gradients(hybrid):
  tokens, s0 = random_tokens(7), incoming_state(hybrid, 1)
  loss_a, grads_a = loss_and_grads(hybrid, tokens, s0, passes=2, remat=True)
  loss_b, grads_b = loss_and_grads(hybrid, tokens, s0, passes=2, remat=False)
  np.testing.assert_allclose(loss_a, loss_b, rtol=1e-6)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads_a, grads_b
  )


@pytest.mark.integration  # two training gradients of the whole model per eviction
@pytest.mark.parametrize("eviction", ["hard", "sliding"])
def test_unrolled_loops_give_the_same_values_and_gradients(hybrid, eviction):
  # Unrolled, the chunks and passes are straight-line code (fewer GPU kernels), and the last
  # pass's KV still crosses into the next chunk under sliding eviction.
  tokens, s0 = random_tokens(8), incoming_state(hybrid, 2)
  loss_a, grads_a = loss_and_grads(hybrid, tokens, s0, passes=2, eviction=eviction)
  loss_b, grads_b = loss_and_grads(
    hybrid, tokens, s0, passes=2, eviction=eviction, unroll=True, remat=False
  )
  np.testing.assert_allclose(loss_a, loss_b, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):  # to float32 rounding
    assert np.max(np.abs(a - b)) <= 1e-5 * np.max(np.abs(b))


@pytest.mark.parametrize(
  "overrides, message",
  [
    (dict(passes=0), "passes"),
    (dict(window=5), "does not tile"),
    (dict(eviction="soft"), "unknown sleep.eviction"),
    (dict(conv_state="sometimes"), "unknown sleep.conv_state"),
    (dict(predict_chunks=(1, 3)), "set sleep.context_len=4"),
    (dict(predict_chunks=(3, 3)), "distinct chunk indices"),
    (dict(predict_chunks=(3, 9)), "has 4 chunks"),
    (dict(grad_passes=3, passes=2), "grad_passes"),
    (dict(bogus=1), "unknown sleep config fields"),
  ],
)
def test_bad_sleep_config_is_a_clear_error(hybrid, overrides, message):
  with pytest.raises(ValueError, match=message):
    sleep_jax.apply(hybrid, random_tokens(0), sleep_config=sleep_config(**overrides))


def test_a_sequence_without_prediction_positions_is_an_error(hybrid):
  tokens = np.zeros((1, CONTEXT), np.int32)
  with pytest.raises(ValueError, match="no prediction positions"):
    sleep_jax.apply(hybrid, tokens, sleep_config=sleep_config())


def test_no_eviction_is_one_plain_pass_over_the_whole_sequence(hybrid):
  tokens = random_tokens(8)
  # The same as hard eviction with no context and one window spanning the sequence.
  expected = np.asarray(
    sleep_jax.apply(
      hybrid, tokens, sleep_config=sleep_config(context_len=0, window=CONTEXT + PREDICT)
    )
  )[:, CONTEXT:]
  np.testing.assert_allclose(
    prediction_logits(hybrid, tokens, eviction="none"), expected, rtol=1e-5, atol=1e-5
  )
  # The whole sequence is one chunk, so a prediction span longer than the window is fine.
  cfg = SleepConfig.from_config(sleep_config(eviction="none"))
  assert len(cfg.chunks(CONTEXT + WINDOW + 1)) == 1


@pytest.mark.parametrize("eviction, sees_context", [("hard", False), ("none", True)])
def test_attention_only_sees_the_context_only_without_eviction(
  attention_only, eviction, sees_context
):
  # Context tokens 0..3, prediction tokens 4..6: the gradient of the prediction logits
  # w.r.t. the embedding rows 0..3 measures what reaches the predictions from the context.
  rng = np.random.default_rng(9)
  tokens = np.concatenate(
    [rng.integers(0, 4, (2, CONTEXT)), rng.integers(4, VOCAB, (2, PREDICT))], 1
  ).astype(np.int32)
  graphdef, state = nnx.split(attention_only)
  cfg = SleepConfig.from_config(sleep_config(eviction=eviction))
  assert attention_only.cfg.num_fast_weight_layers == 0
  assert zero_fast_state(attention_only.cfg, 2) == ()

  def prediction_total(params):
    logits, fast_state = sleep_forward(graphdef, params, tokens, cfg)
    assert fast_state == ()
    return jnp.sum(logits * jnp.arange(VOCAB))

  grads = jax.jit(jax.grad(prediction_total))(nnx.to_pure_dict(state))
  context_grad = float(jnp.abs(grads["embedding"][:4]).max())
  assert (context_grad > 0) == sees_context, context_grad
  assert float(jnp.abs(grads["embedding"][4:]).max()) > 0


def test_no_eviction_needs_exactly_one_pass(hybrid):
  with pytest.raises(ValueError, match="passes must be 1"):
    sleep_jax.apply(hybrid, random_tokens(0), sleep_config=sleep_config(passes=2, eviction="none"))


def test_training_flops_ratio_counts_tokens_through_the_stack():
  assert training_flops_ratio(1, 96, 24, 100) == 1.0
  assert training_flops_ratio(3, 96, 24, 100) == pytest.approx((3 * 96 + 4) / 100)
  assert training_flops_ratio(4, 300, 75, 360) == pytest.approx(3.5)
  with pytest.raises(ValueError, match="does not tile"):
    training_flops_ratio(2, 96, 25, 100)
  with pytest.raises(ValueError, match="no prediction positions"):
    training_flops_ratio(2, 96, 24, 96)
