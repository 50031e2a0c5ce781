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
    window_kv: per attention block, (k, v) [B, L, H, Dh] of the window's tokens (wake passes);
      without eviction (the full-attention decoder), [B, max_len, H, Dh] of every token.
    window_tokens: [B, L] int32, the window's tokens (slept on when it fills).
    position: [B] int32, each row's tokens in its current window (0..L-1): rows may stand at
      different positions (ragged batches), each sleeping when its own window fills.
    sleep_config: the schedule the state belongs to (static).

  Every leaf has the rows first; `window_start.memory_valid` is [B, L-1].
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

  @property
  def slots(self) -> int:
    """KV slots per attention block: the window L (or max_len without eviction)."""
    return self.window_tokens.shape[1]


def stream_init(
  model: HybridLM, batch_size: int, *, sleep_config, max_len: int | None = None
) -> StreamState:
  """A fresh stream: zero fast weights, an empty window, nothing remembered.

  With sleep.eviction="none" the stream is the full-attention KV-cache decoder (the baseline
  the sleeping model is measured against): nothing is slept on or evicted, and its cache holds
  `max_len` tokens (required; feeding more is an error). Otherwise `max_len` must be None.
  """
  cfg = SleepConfig.from_config(sleep_config)
  cfg.check_model(model.cfg)
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if cfg.evicts and max_len is not None:
    raise ValueError(
      f"max_len={max_len} is for the full-attention decoder (eviction='none'): a sleeping "
      f"stream holds its window of {cfg.window} tokens however long it runs"
    )
  if not cfg.evicts and (max_len is None or max_len < 1):
    raise ValueError(
      "sleep.eviction='none' keeps every token: give the full-attention decoder's cache size, "
      f"stream_init(..., max_len=tokens), got max_len={max_len}"
    )
  slots = cfg.window if cfg.evicts else max_len
  carry = initial_carry(model.cfg, cfg, batch_size)
  if carry.memory_valid is not None:
    carry = carry.replace(
      memory_valid=jnp.broadcast_to(carry.memory_valid, (batch_size, cfg.window - 1))
    )
  return StreamState(
    fast=carry.fast,
    conv=zero_conv_state(model.cfg, batch_size),
    window_start=carry,
    window_kv=zero_kv(model.cfg, batch_size, slots),
    window_tokens=jnp.zeros((batch_size, slots), jnp.int32),
    position=jnp.zeros((batch_size,), jnp.int32),
    sleep_config=cfg,
  )


def _batched_leaves(state: StreamState, f) -> StreamState:
  """`f` applied to every leaf with a batch axis the model sees (all but `position` and
  `memory_valid`, which the model reads as one position and one [L-1] mask)."""
  each = lambda tree: jax.tree.map(f, tree)
  start = state.window_start
  return state.replace(
    fast=each(state.fast),
    conv=each(state.conv),
    window_start=start.replace(
      fast=each(start.fast), conv=each(start.conv), memory=each(start.memory)
    ),
    window_kv=each(state.window_kv),
    window_tokens=each(state.window_tokens),
  )


def _over_rows(fn):
  """`fn(state, *args) -> (out, state)`, written for a batch at one position, mapped over the
  rows (each its own position and memory mask); `args` and `out` have the rows first."""

  def one_row(row: StreamState, *args):
    out, row = fn(_batched_leaves(row, lambda x: x[None]), *(a[None] for a in args))
    return jax.tree.map(lambda x: x[0], out), _batched_leaves(row, lambda x: x[0])

  return jax.vmap(one_row)


def _at_one_position(state: StreamState) -> StreamState:
  """The state of rows that stand at one position with one memory mask, as one batch."""
  start = state.window_start
  valid = None if start.memory_valid is None else start.memory_valid[0]
  return state.replace(position=state.position[0], window_start=start.replace(memory_valid=valid))


def _per_row(state: StreamState, batch: int) -> StreamState:
  """The inverse of `_at_one_position`."""
  start = state.window_start
  valid = start.memory_valid
  if valid is not None:
    valid = jnp.broadcast_to(valid, (batch, *valid.shape))
  return state.replace(
    position=jnp.broadcast_to(state.position, (batch,)),
    window_start=start.replace(memory_valid=valid),
  )


def _wake(model: HybridLM, state: StreamState, tokens_bt: jax.Array):
  """One pass over t tokens per row that continue the window (position + t <= L): their
  features [B, t, D] and the advanced state. Attention sees the window's cached KV (and the
  remembered tokens under sliding eviction) and the block's own tokens causally."""
  cfg, start = state.sleep_config, state.window_start
  num_tokens = tokens_bt.shape[1]
  slots = jnp.arange(state.slots)
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
  slept = sleep_on_chunk(
    graphdef, params, cfg, state.window_start, state.window_tokens, early_stop=True
  )
  conv = slept.conv if slept.conv is not None else jax.tree.map(jnp.zeros_like, state.conv)
  return state.replace(
    fast=slept.fast, conv=conv, window_start=slept, position=jnp.zeros_like(state.position)
  )


