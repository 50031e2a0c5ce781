"""The hybrid language model: Embed -> blocks per `pattern` -> final RMSNorm -> output head.

The model exposes the three pieces the sleep schedule composes (it never runs a whole sequence
itself): `embed` a chunk, run one `stack_pass` of all blocks over it while threading the
fast-weight state, and turn features into `logits`. The fast state is a tuple with one
[B,H,K,V] float32 matrix per gated-delta block, in pattern order (`zero_fast_state`).
`run_pass` is the general pass the schedules and streaming inference use: it also threads the
convolutions' tails (one (q, k, v) triple per gated-delta block, `zero_conv_state`) and gives
each attention block a prefix of earlier keys and values, returning every attention block's own.

The stack is a repeated unit: `pattern` is its smallest repeating unit times R ("AGAG" is "AG"
twice, "AGA" is itself once). The unit's blocks are built once per repetition with `nnx.vmap`,
so every parameter of `blocks[j]` (block j of the unit) has a leading R axis with logical name
"layers", and `stack_pass` applies the unit R times with `jax.lax.scan`: the traced program and
the compile time do not grow with depth.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from sleep_jax.model.blocks import PassContext, ResidualBlock
from sleep_jax.model.config import ATTENTION, GATED_DELTA, ModelConfig
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
  shape = (batch_size, cfg.num_heads, cfg.head_dim, cfg.head_dim)
  return tuple(jnp.zeros(shape, jnp.float32) for _ in range(cfg.num_fast_weight_layers))


def zero_conv_state(cfg: ModelConfig, batch_size: int) -> ConvState:
  """Zero tails for every gated-delta block's q, k, v convolutions (a fresh sequence)."""
  tail = jnp.zeros((batch_size, cfg.conv_width - 1, cfg.num_heads * cfg.head_dim), cfg.dtype)
  return tuple((tail, tail, tail) for _ in range(cfg.num_fast_weight_layers))


def zero_kv(cfg: ModelConfig, batch_size: int, num_tokens: int) -> KVPairs:
  """Zero (k, v) buffers of `num_tokens` slots for every attention block."""
  kv = jnp.zeros((batch_size, num_tokens, cfg.kv_heads, cfg.head_dim), cfg.dtype)
  return tuple((kv, kv) for _ in range(cfg.pattern.count(ATTENTION)))


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
    return nnx.List([ResidualBlock(cfg, kind, rngs=rngs) for kind in unit])

  blocks = build(rngs)
  for _, node in nnx.iter_graph(blocks):
    if isinstance(node, nnx.Param):
      node.set_metadata("logical_axes", (LAYERS_AXIS, *node.get_metadata()["logical_axes"]))
  return blocks


