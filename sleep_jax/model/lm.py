"""The hybrid language model: Embed -> blocks per `pattern` -> final RMSNorm -> output head.

The model exposes the three pieces the sleep schedule composes (it never runs a whole sequence
itself): `embed` a chunk, run one `stack_pass` of all blocks over it while threading the
fast-weight state, and turn features into `logits`. The fast state is a tuple with one
[B,H,K,V] float32 matrix per fast-weight block ("G" or "J"), in pattern order
(`zero_fast_state`). `run_pass` is the general pass the schedules and streaming inference use:
it also threads the convolutions' tails (per fast-weight block, `zero_conv_state`) and gives
each attention block a prefix of earlier keys and values, returning every attention block's own.

The blocks form up to three segments (`ModelConfig.segments`): a prelude, the loop that a
sleep pass repeats, and a coda (without a loop range: the loop alone, the whole stack).
`run_segment` runs one; the sleep schedule runs the prelude once, the loop N times and the coda
once per chunk. Each segment is a repeated unit: its letters are its smallest repeating unit
times R ("AGAG" is "AG" twice, "AGA" is itself once). The unit's blocks are built once per
repetition with `nnx.vmap`, so every parameter of `blocks[j]` (block j of the unit) has a
leading R axis with logical name "layers", and the segment applies the unit R times with
`jax.lax.scan`: the traced program and the compile time do not grow with depth.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from sleep_jax.model.blocks import PassContext, ResidualBlock
from sleep_jax.model.config import (
  ATTENTION_KINDS,
  FAST_WEIGHT_KINDS,
  JET,
  ModelConfig,
  mixer_kind,
)
from sleep_jax.model.layers import ADAMW, Dense, RMSNorm, param

FastState = tuple[jax.Array, ...]
ConvState = tuple[tuple[jax.Array, jax.Array, jax.Array], ...]  # (q, k, v) tails per "G" block
KVPairs = tuple[tuple[jax.Array, jax.Array], ...]  # (k, v) [B,T,H,Dh] per "A" block
LAYERS_AXIS = "layers"  # logical name of the repetition axis of stacked parameters


class PassOutput(NamedTuple):
  """What one `run_pass` returns: features, and every block's state out, in pattern order."""

  h: jax.Array  # [B,T,D]
  fast_state: FastState
  conv_state: ConvState  # the convolutions' last conv_width-1 inputs
  kv: KVPairs  # each attention block's own keys (before rotary) and values over the call


def param_path(keys) -> str:
  """A parameter's name from its pytree key path: "blocks/0/mixer/q/kernel"."""
  return "/".join(str(getattr(k, "key", k)) for k in keys)


