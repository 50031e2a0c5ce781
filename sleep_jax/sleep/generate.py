"""Generation on a stream: prompts in (of one length or ragged), sampled tokens out.

    tokens = sleep_jax.generate(model, prompts, sleep_config=config.sleep, max_new_tokens=32,
                                temperature=0.8, top_k=40, top_p=0.95, stop_tokens=[2], seed=0)

The prompts are prefilled by whole passes (`stream.prefill`); prompts of different lengths are
prefilled apart, one block per length, and then share one batch in which every row stands at
its own position and sleeps when its own window fills (`stream.stack_streams`). Decoding is one
jitted `lax.while_loop`: sample a token per row from the last logits, feed it back (one wake
pass; a sleep for the rows whose window it fills), until `max_new_tokens` or every row has met a
stop token. A row that meets a stop token keeps it as its last token; its later places hold
`PAD` (-1), and the other rows go on.

Sampling: temperature 0 is greedy (argmax). Otherwise the logits are divided by the
temperature, cut to the `top_k` largest (exactly k tokens) and then to the nucleus (the fewest
most likely tokens whose probabilities sum to at least `top_p`), and sampled; the key of step i
is `fold_in(key(seed), i)`, so a seed reproduces a generation.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sleep_jax.model.lm import HybridLM
from sleep_jax.sleep import stream
from sleep_jax.sleep.config import SleepConfig

PAD = -1  # the places after a row's stop token


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How a token is drawn from logits (checked on construction, before anything compiles).

  Attributes:
    temperature: 0 greedy; above 0 the logits are divided by it.
    top_k: keep the k largest logits (None: all).
    top_p: keep the nucleus of probability top_p in (0, 1] (None or 1: all).
  """

  temperature: float = 0.0
  top_k: int | None = None
  top_p: float | None = None

  def __post_init__(self):
    if not self.temperature >= 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if self.top_k is not None and (int(self.top_k) != self.top_k or self.top_k < 1):
      raise ValueError(f"top_k must be an integer >= 1 (or None: all tokens), got {self.top_k}")
    if self.top_p is not None and not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must lie in (0, 1] (or None: no nucleus cut), got {self.top_p}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0


def filter_logits(logits_bv: jax.Array, sampling: Sampling) -> jax.Array:
  """Logits over temperature, -inf outside the top-k tokens and outside the nucleus."""
  logits = logits_bv.astype(jnp.float32) / sampling.temperature
  rows = jnp.arange(logits.shape[0])[:, None]
  if sampling.top_k is not None and sampling.top_k < logits.shape[-1]:
    _, best = jax.lax.top_k(logits, sampling.top_k)
    kept = jnp.zeros(logits.shape, bool).at[rows, best].set(True)
    logits = jnp.where(kept, logits, -jnp.inf)
  if sampling.top_p is not None and sampling.top_p < 1:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the more likely tokens
    in_nucleus = before < sampling.top_p  # the most likely token always
    kept = jnp.zeros(logits.shape, bool).at[rows, order].set(in_nucleus)
    logits = jnp.where(kept, logits, -jnp.inf)
  return logits


def sample(logits_bv: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
  """One token per row [B] int32 from logits [B, vocab]."""
  if sampling.greedy:
    return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
  return jax.random.categorical(key, filter_logits(logits_bv, sampling), axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6))
def _decode(graphdef, params, state, last_logits, num_tokens, sampling, stop_tokens, rng):
  batch = last_logits.shape[0]
  stops = jnp.asarray(stop_tokens, jnp.int32)

  def running(carry):
    step, _, _, active, _ = carry
    return (step < num_tokens) & jnp.any(active)

  def one_token(carry):
    step, state, logits, active, out = carry
    token = sample(logits, jax.random.fold_in(rng, step), sampling)
    out = out.at[:, step].set(jnp.where(active, token, PAD))
    if stop_tokens:
      active = active & ~jnp.isin(token, stops)
    logits, state = stream._feed(graphdef, params, state, token[:, None])
    return step + 1, state, logits[:, -1], active, out

  carry = (
    jnp.zeros((), jnp.int32),
    state,
    last_logits,
    jnp.ones((batch,), bool),
    jnp.full((batch, num_tokens), PAD, jnp.int32),
  )
  _, state, _, _, out = jax.lax.while_loop(running, one_token, carry)
  return out, state


def _prompt_rows(prompt_tokens, vocab_size: int) -> list[np.ndarray]:
  """The prompts as a list of 1-D int32 rows: a [B, T] array or a list of sequences."""
  if isinstance(prompt_tokens, (list, tuple)):
    rows = [np.asarray(row) for row in prompt_tokens]
  else:
    array = np.asarray(prompt_tokens)
    if array.ndim != 2:
      raise ValueError(f"prompt_tokens must be [batch, T] or a list of rows, got {array.shape}")
    rows = list(array)
  if not rows:
    raise ValueError("no prompts: give at least one row")
  for i, row in enumerate(rows):
    if row.ndim != 1 or row.size == 0:
      raise ValueError(f"prompt row {i} is empty or not 1-D (shape {row.shape}): every row needs "
                       "at least one token")  # fmt: skip
    if not np.issubdtype(row.dtype, np.integer):
      raise ValueError(f"prompt row {i} holds {row.dtype}, not token ids")
    if row.min() < 0 or row.max() >= vocab_size:
      raise ValueError(
        f"prompt row {i} has token ids in [{row.min()}, {row.max()}], outside the model's "
        f"vocabulary [0, {vocab_size})"
      )
  return [row.astype(np.int32) for row in rows]


