"""Algorithm 1 of the paper, generalised to any chunk schedule, as a pure function of arrays.

    S := 0
    for each chunk c of L tokens (the last may be shorter), in order:
        h := Embed(c)
        if c carries no loss (sleep):  repeat N times:  (h, S) := Stack(h, S)
                                        (with a loop range: the prelude once, the loop N
                                        times, the coda once)
        else (predict / wake):         (h, S') := Stack(h, S); logits(c) := OutProj(h)
                                        (predict_then_sleep: then sleep on c from the same S)
        evict: drop h and the KV cache; only S (and, by the eviction policy, the KV of c's last
        L-1 tokens from its last pass, or the convolutions' tails) crosses into the next chunk

Runs of consecutive full sleep chunks are one `lax.scan` over chunks, the passes a `lax.scan`
over passes; the schedule itself (`SleepConfig.chunks`) is static Python. Attention inside each
pass sees the current chunk (causally, positions from 0) and, under sliding eviction, the
previous chunk's last L-1 tokens; its KV is rebuilt every pass from that pass's features, so
evicted tokens reach a prediction only through the fast-weight state S.

eviction="none" is the full-attention reference: no chunks, one pass over the whole sequence
(attention sees every token), logits reported for the positions after context_len.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from sleep_jax.model.blocks import PassContext
from sleep_jax.model.lm import (
  ConvState,
  FastState,
  HybridLM,
  KVPairs,
  PassOutput,
  merge_segment_outputs,
  zero_conv_state,
  zero_fast_state,
  zero_kv,
)
from sleep_jax.sleep.config import Chunk, SleepConfig

Params = Any  # a nested dict of arrays: nnx.to_pure_dict of the model's nnx.Param state


@flax.struct.dataclass
class Carry:
  """What crosses a chunk boundary (None fields are not carried under the config).

  Attributes:
    fast: one [B,H,K,V] float32 matrix per gated-delta block.
    conv: one (q, k, v) triple of convolution tails per gated-delta block (conv_state="carry").
    memory: one (k, v) [B, L-1, H, Dh] per attention block: the previous chunk's last L-1
      tokens from its last pass (eviction="sliding").
    memory_valid: [L-1] bool, which memory slots hold a token (none before the first chunk).
  """

  fast: FastState
  conv: ConvState | None = None
  memory: KVPairs | None = None
  memory_valid: jax.Array | None = None


def initial_carry(model_cfg, cfg: SleepConfig, batch_size: int) -> Carry:
  """The carry at the start of a sequence: zero fast weights, zero tails, empty memory."""
  carry = Carry(fast=zero_fast_state(model_cfg, batch_size))
  if cfg.conv_state == "carry":
    carry = carry.replace(conv=zero_conv_state(model_cfg, batch_size))
  if cfg.eviction == "sliding":
    slots = cfg.window - 1
    carry = carry.replace(
      memory=zero_kv(model_cfg, batch_size, slots), memory_valid=jnp.zeros((slots,), bool)
    )
  return carry


def chunk_context(cfg: SleepConfig, carry: Carry, chunk_len: int) -> PassContext | None:
  """Positions of a chunk and of the memory before it (sliding eviction); None otherwise."""
  if carry.memory is None:
    return None
  slots = cfg.window - 1
  return PassContext(
    positions=jnp.arange(chunk_len),
    prefix_positions=jnp.arange(slots) - slots,
    prefix_valid=carry.memory_valid,
    width=cfg.window,
  )


def carry_after(cfg: SleepConfig, carry: Carry, fast_state, conv_state, kv, chunk_len) -> Carry:
  """The carry after a chunk of `chunk_len` tokens whose last pass left these states."""
  carry = carry.replace(fast=fast_state)
  if carry.conv is not None:
    carry = carry.replace(conv=conv_state)
  if carry.memory is not None:  # the last L-1 of (memory, this chunk's tokens)
    slots = cfg.window - 1
    keep = lambda old, new: jnp.concatenate([old.astype(new.dtype), new], axis=1)[:, -slots:]
    carry = carry.replace(
      memory=jax.tree.map(keep, carry.memory, kv),
      memory_valid=jnp.concatenate([carry.memory_valid, jnp.ones((chunk_len,), bool)])[-slots:],
    )
  return carry


def _segment_pass(
  graphdef: nnx.GraphDef, segment: str, params: Params, h, fast_state, conv, memory, context
):
  model = nnx.merge(graphdef, params)
  return model.run_segment(
    segment, h, fast_state, conv_state=conv, kv_prefix=memory, context=context
  )


def relative_change(old: FastState, new: FastState) -> jax.Array:
  """r [B]: the largest, over gated-delta blocks, of ||new - old||_F / max(||old||_F, 1e-12)."""
  frob = lambda x: jnp.sqrt(jnp.sum(jnp.square(x), axis=tuple(range(1, x.ndim))))
  ratios = [frob(n - o) / jnp.maximum(frob(o), 1e-12) for o, n in zip(old, new, strict=True)]
  return functools.reduce(jnp.maximum, ratios)


def _keep_halted(active: jax.Array, new, old):
  """`new` in the rows still sleeping, `old` in the halted ones (batch leads every leaf).

  A select, not a blend: a halted row's value and gradient are bitwise its old ones, and an
  active row's are bitwise the pass's."""
  pick = lambda n, o: jnp.where(active.reshape((-1,) + (1,) * (n.ndim - 1)), n, o)
  return jax.tree.map(pick, new, old)


def _run_passes(
  pass_fn, h, fast_state, num_passes: int, keep_last: bool, unroll: bool, active=None, tol=None
):
  """(h, S, last, active) after `num_passes` passes, as a `lax.scan` over passes (unrolled with
  `unroll`, `SleepConfig.unroll`).

  With `keep_last`, `last` is the last pass's (conv tails, attention KV), riding in the scan's
  carry so that only the last pass's survives; otherwise None.

  With `tol` (halt="converge"), `active` [B] says which rows still sleep: a pass changes only
  those, and a row whose relative state change (`relative_change`) falls below `tol` stops.
  Every pass still runs (masked), so gradients are those of the passes each row took.
  """
  if num_passes == 0:
    return h, fast_state, None, active

  def one_pass(carry, _):
    h, fast_state, last, active = carry
    out = pass_fn(h, fast_state)
    new = (out.h, out.fast_state, (out.conv_state, out.kv) if keep_last else None)
    if tol is None:
      return (*new, active), None
    # A row that halted earlier has r = 0 here (its state is kept), so it stays halted.
    still = active & (relative_change(fast_state, out.fast_state) >= tol)
    return (*_keep_halted(active, new, (h, fast_state, last)), still), None

  last = None
  if keep_last:
    shapes = jax.eval_shape(pass_fn, h, fast_state)
    zeros = lambda x: jnp.zeros(x.shape, x.dtype)
    last = jax.tree.map(zeros, (shapes.conv_state, shapes.kv))
  (h, fast_state, last, active), _ = jax.lax.scan(
    one_pass, (h, fast_state, last, active), None, length=num_passes, unroll=unroll
  )
  return h, fast_state, last, active


def _run_passes_until_halted(pass_fn, h, fast_state, num_passes: int, keep_last: bool, tol):
  """`_run_passes` under halt="converge" for inference: a `lax.while_loop` that ends once every
  row has halted, so the passes no row takes are not run (not reverse-differentiable).

  The passes it runs are the scan's, masked the same way, and the ones it skips would change
  nothing, so the values are the scan's."""
  shapes = jax.eval_shape(pass_fn, h, fast_state)
  zeros = lambda x: jnp.zeros(x.shape, x.dtype)
  last = jax.tree.map(zeros, (shapes.conv_state, shapes.kv)) if keep_last else None
  active = jnp.ones((h.shape[0],), bool)

  def body(carry):
    n, h, fast_state, last, active = carry
    out = pass_fn(h, fast_state)
    new = (out.h, out.fast_state, (out.conv_state, out.kv) if keep_last else None)
    still = active & (relative_change(fast_state, out.fast_state) >= tol)
    return (n + 1, *_keep_halted(active, new, (h, fast_state, last)), still)

  cond = lambda carry: (carry[0] < num_passes) & jnp.any(carry[4])
  _, h, fast_state, last, _ = jax.lax.while_loop(cond, body, (0, h, fast_state, last, active))
  return h, fast_state, last


