"""Streaming wake/sleep inference at constant memory (paper: offline recurrence, online inference).

Online, a sleeping model is an ordinary model with a bounded KV cache:
  wake   every fed token runs one pass of the stack, attending to the KV cache of the current
         window (and, under sliding eviction, the last L-1 tokens of the previous one) and
         reading and writing the fast weights; its logits come out at once.
  sleep  when the window fills (L tokens), the window is consolidated: N passes of the stack
         over its tokens from the fast weights the window started with (exactly the training
         schedule's `sleep_on_chunk`), then its KV is evicted by the policy.

So feeding a sequence's context and then its prediction chunk returns what `apply` predicts,
and memory never grows: the state is a fixed-size pytree (`StreamState`). Per attention block
it holds a KV buffer of L tokens (hard eviction), plus L-1 remembered tokens under sliding
eviction; per gated-delta block the fast weights (now and at the window's start) and the
convolutions' tails; the window's tokens (for the sleep); and the position in the window.

Everything is a pure function of arrays. A block of tokens is fed by whole passes (block
prefill, `_feed_blocks`): one wake pass over the tokens up to the window's end (attending to the
window's cache), the sleep, then a `lax.scan` over the whole windows that follow (each one pass
that gives its logits and is also the sleep's first pass, then N-1 more), then one pass over
the rest. The split depends on the position, which `stream_feed` reads on the host, so a block
compiles once per (shape, split). It equals feeding the same tokens one at a time (within
float32 rounding: the passes use the chunked gated delta rule where one token uses the
recurrence). A single token (generation) is one `lax.scan` step with the sleep under a
`lax.cond` (`_feed`), compiled once per shape.
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sleep_jax.model.blocks import PassContext
from sleep_jax.model.lm import ConvState, FastState, HybridLM, KVPairs, zero_conv_state, zero_kv
from sleep_jax.sleep.config import SleepConfig
from sleep_jax.sleep.consolidate import (
  Carry,
  carry_after,
  chunk_context,
  initial_carry,
  sleep_on_chunk,
)

# One token's gated delta step is the per-token recurrence itself (the chunked forms pad it).
WAKE_FAST_WEIGHT_IMPL = "reference"


@flax.struct.dataclass
class StreamState:
  """Everything a stream carries between feeds; its size is fixed by (model, config, batch).

  Attributes:
    fast: fast weights after the tokens fed so far (the wake passes write them).
    conv: the convolutions' tails after the tokens fed so far.
    window_start: what the current window's sleep starts from (`consolidate.Carry`: the fast
      weights, the tails under conv_state="carry", the remembered KV under sliding eviction).
    window_kv: per attention block, (k, v) [B, L, H, Dh] of the window's tokens (wake passes).
    window_tokens: [B, L] int32, the window's tokens (slept on when it fills).
    position: int32 scalar, tokens in the current window (0..L-1).
    sleep_config: the schedule the state belongs to (static).
  """

  fast: FastState
  conv: ConvState
  window_start: Carry
  window_kv: KVPairs
  window_tokens: jax.Array
  position: jax.Array
  sleep_config: SleepConfig = flax.struct.field(pytree_node=False)

  @property
  def batch_size(self) -> int:
    return self.window_tokens.shape[0]


def _check_config(sleep_config) -> SleepConfig:
  cfg = SleepConfig.from_config(sleep_config)
  if not cfg.evicts:
    raise ValueError(
      "streaming needs a bounded attention window: sleep.eviction='none' keeps every token; "
      "use eviction 'hard' or 'sliding'"
    )
  return cfg


def stream_init(model: HybridLM, batch_size: int, *, sleep_config) -> StreamState:
  """A fresh stream: zero fast weights, an empty window, nothing remembered."""
  cfg = _check_config(sleep_config)
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  carry = initial_carry(model.cfg, cfg, batch_size)
  return StreamState(
    fast=carry.fast,
    conv=zero_conv_state(model.cfg, batch_size),
    window_start=carry,
    window_kv=zero_kv(model.cfg, batch_size, cfg.window),
    window_tokens=jnp.zeros((batch_size, cfg.window), jnp.int32),
    position=jnp.zeros((), jnp.int32),
    sleep_config=cfg,
  )


def _wake(model: HybridLM, state: StreamState, tokens_bt: jax.Array):
  """One pass over t tokens per row that continue the window (position + t <= L): their
  features [B, t, D] and the advanced state. Attention sees the window's cached KV (and the
  remembered tokens under sliding eviction) and the block's own tokens causally."""
  cfg, start = state.sleep_config, state.window_start
  num_tokens = tokens_bt.shape[1]
  slots = jnp.arange(cfg.window)
  prefix, positions, valid = state.window_kv, slots, slots < state.position
  if start.memory is not None:  # sliding: the previous window's last L-1 tokens come first
    remembered = cfg.window - 1
    prefix = tuple(
      (jnp.concatenate([mk, wk], 1), jnp.concatenate([mv, wv], 1))
      for (mk, mv), (wk, wv) in zip(start.memory, state.window_kv)
    )
    positions = jnp.concatenate([jnp.arange(remembered) - remembered, slots])
    valid = jnp.concatenate([start.memory_valid, valid])
  context = PassContext(
    positions=state.position + jnp.arange(num_tokens),
    prefix_positions=positions,
    prefix_valid=valid,
    width=cfg.window if cfg.eviction == "sliding" else None,
    fast_weight_impl=WAKE_FAST_WEIGHT_IMPL if num_tokens == 1 else None,
  )
  out = model.run_pass(
    model.embed(tokens_bt), state.fast, conv_state=state.conv, kv_prefix=prefix,
    context=context,
  )  # fmt: skip
  write = lambda buffer, new: jax.lax.dynamic_update_slice_in_dim(
    buffer, new.astype(buffer.dtype), state.position, axis=1
  )
  state = state.replace(
    fast=out.fast_state,
    conv=out.conv_state,
    window_kv=jax.tree.map(write, state.window_kv, out.kv),
    window_tokens=write(state.window_tokens, tokens_bt),
    position=state.position + num_tokens,
  )
  return out.h, state


