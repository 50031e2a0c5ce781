"""Streaming wake/sleep inference: the same predictions as `apply`, at a constant state size."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sleep_jax
from sleep_jax.sleep import stream

L, CONTEXT, PREDICT, VOCAB = 4, 12, 3, 7
# What "auto" lowers to on a CPU, named so that tracing outside a program skips the GPU and TPU
# kernels' branches too (sleep_jax.ops.gated_delta.api._by_platform).
CPU_FORM = dict(fast_weight_impl="chunked", attention_impl="xla")


@pytest.fixture(scope="module")
def model():
  cfg = dict(vocab_size=VOCAB, pattern="AGAG", d_model=16, num_heads=2, head_dim=8, mlp_dim=32)
  return sleep_jax.build_model(cfg | CPU_FORM, seed=0)


def schedule(passes=1, eviction="hard", conv_state="reset"):
  return dict(
    passes=passes, window=L, eviction=eviction, context_len=CONTEXT, conv_state=conv_state
  )


def tokens(length=CONTEXT + PREDICT, seed=0, batch=2):
  return np.random.default_rng(seed).integers(0, VOCAB, (batch, length), dtype=np.int32)


def feed(model, toks, sleep, pieces=None):
  """Feeds `toks` in pieces of the given lengths (default: all at once)."""
  state = sleep_jax.stream_init(model, toks.shape[0], sleep_config=sleep)
  logits, start = [], 0
  for length in pieces or [toks.shape[1]]:
    out, state = sleep_jax.stream_feed(
      model, state, toks[:, start : start + length], sleep_config=sleep
    )
    logits.append(np.asarray(out))
    start += length
  return np.concatenate(logits, axis=1), state


@pytest.mark.parametrize(
  "passes, eviction, conv_state",
  [(1, "hard", "reset"), (3, "hard", "reset"), (2, "sliding", "carry"), (3, "sliding", "reset")],
)
def test_feeding_context_then_prediction_chunk_returns_applys_logits(
  model, passes, eviction, conv_state
):
  sleep = schedule(passes, eviction, conv_state)
  toks = tokens(seed=passes)
  expected = np.asarray(sleep_jax.apply(model, toks, sleep_config=sleep))[:, CONTEXT:]
  streamed, _ = feed(model, toks, sleep)
  assert streamed.shape == (2, CONTEXT + PREDICT, VOCAB) and streamed.dtype == np.float32
  np.testing.assert_allclose(streamed[:, CONTEXT:], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
  "passes, eviction, conv_state",
  [
    (1, "hard", "reset"),
    pytest.param(3, "hard", "carry", marks=pytest.mark.slow),
    pytest.param(1, "sliding", "carry", marks=pytest.mark.slow),
    pytest.param(3, "sliding", "reset", marks=pytest.mark.integration),
  ],
)
def test_block_prefill_equals_feeding_token_by_token(model, passes, eviction, conv_state):
  """Blocks that start and end mid-window, fill it exactly, span several windows; logits and
  every leaf of the state (the caches included) as token-by-token feeding leaves them."""
  sleep = schedule(passes, eviction, conv_state)
  toks = tokens(length=21, seed=5)
  by_token, token_state = feed(model, toks, sleep, pieces=[1] * 21)
  pieces = [3, 7, 6, 5]  # positions 0 -> 3 -> 2 -> 0 -> 1 (L = 4)
  by_block, block_state = feed(model, toks, sleep, pieces=pieces)
  np.testing.assert_allclose(by_block, by_token, rtol=1e-5, atol=1e-5)
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  jax.tree.map(close, block_state, token_state)
  np.testing.assert_array_equal(block_state.position, [21 % L] * 2)


def _scan_lengths(jaxpr) -> list[int]:
  """The lengths of every `lax.scan` in a jaxpr, nested ones included."""
  lengths = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "scan":
      lengths.append(eqn.params["length"])
    for value in eqn.params.values():
      for sub in value if isinstance(value, tuple) else (value,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          lengths += _scan_lengths(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          lengths += _scan_lengths(sub)
  return lengths


def test_a_block_is_whole_passes_not_a_scan_over_tokens(model):
  """The block path runs one pass per piece, a scan over whole windows, none over tokens."""
  assert stream.block_plan(0, 3 * L + 1, L) == (0, False, 3, 1)
  assert stream.block_plan(3, 1, L) == (1, True, 0, 0)
  assert stream.block_plan(1, 2, L) == (2, False, 0, 0)
  assert stream.block_plan(2, 2 * L + 2, L) == (2, True, 2, 0)
  sleep = schedule(2, "hard")
  state = sleep_jax.stream_init(model, 2, sleep_config=sleep)
  graphdef, params = nnx.split(model)
  args = (graphdef, nnx.to_pure_dict(params), state, tokens(3 * L + 1))
  blocks = jax.make_jaxpr(stream._feed_blocks, static_argnums=(0, 4, 5))(
    *args, (0, False, 3, 1), True
  )
  assert 3 in _scan_lengths(blocks.jaxpr) and 3 * L + 1 not in _scan_lengths(blocks.jaxpr)
  by_token = jax.make_jaxpr(stream._feed, static_argnums=0)(*args)
  assert 3 * L + 1 in _scan_lengths(by_token.jaxpr)  # the check sees a scan over tokens


def test_wake_is_one_pass_whatever_n_and_sleep_uses_n(model):
  toks = tokens(length=2 * L, seed=6)
  one, _ = feed(model, toks, schedule(passes=1))
  four, _ = feed(model, toks, schedule(passes=4))
  np.testing.assert_array_equal(one[:, :L], four[:, :L])  # the first window: nothing slept yet
  assert np.max(np.abs(one[:, L:] - four[:, L:])) > 1e-4  # after its sleep the passes show


@pytest.mark.parametrize("eviction, kv_tokens", [("hard", L), ("sliding", 2 * L - 1)])
def test_the_state_has_a_fixed_size_however_much_is_fed(model, eviction, kv_tokens):
  sleep = schedule(2, eviction)
  state = sleep_jax.stream_init(model, 2, sleep_config=sleep)
  shapes = jax.tree.map(lambda x: (x.shape, x.dtype), state)
  size = stream.state_bytes(state)
  for seed, length in enumerate((3, 9, 17)):
    _, state = sleep_jax.stream_feed(model, state, tokens(length, seed), sleep_config=sleep)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == shapes
    assert stream.state_bytes(state) == size
  np.testing.assert_array_equal(state.position, [(3 + 9 + 17) % L] * 2)
  # Per attention block: L buffered tokens (+ L-1 remembered under sliding eviction).
  kv = state.window_kv[0][0].shape[1] + (
    0 if state.window_start.memory is None else state.window_start.memory[0][0].shape[1]
  )
  assert kv == kv_tokens


def test_a_feed_compiles_once_per_shape(model):
  sleep = schedule(3, "sliding", "reset")
  state = sleep_jax.stream_init(model, 2, sleep_config=sleep)
  _, state = sleep_jax.stream_feed(model, state, tokens(1, 0), sleep_config=sleep)
  compiled = stream._feed._cache_size()
  for seed in range(2):
    _, state = sleep_jax.stream_feed(model, state, tokens(1, seed), sleep_config=sleep)
  assert stream._feed._cache_size() == compiled
  # A block compiles once per split at window ends: at position 3, 4 tokens are 1 (and a
  # sleep) + 3, which leave position 3 again.
  before = stream._feed_blocks._cache_size()
  for seed in range(2):
    _, state = sleep_jax.stream_feed(model, state, tokens(4, 9 + seed), sleep_config=sleep)
  assert stream._feed_blocks._cache_size() == before + 1


def test_bad_input_is_a_clear_error(model):
  sleep = schedule()
  state = sleep_jax.stream_init(model, 2, sleep_config=sleep)
  with pytest.raises(ValueError, match=r"\[0, vocab_size=7\)"):
    sleep_jax.stream_feed(model, state, np.full((2, 3), VOCAB), sleep_config=sleep)
  with pytest.raises(ValueError, match="holds 2 rows but 3 were fed"):
    sleep_jax.stream_feed(model, state, tokens(3, batch=3), sleep_config=sleep)
  with pytest.raises(ValueError, match="start a new stream"):
    sleep_jax.stream_feed(model, state, tokens(3), sleep_config=schedule(passes=2))
  with pytest.raises(ValueError, match="at least one token"):
    sleep_jax.stream_feed(model, state, tokens(0), sleep_config=sleep)
  full_attention = dict(passes=1, eviction="none", context_len=0)
  with pytest.raises(ValueError, match="cache size"):
    sleep_jax.stream_init(model, 2, sleep_config=full_attention)
  with pytest.raises(ValueError, match="max_len=5 is for the full-attention decoder"):
    sleep_jax.stream_init(model, 2, sleep_config=sleep, max_len=5)
  decoder = sleep_jax.stream_init(model, 2, sleep_config=full_attention, max_len=5)
  with pytest.raises(ValueError, match="holds max_len=5 tokens.*to 6"):
    sleep_jax.stream_feed(model, decoder, tokens(6), sleep_config=full_attention)


def test_greedy_generation_feeds_back_the_argmax(model):
  sleep = schedule(2, "sliding")
  prompt = tokens(6, seed=3)
  generated = np.asarray(sleep_jax.generate(model, prompt, sleep_config=sleep, max_new_tokens=7))
  assert generated.shape == (2, 7)
  # By hand: the argmax of the last logits, fed back one token at a time (windows fill twice).
  logits, state = sleep_jax.stream_feed(
    model, sleep_jax.stream_init(model, 2, sleep_config=sleep), prompt, sleep_config=sleep
  )
  expected = []
  for _ in range(7):
    token = np.asarray(jnp.argmax(logits[:, -1], axis=-1), np.int32)
    expected.append(token)
    logits, state = sleep_jax.stream_feed(model, state, token[:, None], sleep_config=sleep)
  np.testing.assert_array_equal(generated, np.stack(expected, 1))
  # Sampling is reproducible from its key and stays in the vocabulary.
  sample = lambda seed: np.asarray(
    sleep_jax.generate(
      model, prompt, sleep_config=sleep, max_new_tokens=7, temperature=1.0,
      rng=jax.random.key(seed),
    )
  )  # fmt: skip
  np.testing.assert_array_equal(sample(1), sample(1))
  assert sample(1).min() >= 0 and sample(1).max() < VOCAB
