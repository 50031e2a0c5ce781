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
import math
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
from sleep_jax.sleep.config import HALT_EPSILON, Chunk, SleepConfig

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


def _per_row(weight_b: jax.Array, x: jax.Array) -> jax.Array:
  """weight [B] times x [B, ...] in float32."""
  return weight_b.reshape((-1,) + (1,) * (x.ndim - 1)) * x.astype(jnp.float32)


@flax.struct.dataclass
class Halting:
  """Where each row stands in a window's passes under an adaptive halt (batch-leading [B]).

  Attributes:
    active: bool, the row still sleeps on the window.
    passes: int32, passes the row has taken.
    mass: float32 (halt="learned"), the halting probability spent so far.
    expected: float32 (halt="learned"), sum over the passes taken of n times pass n's weight.
    mix: (halt="learned") the float32 weighted sum of the passes' (h, fast state, last pass's
      tails and KV): what leaves the window.
  """

  active: jax.Array
  passes: jax.Array
  mass: jax.Array | None = None
  expected: jax.Array | None = None
  mix: Any = None


@flax.struct.dataclass
class WindowStats:
  """How a window was slept on, per row [B]: `passes` taken (int32), and `expected` passes
  (float32; differentiable under halt="learned", where the ponder cost reads it)."""

  passes: jax.Array
  expected: jax.Array


def _halting_prior(passes: int) -> float:
  """The halting logit's offset: a zero-initialised unit halts with probability 1/N per pass,
  so a fresh model weighs all N passes equally (and halts at the last)."""
  return 0.0 if passes == 1 else -math.log(passes - 1)


def _start_halting(cfg: SleepConfig, batch: int, outputs) -> Halting | None:
  """The bookkeeping before a window's first pass (None under halt="never")."""
  if cfg.halt == "never":
    return None
  halting = Halting(active=jnp.ones((batch,), bool), passes=jnp.zeros((batch,), jnp.int32))
  if cfg.halt == "learned":
    zeros = jnp.zeros((batch,), jnp.float32)
    mix = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), outputs)
    halting = halting.replace(mass=zeros, expected=zeros, mix=mix)
  return halting


def _update_halting(cfg: SleepConfig, halting: Halting, n, old, new, halting_logit) -> Halting:
  """The bookkeeping after pass `n` (1-based) turned the rows' `old` (h, S, last) into `new`."""
  active = halting.active
  passes = halting.passes + active.astype(jnp.int32)
  if cfg.halt == "converge":
    # A row that halted earlier has r = 0 here (its state is kept), so it stays halted.
    still = active & (relative_change(old[1], new[1]) >= cfg.halt_tol)
    return halting.replace(active=still, passes=passes)
  # "learned", adaptive computation time: pass n's weight is its halting probability, but the
  # pass where the probabilities reach 1 - epsilon (or the last) takes what remains.
  probability = jax.nn.sigmoid(halting_logit(new[0]) + _halting_prior(cfg.passes))
  stops = active & ((halting.mass + probability >= 1.0 - HALT_EPSILON) | (n == cfg.passes))
  weight = jnp.where(stops, 1.0 - halting.mass, jnp.where(active, probability, 0.0))
  return Halting(
    active=active & ~stops,
    passes=passes,
    mass=halting.mass + jnp.where(active & ~stops, probability, 0.0),
    expected=halting.expected + weight * n,
    mix=jax.tree.map(lambda m, x: m + _per_row(weight, x), halting.mix, new),
  )


def _pass_step(cfg: SleepConfig, pass_fn, keep_last: bool, halting_logit):
  """One sleep pass as a function of the loop's carry (n, h, S, last, halting).

  `n` counts the passes run (halt="learned" only, where the last pass takes what remains;
  None otherwise, so the fixed-N loop carries nothing it does not need).

  `last` is the pass's (conv tails, attention KV) when `keep_last`, else None. Under an
  adaptive halt a pass changes only the rows still sleeping: a halted row's (h, S, last) are
  kept by a select, so running a pass past a row's halt changes nothing of it."""

  def step(carry):
    n, h, fast_state, last, halting = carry
    n = None if n is None else n + 1
    out = pass_fn(h, fast_state)
    new = (out.h, out.fast_state, (out.conv_state, out.kv) if keep_last else None)
    if halting is None:
      return (n, *new, None)
    old = (h, fast_state, last)
    halting = _update_halting(cfg, halting, n, old, new, halting_logit)
    return (n, *_keep_halted(carry[4].active, new, old), halting)

  return step