def _sleep(graphdef, params, state: StreamState) -> StreamState:
  """Consolidates the full window (N passes from its starting state) and evicts it."""
  cfg = state.sleep_config
  slept = sleep_on_chunk(graphdef, params, cfg, state.window_start, state.window_tokens)
  conv = slept.conv if slept.conv is not None else jax.tree.map(jnp.zeros_like, state.conv)
  return state.replace(
    fast=slept.fast, conv=conv, window_start=slept, position=jnp.zeros((), jnp.int32)
  )


@functools.partial(jax.jit, static_argnums=0)
def _feed(graphdef, params, state: StreamState, tokens_bt: jax.Array):
  model = nnx.merge(graphdef, params)
  window = state.sleep_config.window

  def step(state, token_b):
    h, state = _wake(model, state, token_b[:, None])
    state = jax.lax.cond(
      state.position == window, functools.partial(_sleep, graphdef, params), lambda s: s, state
    )
    return state, model.logits(h)[:, 0]

  state, logits_tbv = jax.lax.scan(step, state, jnp.swapaxes(tokens_bt, 0, 1))
  return jnp.swapaxes(logits_tbv, 0, 1), state


def _sleep_shares_the_wake(model: HybridLM) -> bool:
  """Whether a sleep's first pass over a window is the wake pass over it (no loop range: the
  loop is the whole stack), so that one pass gives both the window's logits and pass 1."""
  return len(model.layout) == 1