@functools.partial(jax.jit, static_argnums=0)
def _feed(graphdef, params, state: StreamState, tokens_bt: jax.Array):
  """Feeds tokens one at a time (a `lax.scan`), every row at its own position: one wake pass
  per token, and the sleep of the rows whose window the token fills (under a `lax.cond`: only
  tokens that fill some row's window pay for it)."""
  model = nnx.merge(graphdef, params)
  wake = _over_rows(lambda s, token: _wake(model, s, token[:, None]))
  sleep = _over_rows(lambda s: (None, _sleep(graphdef, params, s)))

  def sleep_full_rows(state):
    full = state.position == state.slots
    _, slept = sleep(state)
    pick = lambda new, old: jnp.where(full.reshape(-1, *[1] * (new.ndim - 1)), new, old)
    return jax.tree.map(pick, slept, state)

  def step(state, token_b):
    h, state = wake(state, token_b)
    if state.sleep_config.evicts:
      state = jax.lax.cond(
        jnp.any(state.position == state.slots), sleep_full_rows, lambda s: s, state
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
  cfg, start = state.sleep_config, state.window_start
  # An adaptive sleep (halt != "never") decides per pass from the state change, so it runs
  # through `sleep_on_chunk`, the same rule as `apply`, at the cost of one pass per window.
  if not _sleep_shares_the_wake(model) or cfg.halt != "never":
    h, state = _wake(model, state, tokens_bl)
    return h, _sleep(graphdef, params, state)
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
    position=jnp.zeros_like(state.position),
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
  state = _at_one_position(state)
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
  return model.logits(h), _per_row(state, batch)


def _check_feed(model: HybridLM, state: StreamState, tokens_bt, sleep_config) -> jax.Array:
  """Clear errors before any compilation."""
  cfg = SleepConfig.from_config(sleep_config)
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
  if tokens_bt.shape[1] < 1:
    raise ValueError("feed at least one token per row, got [batch, 0]")
  if tokens_bt.shape[0] != state.batch_size:
    raise ValueError(
      f"the stream holds {state.batch_size} rows but {tokens_bt.shape[0]} were fed: feed "
      f"[{state.batch_size}, t] tokens or start a stream with batch_size={tokens_bt.shape[0]}"
    )
  if not cfg.evicts and not isinstance(state.position, jax.core.Tracer):
    fed = int(np.max(state.position)) + tokens_bt.shape[1]
    if fed > state.slots:
      raise ValueError(
        f"the full-attention decoder holds max_len={state.slots} tokens, and this feed would "
        f"bring a row to {fed}: start it with a larger max_len"
      )
  return tokens_bt.astype(jnp.int32)


def common_position(state: StreamState) -> int | None:
  """The position every row stands at (with one memory mask), read on the host; None when the
  rows stand apart (a ragged batch) or the state is traced."""
  if isinstance(state.position, jax.core.Tracer):
    return None
  positions = np.asarray(state.position)
  valid = state.window_start.memory_valid
  if (positions != positions[0]).any():
    return None
  if valid is not None and (np.asarray(valid) != np.asarray(valid)[:1]).any():
    return None
  return int(positions[0])


def stream_feed(
  model: HybridLM, state: StreamState, tokens_bt, *, sleep_config
) -> tuple[jax.Array, StreamState]:
  """Feeds tokens [B, t] (t >= 1) to a stream; returns their logits and the new state.

  A block (t > 1) of rows at one position runs by whole passes (the module docstring); rows at
  different positions (a ragged batch, `stack_streams`) are fed token by token, each row
  sleeping when its own window fills.

  Args:
    model: the model the stream runs.
    state: from `stream_init` or an earlier feed (made for the same `sleep_config`).
    tokens_bt: int tokens [B, t] in [0, vocab_size).
    sleep_config: `config.sleep` (passes N, window L, eviction, conv_state).

  Returns:
    float32 logits [B, t, vocab], each from one wake pass over its token; the state after the
    tokens (slept whenever a window filled).
  """
  tokens_bt = _check_feed(model, state, tokens_bt, sleep_config)
  graphdef, params = nnx.split(model)
  params = nnx.to_pure_dict(params)
  position = None if tokens_bt.shape[1] == 1 else common_position(state)
  if position is None:  # one token (generation), rows apart, or a traced position
    return _feed(graphdef, params, state, tokens_bt)
  cfg, num_tokens = state.sleep_config, tokens_bt.shape[1]
  plan = block_plan(position, num_tokens, cfg.window) if cfg.evicts else (num_tokens, False, 0, 0)
  return _feed_blocks(graphdef, params, state, tokens_bt, plan, True)


def prefill(
  model: HybridLM, tokens_bt, *, sleep_config, max_len: int | None = None
) -> tuple[jax.Array, StreamState]:
  """A fresh stream fed a prompt [B, T] by whole passes: the last token's logits [B, vocab]
  (no other logits are computed) and the state. `max_len`: as `stream_init`'s."""
  tokens = np.asarray(tokens_bt)
  if tokens.ndim != 2 or tokens.shape[1] < 1:
    raise ValueError(f"a prompt must be [batch, T >= 1] tokens, got shape {tokens.shape}")
  state = stream_init(model, tokens.shape[0], sleep_config=sleep_config, max_len=max_len)
  tokens_bt = _check_feed(model, state, tokens, sleep_config)
  cfg, num_tokens = state.sleep_config, tokens.shape[1]
  plan = block_plan(0, num_tokens, cfg.window) if cfg.evicts else (num_tokens, False, 0, 0)
  graphdef, params = nnx.split(model)
  logits, state = _feed_blocks(graphdef, nnx.to_pure_dict(params), state, tokens_bt, plan, False)
  return logits[:, -1], state


def stack_streams(states: list[StreamState]) -> StreamState:
  """One stream of the rows of several (made for the same model and schedule), in order; the
  rows keep their own positions (a ragged batch)."""
  configs = {state.sleep_config for state in states}
  if len(configs) != 1:
    raise ValueError(f"streams of different sleep configs cannot share a batch: {configs}")
  return jax.tree.map(lambda *rows: jnp.concatenate(rows, axis=0), *states)


def state_bytes(state: StreamState) -> int:
  """Bytes of every array in a stream state (constant for a given model, config and batch)."""
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