class HybridLM(nnx.Module):
  """Interleaved attention ("A") and gated-delta ("G") blocks, e.g. pattern "AGAG".

  Attributes:
    unit: the smallest repeating unit of `cfg.pattern`.
    repeats: R, with `unit * R == cfg.pattern`.
    blocks: one `ResidualBlock` per letter of `unit`, parameters stacked [R, ...].
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    embedding = jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.d_model))
    self.embedding = param(embedding, ("vocab", "embed"))
    self.unit, self.repeats = repeating_unit(cfg.pattern)
    self.blocks = stacked_blocks(cfg, self.unit, self.repeats, rngs)
    self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    self.head = (
      None
      if cfg.tie_embeddings
      else Dense(
        cfg.d_model, cfg.vocab_size, logical_axes=("embed", "vocab"), optimizer=ADAMW, rngs=rngs
      )
    )

  def embed(self, tokens_bt: jax.Array) -> jax.Array:
    """Token ids [B,T] -> features [B,T,D] in the compute dtype."""
    return jnp.take(self.embedding[...], tokens_bt, axis=0).astype(self.cfg.dtype)

  def stack_pass(self, h_btd: jax.Array, fast_state: FastState) -> tuple[jax.Array, FastState]:
    """One pass of every block over a fresh chunk: (h, S) -> (h', S').

    Attention sees the chunk only and the convolutions start from zeros (hard eviction).

    Args:
      h_btd: features [B,T,D].
      fast_state: one [B,H,K,V] float32 matrix per gated-delta block, in pattern order.

    Returns:
      The features after the last block, and the updated fast state (same structure).
    """
    h_btd, states_out = self._scan_blocks(h_btd, fast_state, None, None, None)
    return h_btd, self._in_pattern_order(states_out, GATED_DELTA, lambda s: s[0])

  def run_pass(
    self,
    h_btd: jax.Array,
    fast_state: FastState,
    *,
    conv_state: ConvState | None = None,
    kv_prefix: KVPairs | None = None,
    context: PassContext | None = None,
  ) -> PassOutput:
    """One pass of every block: the general form of `stack_pass`.

    Args:
      h_btd: features [B,T,D].
      fast_state: one [B,H,K,V] float32 matrix per gated-delta block, in pattern order.
      conv_state: one (q, k, v) triple of tails per gated-delta block, or None (zeros).
      kv_prefix: one (k, v) [B,C,H,Dh] prefix per attention block, or None (no prefix).
      context: positions of the call and the prefix, the sliding width (None: a fresh chunk
        with positions from 0; required with a prefix).

    Returns:
      A `PassOutput`: features, fast state, conv tails and each attention block's own (k, v).
    """
    h_btd, states_out = self._scan_blocks(h_btd, fast_state, conv_state, kv_prefix, context)
    return PassOutput(
      h=h_btd,
      fast_state=self._in_pattern_order(states_out, GATED_DELTA, lambda s: s[0]),
      conv_state=self._in_pattern_order(states_out, GATED_DELTA, lambda s: s[1]),
      kv=self._in_pattern_order(states_out, ATTENTION, lambda s: s),
    )

  def _positions(self, kind: str) -> list[int]:
    return [j for j, letter in enumerate(self.unit) if letter == kind]

  def _in_pattern_order(self, states_out, kind: str, pick) -> tuple:
    """Unstacks the scan's per-unit-position outputs of one block kind into pattern order."""
    return tuple(
      jax.tree.map(lambda x, r=r: x[r], pick(states_out[j]))
      for r in range(self.repeats)
      for j in self._positions(kind)
    )

  def _scan_blocks(self, h_btd, fast_state, conv_state, kv_prefix, context):
    """The unit applied R times by `lax.scan`; block outputs stay stacked over repetitions."""
    gated, attending = self._positions(GATED_DELTA), self._positions(ATTENTION)
    if len(fast_state) != len(gated) * self.repeats:
      raise ValueError(
        f"pattern {self.cfg.pattern!r} has {len(gated) * self.repeats} gated-delta "
        f"blocks, got a fast state of {len(fast_state)} matrices"
      )
    if kv_prefix is not None and context is None:
      raise ValueError("an attention prefix needs a PassContext giving its positions")
    # Pattern order is repetition-major: block j of repetition r holds state[r*per_unit + i]
    # (i its rank among the unit's blocks of that kind). Scan inputs are stacked over r; a
    # missing state is None (an empty pytree), so every block is called the same way.
    stack = lambda states, i, per_unit: jax.tree.map(
      lambda *xs: jnp.stack(xs), *states[i::per_unit]
    )
    states_in = [None] * len(self.unit)
    for i, j in enumerate(gated):
      conv = None if conv_state is None else stack(conv_state, i, len(gated))
      states_in[j] = (stack(fast_state, i, len(gated)), conv)
    for i, j in enumerate(attending):
      states_in[j] = None if kv_prefix is None else stack(kv_prefix, i, len(attending))
    graphdef, stacked_params = nnx.split(self.blocks)

    def apply_unit(h, params_and_states):
      params, states = params_and_states
      states_out = []
      for block, state in zip(nnx.merge(graphdef, params), states):
        h, state = block(h, state, context=context)
        states_out.append(state)
      return h, states_out

    return jax.lax.scan(apply_unit, h_btd, (stacked_params, states_in))

  def logits(self, h_btd: jax.Array) -> jax.Array:
    """Features [B,T,D] -> float32 logits [B,T,vocab] (tied: against the embedding matrix)."""
    h_btd = self.final_norm(h_btd)
    if self.head is None:
      embedding = self.embedding[...].astype(h_btd.dtype)
      return jnp.einsum("btd,vd->btv", h_btd, embedding).astype(jnp.float32)
    return self.head(h_btd).astype(jnp.float32)


def build_model(model_config, *, seed: int) -> HybridLM:
  """Builds a freshly initialised `HybridLM` from `config.model` (a ConfigDict or ModelConfig)."""
  return HybridLM(ModelConfig.from_config(model_config), rngs=nnx.Rngs(params=seed))