def _window(graphdef, params, state: StreamState, tokens_bl: jax.Array):
  """A whole window fed at its start (position 0): its features [B, L, D], and the state after
  its sleep, as feeding its tokens one by one leaves it.

  The wake pass over the whole window and the sleep's first pass start from the same fast
  weights, tails and memory (the window's start), so without a loop range the first sleep pass
  is the wake and only N-1 more run: a block costs N passes, as `apply` does on a context.
  """
  model = nnx.merge(graphdef, params)
  if not _sleep_shares_the_wake(model):
    h, state = _wake(model, state, tokens_bl)
    return h, _sleep(graphdef, params, state)
  cfg, start = state.sleep_config, state.window_start
  context = chunk_context(cfg, start, cfg.window)
  run = lambda h, fast: model.run_pass(
    h, fast, conv_state=start.conv, kv_prefix=start.memory, context=context
  )
  first = run(model.embed(tokens_bl), start.fast)

  def one_pass(carry, _):
    out = run(carry[0], carry[1])
    return (out.h, out.fast_state, out.conv_state, out.kv), None

  (_, fast, conv, kv), _ = jax.lax.scan(
    one_pass, tuple(first), None, length=cfg.passes - 1, unroll=cfg.unroll
  )
  slept = carry_after(cfg, start, fast, conv, kv, cfg.window)
  return first.h, state.replace(
    fast=slept.fast,
    conv=slept.conv if slept.conv is not None else jax.tree.map(jnp.zeros_like, state.conv),
    window_start=slept,
    window_kv=jax.tree.map(lambda buffer, new: new.astype(buffer.dtype), state.window_kv, first.kv),
    window_tokens=tokens_bl.astype(jnp.int32),
    position=jnp.zeros((), jnp.int32),
  )


def block_plan(position: int, num_tokens: int, window: int) -> tuple[int, bool, int, int]:
  """How a block of `num_tokens` fed at `position` splits at window ends: (head: tokens that
  continue the open window, all of them if they do not fill it; whether they fill it; whole
  windows after them; tail: tokens left in a window that stays open)."""
  head = 0 if position == 0 else min(num_tokens, window - position)
  windows, tail = divmod(num_tokens - head, window)
  return head, position + head == window, windows, tail


@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def _feed_blocks(graphdef, params, state: StreamState, tokens_bt, plan, all_logits: bool):
  """`_feed` by whole blocks: a pass over the tokens up to the window's end, the sleep, then
  each whole window (its pass and sleep, a `lax.scan` over windows), then the rest.

  `plan` is `block_plan(position, t, L)` (static: the position is read on the host). Returns
  the logits of every token, or of the last only (`all_logits=False`), and the state.
  """
  model = nnx.merge(graphdef, params)
  window = state.sleep_config.window
  head, fills, windows, tail = plan
  batch = tokens_bt.shape[0]
  features = []  # [B, t_i, D] pieces, or their last tokens only
  keep = (lambda h: h) if all_logits else (lambda h: h[:, -1:])
  if head:
    h, state = _wake(model, state, tokens_bt[:, :head])
    features.append(keep(h))
    if fills:
      state = _sleep(graphdef, params, state)
  if windows:
    blocks = tokens_bt[:, head : head + windows * window].reshape(batch, windows, window)

    def one_window(state, tokens_bl):
      h, state = _window(graphdef, params, state, tokens_bl)
      return state, keep(h)

    state, h_wbld = jax.lax.scan(one_window, state, jnp.swapaxes(blocks, 0, 1))
    h_wbld = jnp.swapaxes(h_wbld, 0, 1)
    features.append(h_wbld.reshape(batch, -1, h_wbld.shape[-1]))
  if tail:
    h, state = _wake(model, state, tokens_bt[:, tokens_bt.shape[1] - tail :])
    features.append(keep(h))
  h = jnp.concatenate(features, axis=1) if all_logits else features[-1][:, -1:]
  return model.logits(h), state


