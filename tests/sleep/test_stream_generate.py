"""Generation: sampling's supports, stop tokens per row, ragged prompts, the full-attention
decoder, and bad input refused before anything compiles."""

import jax
import numpy as np
import pytest

import sleep_jax
from sleep_jax.sleep import generate as generation
from sleep_jax.sleep import stream

L, VOCAB = 4, 11
CPU_FORM = dict(fast_weight_impl="chunked", attention_impl="xla")
SLEEP = dict(passes=2, window=L, eviction="hard", context_len=0)


@pytest.fixture(scope="module")
def model():
  cfg = dict(vocab_size=VOCAB, pattern="AGAG", d_model=16, num_heads=2, head_dim=8, mlp_dim=32)
  return sleep_jax.build_model(cfg | CPU_FORM, seed=1)


def draws(logits, sampling, num=4000):
  """`num` samples per row of fixed logits [B, V], one key each: [num, B]."""
  keys = jax.random.split(jax.random.key(0), num)
  return np.asarray(jax.vmap(lambda key: generation.sample(logits, key, sampling))(keys))


LOGITS = np.random.default_rng(0).normal(size=(2, 12)).astype(np.float32)


def test_top_k_never_emits_a_token_outside_the_k_best():
  samples = draws(LOGITS, generation.Sampling(temperature=1.5, top_k=4))
  for row in range(2):
    best = set(np.argsort(-LOGITS[row])[:4])
    assert set(samples[:, row]) == best  # every one of the k, and nothing else


def test_top_p_never_emits_a_token_outside_the_nucleus():
  for top_p in (0.3, 0.75):
    samples = draws(LOGITS, generation.Sampling(temperature=1.0, top_p=top_p))
    for row in range(2):
      probs = np.exp(LOGITS[row] - LOGITS[row].max())
      probs /= probs.sum()
      order = np.argsort(-probs)
      size = int(np.searchsorted(np.cumsum(probs[order]), top_p) + 1)  # fewest reaching top_p
      assert set(samples[:, row]) == set(order[:size])


def test_temperature_sharpens_and_greedy_is_the_argmax():
  greedy = draws(LOGITS, generation.Sampling(), num=3)
  np.testing.assert_array_equal(greedy, np.broadcast_to(LOGITS.argmax(-1), (3, 2)))
  hot = draws(LOGITS, generation.Sampling(temperature=5.0))
  cold = draws(LOGITS, generation.Sampling(temperature=0.2))
  top_share = lambda s: np.mean(s == LOGITS.argmax(-1))
  assert top_share(cold) > top_share(hot) + 0.3


def test_ragged_prompts_generate_what_each_row_generates_alone(model):
  """Rows of 3 and 6 tokens (window 4): each sleeps when its own window fills."""
  rng = np.random.default_rng(4)
  prompts = [rng.integers(0, VOCAB, n).tolist() for n in (3, 6)]
  run = lambda rows: np.asarray(
    sleep_jax.generate(model, rows, sleep_config=SLEEP, max_new_tokens=6)
  )
  together = run(prompts)
  np.testing.assert_array_equal(together, np.concatenate([run([p]) for p in prompts]))
  assert not np.array_equal(together[0], together[1])


def test_feeding_rows_at_different_positions_equals_feeding_each_alone(model):
  sleep = dict(SLEEP, eviction="sliding", conv_state="carry")
  rng = np.random.default_rng(5)
  prompts = [rng.integers(0, VOCAB, (1, n)) for n in (2, 7)]
  rest = rng.integers(0, VOCAB, (2, 5))
  alone = []
  for row, prompt in enumerate(prompts):
    state = sleep_jax.stream_init(model, 1, sleep_config=sleep)
    _, state = sleep_jax.stream_feed(model, state, prompt, sleep_config=sleep)
    alone.append(sleep_jax.stream_feed(model, state, rest[row : row + 1], sleep_config=sleep))
  states = []
  for prompt in prompts:
    state = sleep_jax.stream_init(model, 1, sleep_config=sleep)
    states.append(sleep_jax.stream_feed(model, state, prompt, sleep_config=sleep)[1])
  ragged = stream.stack_streams(states)
  assert stream.common_position(ragged) is None
  logits, state = sleep_jax.stream_feed(model, ragged, rest, sleep_config=sleep)
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  close(logits, np.concatenate([a[0] for a in alone]))
  jax.tree.map(close, state, stream.stack_streams([a[1] for a in alone]))