def _run_passes(
  step, carry, num_passes: int, unroll: bool, early_stop: bool = False
) -> tuple[Any, ...]:
  """`num_passes` applications of `step` to the loop's carry (n, h, S, last, halting).

  A `lax.scan` (unrolled with `SleepConfig.unroll`); with `early_stop` (inference only: not
  reverse-differentiable) a `lax.while_loop` that ends once every row has halted. The passes it
  skips would change nothing (halted rows keep their state and get no weight), so the values
  are the scan's, and the compute saved is real."""
  if num_passes == 0:
    return carry
  if early_stop and carry[4] is not None:
    # The count of passes run rides in the loop as its first element (halt="learned" has it).
    counted = (jnp.zeros((), jnp.int32), carry)
    cond = lambda c: (c[0] < num_passes) & jnp.any(c[1][4].active)
    _, carry = jax.lax.while_loop(cond, lambda c: (c[0] + 1, step(c[1])), counted)
    return carry
  carry, _ = jax.lax.scan(
    lambda c, _: (step(c), None), carry, None, length=num_passes, unroll=unroll
  )
  return carry


def _sleep_loop(
  cfg: SleepConfig, run, model: HybridLM, h, state, keep_last: bool, early_stop: bool
) -> tuple[jax.Array, FastState, Any, WindowStats]:
  """The loop segment's passes over a window: (h, S, last pass's (tails, KV) or None, stats)."""
  batch = h.shape[0]
  last = None
  if keep_last:
    shapes = jax.eval_shape(run, h, state)
    last = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), (shapes.conv_state, shapes.kv))
  halting = _start_halting(cfg, batch, (h, state, last))
  step = _pass_step(cfg, run, keep_last, model.halting_logit)
  count = jnp.zeros((), jnp.int32) if cfg.halt == "learned" else None
  carry = (count, h, state, last, halting)
  if cfg.frozen_passes:  # halt="never" only (SleepConfig)
    carry = jax.lax.stop_gradient(_run_passes(step, carry, cfg.frozen_passes, cfg.unroll))
  carry = _run_passes(step, carry, cfg.passes - cfg.frozen_passes, cfg.unroll, early_stop)
  _, h, state, last, halting = carry
  if halting is None:
    full = jnp.full((batch,), cfg.passes, jnp.int32)
    return h, state, last, WindowStats(full, full.astype(jnp.float32))
  if cfg.halt == "learned":  # the weighted mean of the passes leaves the window
    h, state, last = jax.tree.map(lambda m, x: m.astype(x.dtype), halting.mix, (h, state, last))
    return h, state, last, WindowStats(halting.passes, halting.expected)
  return h, state, last, WindowStats(halting.passes, halting.passes.astype(jnp.float32))


