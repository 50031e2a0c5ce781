"""The residual block of the hybrid stack and the temporal mixers it wraps.

Both mixers map `(x [B,T,D], state_in, *, context) -> (y [B,T,D], state_out)`, so one
`ResidualBlock` serves every letter of a model's `pattern`. Nothing is held between calls:
  * Gated DeltaNet: state_in is `(S, conv_tails)`: the fast weights S [B,H,K,V] float32 and
    the q/k/v convolutions' last inputs (None: zeros); state_out is the same pair after the call.
  * attention: state_in is the prefix `(k, v)` [B,C,H,Dh] of earlier tokens the call may also
    see (None: only the call's own tokens, the paper's hard eviction); state_out is the call's
    own `(k, v)` [B,T,H,Dh], before rotary positions, for the caller to keep or drop.
`context` (a `PassContext`, None by default) places the call's tokens and the prefix in one
position frame and carries the sliding window width; without it, positions run from 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from sleep_jax.model.config import ATTENTION, GATED_DELTA, ModelConfig
from sleep_jax.model.layers import (
  ADAMW,
  MUON,
  CausalDepthwiseConv,
  Dense,
  RMSNorm,
  l2_normalize,
  param,
  rotary,
)
from sleep_jax.ops import gated_delta_rule


class SwiGLU(nnx.Module):
  """down(silu(x @ W_gate) * (x @ W_up))."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d, f = cfg.d_model, cfg.mlp_dim
    self.gate = Dense(d, f, logical_axes=("embed", "mlp"), optimizer=MUON, rngs=rngs)
    self.up = Dense(d, f, logical_axes=("embed", "mlp"), optimizer=MUON, rngs=rngs)
    self.down = Dense(f, d, logical_axes=("mlp", "embed"), optimizer=MUON, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


@struct.dataclass
class PassContext:
  """Where a call's tokens sit relative to the attention prefix (shared by every block).

  Attributes:
    positions: [T] int32 positions of the call's tokens.
    prefix_positions: [C] int32 positions of the prefix tokens, in the same frame.
    prefix_valid: [C] bool, which prefix slots hold a token (a fixed-size buffer may be part full).
    width: a query sees keys fewer than `width` positions back (sliding window); None: all.
    fast_weight_impl: overrides the model's gated delta impl (e.g. "reference" for one token).
  """

  positions: jax.Array
  prefix_positions: jax.Array
  prefix_valid: jax.Array
  width: int | None = struct.field(pytree_node=False, default=None)
  fast_weight_impl: str | None = struct.field(pytree_node=False, default=None)


def attention_mask(context: PassContext, num_tokens: int) -> jax.Array:
  """[T, C+T] bool: query i sees valid prefix slots and its own causal past, within `width`."""
  own = jnp.arange(num_tokens)
  sees_prefix = context.prefix_valid[None, :] & jnp.ones((num_tokens, 1), bool)
  sees_own = own[None, :] <= own[:, None]
  if context.width is not None:
    back_prefix = context.positions[:, None] - context.prefix_positions[None, :]
    back_own = context.positions[:, None] - context.positions[None, :]
    sees_prefix &= back_prefix < context.width
    sees_own &= back_own < context.width
  return jnp.concatenate([sees_prefix, sees_own], axis=1)


class CausalSelfAttention(nnx.Module):
  """Multi-head causal softmax attention over one call's tokens (and an optional prefix)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d, hd = cfg.d_model, cfg.num_heads * cfg.head_dim
    kv = cfg.kv_heads * cfg.head_dim  # grouped-query attention when fewer than num_heads
    self.cfg = cfg
    project = lambda width: Dense(
      d, width, logical_axes=("embed", "heads"), optimizer=MUON, rngs=rngs, use_bias=cfg.qkv_bias
    )
    self.q, self.k, self.v = project(hd), project(kv), project(kv)
    self.o = Dense(hd, d, logical_axes=("heads", "embed"), optimizer=MUON, rngs=rngs)

  def __call__(
    self, x_btd: jax.Array, prefix_kv=None, *, context: PassContext | None = None
  ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """Attention over the prefix and the call's tokens -> (y, the call's own (k, v))."""
    b, t, _ = x_btd.shape
    split = lambda y: y.reshape(b, t, -1, self.cfg.head_dim)
    q, k, v = split(self.q(x_btd)), split(self.k(x_btd)), split(self.v(x_btd))
    base = self.cfg.rope_base
    if context is None and prefix_kv is None:
      positions = jnp.arange(t)  # positions restart at 0 in every chunk (PAPER.md section 3)
      out = jax.nn.dot_product_attention(
        rotary(q, positions, base), rotary(k, positions, base), v, is_causal=True
      )
    else:
      prefix_kv = prefix_kv if prefix_kv is not None else (k[:, :0], v[:, :0])
      # Rotary positions are applied at use, so a cached key keeps its raw value and any
      # position frame works (only differences of positions matter).
      prefix_k, prefix_v = prefix_kv
      keys = jnp.concatenate(
        [rotary(prefix_k, context.prefix_positions, base), rotary(k, context.positions, base)], 1
      )
      values = jnp.concatenate([prefix_v.astype(v.dtype), v], axis=1)
      mask = attention_mask(context, t)[None, None]
      out = jax.nn.dot_product_attention(
        rotary(q, context.positions, base), keys.astype(q.dtype), values, mask=mask
      )
    return self.o(out.reshape(b, t, -1)), (k, v)


class GatedDeltaNet(nnx.Module):
  """The Gated DeltaNet mixer of PAPER.md section 2 over an explicit fast-weight state.

  q, k, v: projection -> causal depthwise conv (width 4) -> SiLU; q and k L2-normalised.
  g_t = -exp(A_log) * softplus(x W_a + dt_bias) (log decay <= 0), beta_t = sigmoid(x W_b).
  The delta rule writes the tokens into S; the read-out o_t = S^T (q_t / sqrt(K)) goes through
  a per-head RMSNorm, an output gate silu(x W_g), and the output projection.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d, h, hd = cfg.d_model, cfg.num_heads, cfg.num_heads * cfg.head_dim
    self.cfg = cfg
    self.q = Dense(d, hd, logical_axes=("embed", "heads"), optimizer=MUON, rngs=rngs)
    self.k = Dense(d, hd, logical_axes=("embed", "heads"), optimizer=MUON, rngs=rngs)
    self.v = Dense(d, hd, logical_axes=("embed", "heads"), optimizer=MUON, rngs=rngs)
    self.conv_q = CausalDepthwiseConv(hd, cfg.conv_width, logical_axis="heads", rngs=rngs)
    self.conv_k = CausalDepthwiseConv(hd, cfg.conv_width, logical_axis="heads", rngs=rngs)
    self.conv_v = CausalDepthwiseConv(hd, cfg.conv_width, logical_axis="heads", rngs=rngs)
    # Gate projections to one scalar per head: tiny matrices, trained with AdamW, not Muon.
    self.decay_proj = Dense(d, h, logical_axes=("embed", "gate_heads"), optimizer=ADAMW, rngs=rngs)
    self.beta_proj = Dense(d, h, logical_axes=("embed", "gate_heads"), optimizer=ADAMW, rngs=rngs)
    # Mamba-2 initialisation: decay rate A ~ U[1, 16], time step dt log-uniform in [1e-3, 1e-1].
    key_a, key_dt = jax.random.split(rngs.params())
    decay_rate = jax.random.uniform(key_a, (h,), minval=1.0, maxval=16.0)
    self.A_log = param(jnp.log(decay_rate), ("gate_heads",))
    dt = jnp.exp(jax.random.uniform(key_dt, (h,), minval=jnp.log(1e-3), maxval=jnp.log(1e-1)))
    self.dt_bias = param(dt + jnp.log(-jnp.expm1(-dt)), ("gate_heads",))  # softplus^-1(dt)
    self.out_gate = Dense(d, hd, logical_axes=("embed", "heads"), optimizer=MUON, rngs=rngs)
    self.out_norm = RMSNorm(cfg.head_dim, logical_axis="head_dim", eps=cfg.norm_eps)
    self.o = Dense(hd, d, logical_axes=("heads", "embed"), optimizer=MUON, rngs=rngs)

  def __call__(self, x_btd: jax.Array, state, *, context: PassContext | None = None):
    """(x, (S, conv_tails)) -> (y, (S', conv_tails')): reads and writes the fast weights.

    S is [B,H,K,V] float32; conv_tails is (q, k, v) tails [B, conv_width-1, H*Dh] or None.
    """
    fast_state, conv_tails = state
    conv_tails = conv_tails or (None, None, None)
    b, t, _ = x_btd.shape
    heads = lambda y: y.reshape(b, t, self.cfg.num_heads, self.cfg.head_dim)
    convolved = [
      conv(proj(x_btd), tail)
      for conv, proj, tail in zip(
        (self.conv_q, self.conv_k, self.conv_v), (self.q, self.k, self.v), conv_tails
      )
    ]
    (q, q_tail), (k, k_tail), (v, v_tail) = convolved
    q = l2_normalize(heads(jax.nn.silu(q)))
    k = l2_normalize(heads(jax.nn.silu(k)))
    v = heads(jax.nn.silu(v))
    x32 = x_btd.astype(jnp.float32)
    g = -jnp.exp(self.A_log[...]) * jax.nn.softplus(self.decay_proj(x32) + self.dt_bias[...])
    beta = jax.nn.sigmoid(self.beta_proj(x32))
    impl = (context and context.fast_weight_impl) or self.cfg.fast_weight_impl
    o, fast_state = gated_delta_rule(q, k, v, g, beta, initial_state=fast_state, impl=impl)
    o = self.out_norm(o) * jax.nn.silu(heads(self.out_gate(x_btd)))
    return self.o(o.reshape(b, t, -1)), (fast_state, (q_tail, k_tail, v_tail))


MIXERS = {ATTENTION: CausalSelfAttention, GATED_DELTA: GatedDeltaNet}


class ResidualBlock(nnx.Module):
  """x + Mixer(RMSNorm(x), S); x + MLP(RMSNorm(x)), with the mixer named by a pattern letter.

  Args:
    cfg: the model configuration.
    kind: a letter of `config.BLOCK_KINDS` ("A" attention, "G" gated delta).
    rngs: the parameter initialisation keys.
  """

  def __init__(self, cfg: ModelConfig, kind: str, *, rngs: nnx.Rngs):
    self.mixer_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    self.mixer = MIXERS[kind](cfg, rngs=rngs)
    self.mlp_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    self.mlp = SwiGLU(cfg, rngs=rngs)

  def __call__(self, x_btd: jax.Array, state, *, context: PassContext | None = None):
    """(x, mixer state in) -> (x', mixer state out); see the module docstring for the states."""
    mixed, state = self.mixer(self.mixer_norm(x_btd), state, context=context)
    x_btd = x_btd + mixed
    return x_btd + self.mlp(self.mlp_norm(x_btd)), state