def params_by_path(tree) -> dict:
  """{param_path: leaf} over a pure-dict parameter tree (or a tree shaped like it)."""
  return {param_path(keys): leaf for keys, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def zero_fast_state(cfg: ModelConfig, batch_size: int) -> FastState:
  """S = 0 for every fast-weight layer: the state at the start of every sequence."""
  shape = (batch_size, *cfg.fast_state_shape)
  return tuple(jnp.zeros(shape, jnp.float32) for _ in range(cfg.num_fast_weight_layers))


def zero_conv_state(cfg: ModelConfig, batch_size: int) -> ConvState:
  """Zero convolution tails for every fast-weight block (a fresh sequence).

  A gated-delta block has q, k and v tails, a Jet block only the v tail (its q and k have no
  convolution).
  """
  heads, key_dim, value_dim = cfg.fast_state_shape
  # float32 like the convolutions' inputs (blocks._recurrence_inputs), whatever cfg.dtype.
  tail = lambda width: jnp.zeros((batch_size, cfg.conv_width - 1, heads * width), jnp.float32)
  tails = lambda letter: (
    (tail(value_dim),)
    if mixer_kind(letter) == JET
    else (tail(key_dim), tail(key_dim), tail(value_dim))
  )
  return tuple(tails(x) for x in cfg.pattern if mixer_kind(x) in FAST_WEIGHT_KINDS)


def zero_kv(cfg: ModelConfig, batch_size: int, num_tokens: int) -> KVPairs:
  """Zero (k, v) buffers of `num_tokens` slots for every attention block."""
  kv = jnp.zeros((batch_size, num_tokens, cfg.kv_heads, cfg.head_dim), cfg.dtype)
  return tuple((kv, kv) for _ in range(cfg.num_attention_layers))


def repeating_unit(pattern: str) -> tuple[str, int]:
  """The smallest unit u and the count R with u * R == pattern ("AGAG" -> ("AG", 2))."""
  for size in range(1, len(pattern) + 1):
    repeats, rest = divmod(len(pattern), size)
    if not rest and pattern[:size] * repeats == pattern:
      return pattern[:size], repeats
  raise ValueError(f"empty pattern {pattern!r}")


def stacked_blocks(cfg: ModelConfig, unit: str, repeats: int, rngs: nnx.Rngs) -> nnx.List:
  """The blocks of `unit`, each built `repeats` times and stacked along a leading "layers" axis.

  Every repetition draws its own initialisation keys (split rngs). The parameters keep their
  `optimizer` group, and their `logical_axes` gain "layers" in front.
  """

  @nnx.split_rngs(splits=repeats)
  @nnx.vmap(in_axes=0, out_axes=0, axis_size=repeats)
  def build(rngs: nnx.Rngs) -> nnx.List:
    return nnx.List([ResidualBlock(cfg, letter, rngs=rngs) for letter in unit])

  blocks = build(rngs)
  for _, node in nnx.iter_graph(blocks):
    if isinstance(node, nnx.Param):
      node.set_metadata("logical_axes", (LAYERS_AXIS, *node.get_metadata()["logical_axes"]))
  return blocks


SEGMENT_ATTRIBUTES = {"prelude": "prelude_blocks", "loop": "blocks", "coda": "coda_blocks"}


def repeat(f, carry, xs, length: int, *, scan_min_repeats: int):
  """`jax.lax.scan(f, carry, xs, length=length)`; below `scan_min_repeats` iterations, the
  same as a Python loop with every slice of `xs` static (XLA:CPU runs a loop of few iterations
  faster unrolled: no per-iteration slicing of stacked parameters, stacking of residuals, or
  layout copies at the loop boundary). Outputs are stacked either way."""
  if length >= scan_min_repeats:
    return jax.lax.scan(f, carry, xs, length=length)
  ys = []
  for i in range(length):
    carry, y = f(carry, jax.tree.map(lambda x, i=i: x[i], xs))
    ys.append(y)
  return carry, jax.tree.map(lambda *stacked: jnp.stack(stacked), *ys)


class Segment(NamedTuple):
  """One segment of the stack: pattern[start:stop] == unit * repeats."""

  name: str  # "prelude", "loop" or "coda"
  start: int
  stop: int
  unit: str
  repeats: int

  @property
  def attribute(self) -> str:
    """The HybridLM attribute holding this segment's stacked blocks."""
    return SEGMENT_ATTRIBUTES[self.name]


def segment_layout(cfg: ModelConfig) -> tuple[Segment, ...]:
  """The model's non-empty segments in order, each with its repeating unit."""
  return tuple(
    Segment(name, start, stop, *repeating_unit(cfg.pattern[start:stop]))
    for name, start, stop in cfg.segments
  )


def block_places(cfg: ModelConfig) -> list[tuple[Segment, int, int]]:
  """(segment, block of its unit, repetition) of every pattern index, in pattern order."""
  return [
    (segment, *reversed(divmod(index, len(segment.unit))))
    for segment in segment_layout(cfg)
    for index in range(segment.stop - segment.start)
  ]


class HybridLM(nnx.Module):
  """Interleaved attention ("A", "S") and fast-weight ("G", "J") blocks, e.g. pattern "AGAG".

  The blocks fall into up to three segments (`ModelConfig.segments`): a prelude run once per
  chunk, the loop a sleep pass repeats, and a coda run once. Without a loop range the loop is
  the whole stack. Each segment is its own repeated unit, stacked and scanned.

  Attributes:
    layout: the `Segment`s (name, first block, end, unit, R), `unit * R` their letters.
    blocks / prelude_blocks / coda_blocks: one `ResidualBlock` per letter of a segment's unit,
      parameters stacked [R, ...].
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    embedding = jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.d_model))
    self.embedding = param(embedding, ("vocab", "embed"))
    self.layout = segment_layout(cfg)
    for segment in self.layout:
      setattr(self, segment.attribute, stacked_blocks(cfg, segment.unit, segment.repeats, rngs))
    self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    self.halting = (
      Dense(
        cfg.d_model,
        1,
        logical_axes=("embed", None),
        optimizer=ADAMW,
        rngs=rngs,
        init_scale=0.0,
        use_bias=True,
      )
      if cfg.halting_unit
      else None
    )
    self.head = (
      None
      if cfg.tie_embeddings
      else Dense(
        cfg.d_model, cfg.vocab_size, logical_axes=("embed", "vocab"), optimizer=ADAMW, rngs=rngs
      )
    )

  def halting_logit(self, h_btd: jax.Array) -> jax.Array:
    """The halting unit's logit [B] for features [B,T,D] after a sleep pass (halting_unit).

    It reads the pass's mean feature over the window, scaled to unit RMS (the residual stream's
    size grows with depth and passes; the unit should see its direction). Zero-initialised: a
    fresh unit gives every row the same logit, 0."""
    if self.halting is None:
      raise ValueError("this model has no halting unit: build it with model.halting_unit=True")
    pooled = jnp.mean(h_btd.astype(jnp.float32), axis=1)
    pooled = pooled * jax.lax.rsqrt(jnp.mean(jnp.square(pooled), axis=-1, keepdims=True) + 1e-6)
    return self.halting(pooled)[:, 0]

  def embed(self, tokens_bt: jax.Array) -> jax.Array:
    """Token ids [B,T] -> the residual stream [B,T,D], float32 whatever the compute dtype (the
    blocks compute their branches in `cfg.dtype`: `ResidualBlock`)."""
    return jnp.take(self.embedding[...], tokens_bt, axis=0).astype(jnp.float32)

  def stack_pass(self, h_btd: jax.Array, fast_state: FastState) -> tuple[jax.Array, FastState]:
    """One pass of every block over a fresh chunk: (h, S) -> (h', S').

    Attention sees the chunk only and the convolutions start from zeros (hard eviction).

    Args:
      h_btd: features [B,T,D].
      fast_state: one [B,H,K,V] float32 matrix per fast-weight block, in pattern order.

    Returns:
      The features after the last block, and the updated fast state (same structure).
    """
    last = self._run_segments(h_btd, fast_state, fast_state_only=True)[-1]
    return last.h, last.fast_state

  def run_pass(
    self,
    h_btd: jax.Array,
    fast_state: FastState,
    *,
    conv_state: ConvState | None = None,
    kv_prefix: KVPairs | None = None,
    context: PassContext | None = None,
  ) -> PassOutput:
    """One pass of every block (prelude, one loop pass, coda): the general form of `stack_pass`.

    Args:
      h_btd: features [B,T,D].
      fast_state: one [B,H,K,V] float32 matrix per fast-weight block, in pattern order.
      conv_state: one tuple of tails per fast-weight block, or None (zeros).
      kv_prefix: one (k, v) [B,C,H,Dh] prefix per attention block, or None (no prefix).
      context: positions of the call and the prefix, the sliding width (None: a fresh chunk
        with positions from 0; required with a prefix).

    Returns:
      A `PassOutput`: features, fast state, conv tails and each attention block's own (k, v).
    """
    return merge_segment_outputs(
      self._run_segments(
        h_btd, fast_state, conv_state=conv_state, kv_prefix=kv_prefix, context=context
      )
    )

  def _run_segments(self, h_btd: jax.Array, fast_state: FastState, **options) -> list[PassOutput]:
    """Every segment in order, each fed the previous one's features and fast state."""
    outputs = []
    for segment in self.layout:
      outputs.append(self.run_segment(segment.name, h_btd, fast_state, **options))
      h_btd, fast_state = outputs[-1].h, outputs[-1].fast_state
    return outputs

  def run_segment(
    self,
    name: str,
    h_btd: jax.Array,
    fast_state: FastState,
    *,
    conv_state: ConvState | None = None,
    kv_prefix: KVPairs | None = None,
    context: PassContext | None = None,
    fast_state_only: bool = False,
  ) -> PassOutput:
    """One pass of one segment's blocks ("loop": `loop_repeats` times, then the loop norm).

    The states are whole-model tuples in pattern order. The output's fast state is the input's
    with this segment's entries updated; its conv tails and KV hold this segment's entries and
    None for the others' (`merge_segment_outputs` joins segments), or are None with
    `fast_state_only`.
    """
    _, start, stop, unit, repeats = next(x for x in self.layout if x[0] == name)
    fast_lo, fast_hi = self._count(FAST_WEIGHT_KINDS, start), self._count(FAST_WEIGHT_KINDS, stop)
    attn_lo, attn_hi = self._count(ATTENTION_KINDS, start), self._count(ATTENTION_KINDS, stop)
    segment_fast = fast_state[fast_lo:fast_hi]
    segment_conv = None if conv_state is None else conv_state[fast_lo:fast_hi]
    segment_kv = None if kv_prefix is None else kv_prefix[attn_lo:attn_hi]

    def apply_segment(carry, _):
      h_btd, segment_fast = carry
      h_btd, states_out = self._scan_blocks(
        name, unit, repeats, h_btd, segment_fast, segment_conv, segment_kv, context
      )
      segment_fast = self._in_pattern_order(unit, repeats, states_out, FAST_WEIGHT_KINDS, 0)
      if name == "loop" and self.cfg.loop_norm:
        h_btd = self.final_norm(h_btd)
      return (h_btd, segment_fast), states_out

    # Scanned from scan_min_repeats on: the traced program does not grow with Ouro's 4.
    (h_btd, segment_fast), states_out = repeat(
      apply_segment,
      (h_btd, segment_fast),
      None,
      self.cfg.loop_repeats if name == "loop" else 1,
      scan_min_repeats=self.cfg.scan_min_repeats,
    )
    states_out = jax.tree.map(lambda x: x[-1], states_out)  # the last application's
    fast_state = fast_state[:fast_lo] + segment_fast + fast_state[fast_hi:]
    if fast_state_only:
      return PassOutput(h=h_btd, fast_state=fast_state, conv_state=None, kv=None)
    n_fast, n_attn = len(fast_state), self.cfg.num_attention_layers
    pad = lambda entries, lo, hi, total: (None,) * lo + tuple(entries) + (None,) * (total - hi)
    return PassOutput(
      h=h_btd,
      fast_state=fast_state,
      conv_state=pad(
        self._in_pattern_order(unit, repeats, states_out, FAST_WEIGHT_KINDS, 1),
        fast_lo,
        fast_hi,
        n_fast,
      ),
      kv=pad(
        self._in_pattern_order(unit, repeats, states_out, ATTENTION_KINDS, None),
        attn_lo,
        attn_hi,
        n_attn,
      ),
    )

  def _count(self, kinds, end: int) -> int:
    return sum(mixer_kind(x) in kinds for x in self.cfg.pattern[:end])

  @staticmethod
  def _positions(unit: str, kinds) -> list[int]:
    return [j for j, letter in enumerate(unit) if mixer_kind(letter) in kinds]

  def _in_pattern_order(self, unit, repeats, states_out, kinds, index) -> tuple:
    """Unstacks the scan's per-unit-position outputs of one block kind into pattern order."""
    pick = (lambda s: s) if index is None else (lambda s: s[index])
    return tuple(
      jax.tree.map(lambda x, r=r: x[r], pick(states_out[j]))
      for r in range(repeats)
      for j in self._positions(unit, kinds)
    )

  def _scan_blocks(self, name, unit, repeats, h_btd, fast_state, conv_state, kv_prefix, context):
    """The unit applied R times (by `lax.scan` from `scan_min_repeats` on); block outputs stay
    stacked over repetitions."""
    gated, attending = (
      self._positions(unit, FAST_WEIGHT_KINDS),
      self._positions(unit, ATTENTION_KINDS),
    )
    if len(fast_state) != len(gated) * repeats:
      raise ValueError(
        f"pattern {self.cfg.pattern!r} has {len(gated) * repeats} fast-weight blocks in its "
        f"{name}, got a fast state of {len(fast_state)} matrices"
      )
    if kv_prefix is not None and context is None:
      raise ValueError("an attention prefix needs a PassContext giving its positions")
    # Pattern order is repetition-major: block j of repetition r holds state[r*per_unit + i]
    # (i its rank among the unit's blocks of that kind). Scan inputs are stacked over r; a
    # missing state is None (an empty pytree), so every block is called the same way.
    stack = lambda states, i, per_unit: jax.tree.map(
      lambda *xs: jnp.stack(xs), *states[i::per_unit]
    )
    states_in = [None] * len(unit)
    for i, j in enumerate(gated):
      conv = None if conv_state is None else stack(conv_state, i, len(gated))
      states_in[j] = (stack(fast_state, i, len(gated)), conv)
    for i, j in enumerate(attending):
      states_in[j] = None if kv_prefix is None else stack(kv_prefix, i, len(attending))
    graphdefs, stacked_params = zip(
      *(nnx.split(block) for block in getattr(self, SEGMENT_ATTRIBUTES[name]))
    )

    def apply_block(graphdef, params, h, state):
      return nnx.merge(graphdef, params)(h, state, context=context)

    if self.cfg.remat_blocks:  # each block's activations are recomputed in the backward
      apply_block = jax.checkpoint(apply_block, static_argnums=(0,), prevent_cse=False)

    def apply_unit(h, params_and_states):
      states_out = []
      for graphdef, params, state in zip(graphdefs, *params_and_states):
        h, state = apply_block(graphdef, params, h, state)
        states_out.append(state)
      return h, states_out

    return repeat(
      apply_unit,
      h_btd,
      (stacked_params, states_in),
      repeats,
      scan_min_repeats=self.cfg.scan_min_repeats,
    )

  def logits(self, h_btd: jax.Array) -> jax.Array:
    """Features [B,T,D] -> float32 logits [B,T,vocab] (tied: against the embedding matrix).

    The final norm comes first, unless the loop already applied it (`loop_norm`)."""
    if not self.cfg.loop_norm:
      h_btd = self.final_norm(h_btd)
    # The head runs in float32 whatever the compute dtype (the residual stream is float32):
    # bfloat16 inputs alone would move the logits by ~1% of their size, and it is one matmul.
    h_btd = h_btd.astype(jnp.float32)
    if self.head is None:
      return jnp.einsum("btd,vd->btv", h_btd, self.embedding[...].astype(jnp.float32))
    return self.head(h_btd).astype(jnp.float32)


def merge_segment_outputs(outputs: list[PassOutput]) -> PassOutput:
  """One `PassOutput` from consecutive segments' (each fills its own conv and KV entries)."""
  first_set = lambda *entries: next((e for e in entries if e is not None), None)
  return PassOutput(
    h=outputs[-1].h,
    fast_state=outputs[-1].fast_state,
    conv_state=tuple(first_set(*xs) for xs in zip(*(o.conv_state for o in outputs))),
    kv=tuple(first_set(*xs) for xs in zip(*(o.kv for o in outputs))),
  )


def build_model(model_config, *, seed: int) -> HybridLM:
  """Builds a freshly initialised `HybridLM` from `config.model` (a ConfigDict or ModelConfig)."""
  return HybridLM(ModelConfig.from_config(model_config), rngs=nnx.Rngs(params=seed))