def _check_feed(model: HybridLM, state: StreamState, tokens_bt, sleep_config) -> jax.Array:
  """Clear errors before any compilation."""
  cfg = _check_config(sleep_config)
  if cfg != state.sleep_config:
    raise ValueError(
      f"the stream state was made for sleep config {state.sleep_config}, but this feed asks "
      f"for {cfg}: start a new stream with stream_init for a different schedule"
    )
  if not isinstance(tokens_bt, jax.core.Tracer):
    values = np.asarray(tokens_bt)
    if values.size and (values.min() < 0 or values.max() >= model.cfg.vocab_size):
      raise ValueError(
        f"tokens must lie in [0, vocab_size={model.cfg.vocab_size}); got values in "
        f"[{values.min()}, {values.max()}]"
      )
  tokens_bt = jnp.asarray(tokens_bt)
  if tokens_bt.ndim != 2 or not jnp.issubdtype(tokens_bt.dtype, jnp.integer):
    raise ValueError(f"tokens must be integer [batch, t], got {tokens_bt.dtype} {tokens_bt.shape}")
  if tokens_bt.shape[0] != state.batch_size:
    raise ValueError(
      f"the stream holds {state.batch_size} rows but {tokens_bt.shape[0]} were fed: feed "
      f"[{state.batch_size}, t] tokens or start a stream with batch_size={tokens_bt.shape[0]}"
    )
  return tokens_bt.astype(jnp.int32)


def stream_feed(
  model: HybridLM, state: StreamState, tokens_bt, *, sleep_config
) -> tuple[jax.Array, StreamState]:
  """Feeds tokens [B, t] (t >= 1) to a stream; returns their logits and the new state.

  Args:
    model: the model the stream runs.
    state: from `stream_init` or an earlier feed (made for the same `sleep_config`).
    tokens_bt: int tokens [B, t] in [0, vocab_size).
    sleep_config: `config.sleep` (passes N, window L, eviction "hard" or "sliding", conv_state).

  Returns:
    float32 logits [B, t, vocab], each from one wake pass over its token; the state after the
    tokens (slept whenever a window filled).
  """
  tokens_bt = _check_feed(model, state, tokens_bt, sleep_config)
  graphdef, params = nnx.split(model)
  params = nnx.to_pure_dict(params)
  if tokens_bt.shape[1] == 1 or isinstance(state.position, jax.core.Tracer):
    return _feed(graphdef, params, state, tokens_bt)  # one token, or a position not known here
  plan = block_plan(int(state.position), tokens_bt.shape[1], state.sleep_config.window)
  return _feed_blocks(graphdef, params, state, tokens_bt, plan, True)


@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def _generate(graphdef, params, state, last_logits, num_tokens, temperature, rng):
  def pick(logits, key):
    if temperature == 0:
      return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, logits / temperature, axis=-1).astype(jnp.int32)

  def step(carry, key):
    state, logits = carry
    token = pick(logits, key)
    logits, state = _feed(graphdef, params, state, token[:, None])
    return (state, logits[:, -1]), token

  keys = jax.random.split(rng, num_tokens)
  (state, _), tokens = jax.lax.scan(step, (state, last_logits), keys)
  return jnp.swapaxes(tokens, 0, 1), state


def generate(
  model: HybridLM,
  prompt_tokens,
  *,
  sleep_config,
  max_new_tokens: int,
  temperature: float = 0.0,
  rng: jax.Array | None = None,
) -> jax.Array:
  """Streams a prompt [B, T] in, then samples `max_new_tokens` tokens [B, max_new_tokens].

  temperature 0 is greedy; above 0 samples from softmax(logits / temperature) and needs `rng`.
  The model sleeps whenever a window fills, during the prompt and during generation alike.
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0, got {temperature}")
  if temperature > 0 and rng is None:
    raise ValueError("sampling with temperature > 0 needs rng=jax.random.key(...)")
  prompt = np.asarray(prompt_tokens)
  if prompt.ndim != 2 or prompt.shape[1] < 1:
    raise ValueError(f"prompt_tokens must be [batch, T >= 1], got shape {prompt.shape}")
  state = stream_init(model, prompt.shape[0], sleep_config=sleep_config)
  logits, state = stream_feed(model, state, prompt, sleep_config=sleep_config)
  graphdef, params = nnx.split(model)
  rng = jax.random.key(0) if rng is None else rng
  tokens, _ = _generate(
    graphdef, nnx.to_pure_dict(params), state, logits[:, -1], max_new_tokens, temperature, rng
  )
  return tokens


def state_bytes(state: StreamState) -> int:
  """Bytes of every array in a stream state (constant for a given model, config and batch)."""
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