def sleep_on_chunk(
  graphdef: nnx.GraphDef,
  params: Params,
  cfg: SleepConfig,
  carry: Carry,
  chunk_bl: jax.Array,
  early_stop: bool = False,
) -> Carry:
  """N passes over one chunk from the incoming carry; returns the next carry.

  A pass is the model's loop (`ModelConfig.segments`; the whole stack without a loop range);
  a prelude before it and a coda after it run once. Every pass sees the same memory and
  convolution tails (those the previous chunk left); the last pass's tails and KV become the
  next chunk's. grad_passes=k runs the first N-k passes forward only: cutting the gradient at
  the carry also cuts the path back to the prelude and to earlier chunks. With `early_stop`
  (inference only: no gradients) and halt="converge", the passes stop once every row halted.
  """
  model: HybridLM = nnx.merge(graphdef, params)
  context = chunk_context(cfg, carry, chunk_bl.shape[1])
  keep_last = carry.conv is not None or carry.memory is not None

  def segment_fn(segment):
    pass_fn = functools.partial(_segment_pass, graphdef, segment)
    if cfg.remat:
      pass_fn = jax.checkpoint(pass_fn)
    bound = functools.partial(pass_fn, params, conv=carry.conv, memory=carry.memory)
    return lambda h, fast_state: bound(h, fast_state, context=context)

  h, state, outputs = model.embed(chunk_bl), carry.fast, []
  for segment, *_ in model.layout:
    run = segment_fn(segment)
    if segment != "loop":
      outputs.append(run(h, state))
      h, state = outputs[-1].h, outputs[-1].fast_state
      continue
    # halt="converge": every row sleeps until its state settles (the first pass always runs).
    tol = cfg.halt_tol if cfg.halt == "converge" else None
    if tol is not None and early_stop:  # grad_passes is None under converge (SleepConfig)
      h, state, last = _run_passes_until_halted(run, h, state, cfg.passes, keep_last, tol)
      if keep_last:
        outputs.append(PassOutput(h, state, *last))
      continue
    active = jnp.ones((chunk_bl.shape[0],), bool) if tol is not None else None
    h, state, _, active = _run_passes(
      run, h, state, cfg.frozen_passes, False, cfg.unroll, active, tol
    )
    if cfg.frozen_passes:
      h, state = jax.lax.stop_gradient((h, state))
    h, state, last, _ = _run_passes(
      run, h, state, cfg.passes - cfg.frozen_passes, keep_last, cfg.unroll, active, tol
    )
    if keep_last:
      outputs.append(PassOutput(h, state, *last))
  if keep_last:
    merged = merge_segment_outputs(outputs)
    conv_state, kv = merged.conv_state, merged.kv
  else:
    conv_state, kv = None, None
  return carry_after(cfg, carry, state, conv_state, kv, chunk_bl.shape[1])