def prefill_rows(
  model: HybridLM, rows: list[np.ndarray], *, sleep_config, max_len: int | None = None
) -> tuple[jax.Array, stream.StreamState]:
  """Prompts of any lengths prefilled into one stream (rows in order, each at its own
  position): the last logits [B, vocab] and the state. Rows of one length share a block."""
  by_length: dict[int, list[int]] = {}
  for i, row in enumerate(rows):
    by_length.setdefault(len(row), []).append(i)
  logits, states, order = [], [], []
  for members in by_length.values():
    group = np.stack([rows[i] for i in members])
    last, state = stream.prefill(model, group, sleep_config=sleep_config, max_len=max_len)
    logits.append(last)
    states.append(state)
    order += members
  if len(states) == 1:
    return logits[0], states[0]
  back = np.argsort(order)  # row i of the result is prompt i
  state = jax.tree.map(lambda x: x[back], stream.stack_streams(states))
  return jnp.concatenate(logits)[back], state


def _start(model, prompt_tokens, sleep_config, max_new_tokens, stop_tokens):
  """Checks every argument (before anything compiles) and prefills: (stop ids, last logits,
  state)."""
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  stop_tokens = tuple(int(t) for t in np.atleast_1d(np.asarray(stop_tokens, np.int64)))
  vocab = model.cfg.vocab_size
  if any(not 0 <= t < vocab for t in stop_tokens):
    raise ValueError(f"stop_tokens {stop_tokens} must lie in the vocabulary [0, {vocab})")
  rows = _prompt_rows(prompt_tokens, vocab)
  cfg = SleepConfig.from_config(sleep_config)
  max_len = None if cfg.evicts else max(map(len, rows)) + max_new_tokens
  last, state = prefill_rows(model, rows, sleep_config=cfg, max_len=max_len)
  return stop_tokens, last, state


def generate(
  model: HybridLM,
  prompt_tokens,
  *,
  sleep_config,
  max_new_tokens: int,
  temperature: float = 0.0,
  top_k: int | None = None,
  top_p: float | None = None,
  stop_tokens=(),
  seed: int = 0,
  rng: jax.Array | None = None,
) -> jax.Array:
  """Prefills prompts, then samples `max_new_tokens` tokens per row [B, max_new_tokens].

  Args:
    model: the model.
    prompt_tokens: [B, T] token ids, or a list of B rows of any lengths >= 1 (ragged).
    sleep_config: `config.sleep`; eviction "none" decodes with a full-attention KV cache of
      the longest prompt plus `max_new_tokens` tokens.
    max_new_tokens: tokens to generate per row (fewer run when every row has stopped).
    temperature, top_k, top_p: `Sampling` (temperature 0: greedy, the others unused).
    stop_tokens: token ids that end a row (kept as its last token; PAD after it).
    seed: the sampling seed (ignored when `rng` is given).
    rng: a `jax.random.key` to sample with instead of `seed`'s.

  Returns:
    int32 [B, max_new_tokens]: the sampled tokens, PAD (-1) after a row's stop token.
  """
  sampling = Sampling(temperature, top_k, top_p)
  stop_tokens, last, state = _start(model, prompt_tokens, sleep_config, max_new_tokens, stop_tokens)
  graphdef, params = nnx.split(model)
  rng = jax.random.key(seed) if rng is None else rng
  tokens, _ = _decode(
    graphdef, nnx.to_pure_dict(params), state, last, max_new_tokens, sampling, stop_tokens, rng
  )
  return tokens


@functools.partial(jax.jit, static_argnums=(0, 4))
def _decode_step(graphdef, params, state, logits, sampling, rng, step):
  token = sample(logits, jax.random.fold_in(rng, step), sampling)
  logits, state = stream._feed(graphdef, params, state, token[:, None])
  return token, logits[:, -1], state


def generate_stream(
  model: HybridLM,
  prompt_tokens,
  *,
  sleep_config,
  max_new_tokens: int,
  temperature: float = 0.0,
  top_k: int | None = None,
  top_p: float | None = None,
  stop_tokens=(),
  seed: int = 0,
  rng: jax.Array | None = None,
):
  """`generate` one step at a time, for showing text as it comes: yields each step's tokens,
  numpy int32 [B] (PAD for rows that have stopped), as soon as they are sampled; stops after
  `max_new_tokens` steps or when every row has stopped. The same tokens as `generate`
  (the same keys; one jitted step per token instead of one loop)."""
  sampling = Sampling(temperature, top_k, top_p)
  stop_tokens, logits, state = _start(
    model, prompt_tokens, sleep_config, max_new_tokens, stop_tokens
  )
  graphdef, params = nnx.split(model)
  params = nnx.to_pure_dict(params)
  rng = jax.random.key(seed) if rng is None else rng
  active = np.ones(logits.shape[0], bool)
  for step in range(max_new_tokens):
    token, logits, state = _decode_step(
      graphdef, params, state, logits, sampling, rng, jnp.int32(step)
    )
    token = np.asarray(token)
    yield np.where(active, token, PAD).astype(np.int32)
    active &= ~np.isin(token, stop_tokens)
    if not active.any():
      return