def test_a_stop_token_ends_its_row_only(model):
  prompt = np.random.default_rng(6).integers(0, VOCAB, (2, 5))
  run = lambda **stop: np.asarray(
    sleep_jax.generate(
      model, prompt, sleep_config=SLEEP, max_new_tokens=8, temperature=1.0, seed=3, **stop
    )
  )
  free = run()
  # A token row 0 emits before row 1 does (if row 1 emits it at all).
  first = lambda row, token: list(row).index(token) if token in row else len(row)
  stop = next(t for t in free[0] if first(free[0], t) < first(free[1], t))
  stopped = run(stop_tokens=[stop])
  for row in range(2):
    end = first(free[row], stop)
    np.testing.assert_array_equal(stopped[row, : end + 1], free[row, : end + 1])
    assert (stopped[row, end + 1 :] == generation.PAD).all()
  assert first(free[1], stop) > first(free[0], stop)  # row 1 went on past row 0's stop
  # Step by step (for text shown as it comes): the same tokens, and no step after all stop.
  steps = list(
    generation.generate_stream(
      model, prompt, sleep_config=SLEEP, max_new_tokens=8, temperature=1.0, seed=3,
      stop_tokens=[stop],
    )
  )  # fmt: skip
  ends = [first(free[row], stop) for row in range(2)]
  assert len(steps) == min(8, max(ends) + 1)
  np.testing.assert_array_equal(np.stack(steps, 1), stopped[:, : len(steps)])


def test_sampling_is_reproducible_from_its_seed_and_stays_in_the_vocabulary(model):
  prompt = np.random.default_rng(7).integers(0, VOCAB, (2, 6))
  run = lambda seed: np.asarray(
    sleep_jax.generate(
      model, prompt, sleep_config=SLEEP, max_new_tokens=10, temperature=1.0, top_k=5, seed=seed
    )
  )
  np.testing.assert_array_equal(run(1), run(1))
  assert not np.array_equal(run(1), run(2))
  assert run(3).min() >= 0 and run(3).max() < VOCAB


def test_the_full_attention_decoder_is_applys_causal_lm(model):
  """eviction="none": a KV cache of every token; feeding equals `apply` over the sequence."""
  sleep = dict(passes=1, eviction="none", context_len=0)
  toks = np.random.default_rng(8).integers(0, VOCAB, (2, 9))
  expected = np.asarray(sleep_jax.apply(model, toks, sleep_config=sleep))
  state = sleep_jax.stream_init(model, 2, sleep_config=sleep, max_len=12)
  first, state = sleep_jax.stream_feed(model, state, toks[:, :6], sleep_config=sleep)
  rest, state = sleep_jax.stream_feed(model, state, toks[:, 6:7], sleep_config=sleep)
  last, state = sleep_jax.stream_feed(model, state, toks[:, 7:], sleep_config=sleep)
  streamed = np.concatenate([first, rest, last], axis=1)
  np.testing.assert_allclose(streamed, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
  "options, message",
  [
    (dict(top_p=0.0), r"top_p must lie in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must lie in \(0, 1\]"),
    (dict(top_k=0), "top_k must be an integer >= 1"),
    (dict(temperature=-1.0), "temperature must be >= 0"),
    (dict(prompt=[[1, 2], []]), "prompt row 1 is empty"),
    (dict(prompt=np.zeros((2, 0), np.int32)), "prompt row 0 is empty"),
    (dict(prompt=[[1, VOCAB]]), r"outside the model's vocabulary \[0, 11\)"),
    (dict(stop_tokens=[VOCAB]), "stop_tokens"),
    (dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
  ],
)
def test_bad_input_is_a_clear_error_before_compiling(model, options, message):
  compiled = generation._decode._cache_size()
  prompt = options.pop("prompt", [[1, 2, 3]])
  options = dict(max_new_tokens=3, temperature=1.0) | options
  with pytest.raises(ValueError, match=message):
    sleep_jax.generate(model, prompt, sleep_config=SLEEP, **options)
  assert generation._decode._cache_size() == compiled