def wake_on_chunk(
  model: HybridLM, cfg: SleepConfig, carry: Carry, chunk_bl: jax.Array
) -> tuple[jax.Array, Carry]:
  """One pass over a chunk: its features [B,T,D] and the carry that pass leaves."""
  out = model.run_pass(
    model.embed(chunk_bl),
    carry.fast,
    conv_state=carry.conv,
    kv_prefix=carry.memory,
    context=chunk_context(cfg, carry, chunk_bl.shape[1]),
  )
  return out.h, carry_after(cfg, carry, out.fast_state, out.conv_state, out.kv, out.h.shape[1])


def _groups(chunks: tuple[Chunk, ...]) -> list[list[Chunk]]:
  """The schedule in runs: each predicted chunk alone, consecutive equal-length sleep chunks
  together (one `lax.scan` over them)."""
  groups: list[list[Chunk]] = []
  for chunk in chunks:
    previous = groups[-1][-1] if groups else None
    if (
      previous is not None
      and not chunk.predict
      and not previous.predict
      and chunk.length == previous.length
    ):
      groups[-1].append(chunk)
    else:
      groups.append([chunk])
  return groups


def sleep_forward(
  graphdef: nnx.GraphDef,
  params: Params,
  tokens_bt: jax.Array,
  cfg: SleepConfig,
  fast_state: FastState | None = None,
  early_stop: bool = False,
) -> tuple[jax.Array, FastState]:
  """Runs the chunk schedule: sleeps on the chunks without loss, predicts those with loss.

  Args:
    graphdef: the model's structure (`nnx.split(model)[0]`), static.
    params: the model's parameters as a nested dict of arrays.
    tokens_bt: int tokens [B, T] (T checked against `cfg.chunks`).
    cfg: the sleep configuration (schedule, passes N, window L, eviction, grad_passes, remat).
    fast_state: incoming fast weights (default zeros: a fresh sequence).
    early_stop: inference only (not differentiable): under halt="converge", stop a window's
      passes once every row halted (`sleep_on_chunk`).

  Returns:
    logits [B, P, vocab] (float32) of the predicted positions (`cfg.predicted_spans`, in
    order), and the fast state after the last chunk.
  """
  batch, seq_len = tokens_bt.shape
  chunks = cfg.chunks(seq_len)
  model: HybridLM = nnx.merge(graphdef, params)
  carry = initial_carry(model.cfg, cfg, batch)
  if fast_state is not None:
    carry = carry.replace(fast=fast_state)
  if not cfg.evicts:  # one chunk over the whole sequence
    h, fast_state = model.stack_pass(model.embed(tokens_bt), carry.fast)
    return model.logits(h[:, cfg.context_len :]), fast_state

  sleep = functools.partial(sleep_on_chunk, graphdef, params, cfg, early_stop=early_stop)
  logits = []
  for group in _groups(chunks):
    first, last = group[0], group[-1]
    tokens = tokens_bt[:, first.start : last.stop]
    if first.predict:
      h, woke = wake_on_chunk(model, cfg, carry, tokens)
      logits.append(model.logits(h))
      carry = sleep(carry, tokens) if cfg.predict_then_sleep else woke
    else:  # one scan over a run of equally long sleep chunks
      windows = jnp.swapaxes(tokens.reshape(batch, len(group), first.length), 0, 1)
      carry, _ = jax.lax.scan(lambda c, x: (sleep(c, x), None), carry, windows, unroll=cfg.unroll)
  return jnp.concatenate(logits, axis=1) if len(logits) > 1 else logits[0], carry.fast


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg"))
def _full_logits(graphdef, params, tokens_bt, cfg: SleepConfig):
  predicted, _ = sleep_forward(graphdef, params, tokens_bt, cfg, early_stop=True)
  batch, seq_len = tokens_bt.shape
  logits = jnp.zeros((batch, seq_len, predicted.shape[-1]), jnp.float32)
  offset = 0
  for start, stop in cfg.predicted_spans(seq_len):
    logits = logits.at[:, start:stop].set(predicted[:, offset : offset + stop - start])
    offset += stop - start
  return logits


def apply(model: HybridLM, tokens_bt, *, sleep_config) -> jax.Array:
  """Logits [B, T, vocab] float32 of `model` on `tokens` under the sleep schedule.

  Positions inside slept chunks hold zeros (nothing is predicted there); predicted positions
  (`SleepConfig.predicted_spans`) are exact. `sleep_config` is `config.sleep` as it comes out of a config file.
  """
  cfg = SleepConfig.from_config(sleep_config)
  tokens_bt = jnp.asarray(tokens_bt)
  if tokens_bt.ndim != 2:
    raise ValueError(f"tokens must be [batch, seq_len], got shape {tokens_bt.shape}")
  cfg.check_sequence(tokens_bt.shape[1])
  graphdef, state = nnx.split(model)
  return _full_logits(graphdef, nnx.to_pure_dict(state), tokens_bt, cfg)