def sleep_on_chunk_with_stats(
  graphdef: nnx.GraphDef,
  params: Params,
  cfg: SleepConfig,
  carry: Carry,
  chunk_bl: jax.Array,
  early_stop: bool = False,
) -> tuple[Carry, WindowStats]:
  """N passes over one chunk from the incoming carry; returns the next carry and how many
  passes each row took.

  A pass is the model's loop (`ModelConfig.segments`; the whole stack without a loop range);
  a prelude before it and a coda after it run once. Every pass sees the same memory and
  convolution tails (those the previous chunk left); the last pass's tails and KV become the
  next chunk's. grad_passes=k runs the first N-k passes forward only: cutting the gradient at
  the carry also cuts the path back to the prelude and to earlier chunks. Under an adaptive
  halt (`SleepConfig.halt`) rows stop sleeping by its rule; with `early_stop` (inference only:
  no gradients) the passes stop once every row halted.
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

  h, state, outputs, stats = model.embed(chunk_bl), carry.fast, [], None
  for segment, *_ in model.layout:
    run = segment_fn(segment)
    if segment != "loop":
      outputs.append(run(h, state))
      h, state = outputs[-1].h, outputs[-1].fast_state
      continue
    h, state, last, stats = _sleep_loop(cfg, run, model, h, state, keep_last, early_stop)
    if keep_last:
      outputs.append(PassOutput(h, state, *last))
  if keep_last:
    merged = merge_segment_outputs(outputs)
    conv_state, kv = merged.conv_state, merged.kv
  else:
    conv_state, kv = None, None
  return carry_after(cfg, carry, state, conv_state, kv, chunk_bl.shape[1]), stats


def sleep_on_chunk(graphdef, params, cfg, carry, chunk_bl, early_stop=False) -> Carry:
  """`sleep_on_chunk_with_stats` without the stats: the next carry."""
  return sleep_on_chunk_with_stats(graphdef, params, cfg, carry, chunk_bl, early_stop)[0]


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
  with_stats: bool = False,
):
  """Runs the chunk schedule: sleeps on the chunks without loss, predicts those with loss.

  Args:
    graphdef: the model's structure (`nnx.split(model)[0]`), static.
    params: the model's parameters as a nested dict of arrays.
    tokens_bt: int tokens [B, T] (T checked against `cfg.chunks`).
    cfg: the sleep configuration (schedule, passes N, window L, eviction, grad_passes, remat).
    fast_state: incoming fast weights (default zeros: a fresh sequence).
    early_stop: inference only (not differentiable): under an adaptive halt, stop a window's
      passes once every row halted (`sleep_on_chunk_with_stats`).
    with_stats: also return how each slept window was slept on.

  Returns:
    logits [B, P, vocab] (float32) of the predicted positions (`cfg.predicted_spans`, in
    order), and the fast state after the last chunk; with `with_stats` also a `WindowStats`
    of [B, W] arrays over the W slept windows in order (None when nothing is slept on).
  """
  batch, seq_len = tokens_bt.shape
  chunks = cfg.chunks(seq_len)
  model: HybridLM = nnx.merge(graphdef, params)
  carry = initial_carry(model.cfg, cfg, batch)
  if fast_state is not None:
    carry = carry.replace(fast=fast_state)
  if not cfg.evicts:  # one chunk over the whole sequence
    h, fast_state = model.stack_pass(model.embed(tokens_bt), carry.fast)
    logits = model.logits(h[:, cfg.context_len :])
    return (logits, fast_state, None) if with_stats else (logits, fast_state)

  sleep = functools.partial(sleep_on_chunk_with_stats, graphdef, params, cfg, early_stop=early_stop)
  logits, stats = [], []  # stats: WindowStats of [B, windows] per slept group, in order
  for group in _groups(chunks):
    first, last = group[0], group[-1]
    tokens = tokens_bt[:, first.start : last.stop]
    if first.predict:
      h, woke = wake_on_chunk(model, cfg, carry, tokens)
      logits.append(model.logits(h))
      if cfg.predict_then_sleep:
        carry, window = sleep(carry, tokens)
        stats.append(jax.tree.map(lambda x: x[:, None], window))
      else:
        carry = woke
    else:  # one scan over a run of equally long sleep chunks
      windows = jnp.swapaxes(tokens.reshape(batch, len(group), first.length), 0, 1)
      carry, group_stats = jax.lax.scan(sleep, carry, windows, unroll=cfg.unroll)
      stats.append(jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), group_stats))
  logits = jnp.concatenate(logits, axis=1) if len(logits) > 1 else logits[0]
  if not with_stats:
    return logits, carry.fast
  joined = jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=1), *stats) if stats else None
  return logits, carry.fast, joined


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
  cfg.check_model(model.cfg)
  graphdef, state = nnx.split(model)
  return _full_logits(graphdef, nnx.to_pure_dict(state), tokens_bt, cfg)
