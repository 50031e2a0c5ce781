"""The residual block of the hybrid stack and the temporal mixers it wraps.

Both mixers map `(x [B,T,D], fast_state) -> (y [B,T,D], fast_state)`: causal self-attention
passes its fast state (None) through untouched; the Gated DeltaNet reads and writes one
[B,H,K,V] float32 matrix. With one signature, one `ResidualBlock` serves every letter of a
model's `pattern`. Nothing holds state between calls: attention sees only the tokens of the
current call (the current chunk), and the fast-weight matrix is an explicit argument and result.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

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


class CausalSelfAttention(nnx.Module):
  """Multi-head causal softmax attention over the tokens of one call, with rotary positions."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d, hd = cfg.d_model, cfg.num_heads * cfg.head_dim
    self.cfg = cfg
    self.q = Dense(d, hd, logical_axes=("embed", "heads"), optimizer=MUON, rngs=rngs)
    self.k = Dense(d, hd, logical_axes=("embed", "heads"), optimizer=MUON, rngs=rngs)
    self.v = Dense(d, hd, logical_axes=("embed", "heads"), optimizer=MUON, rngs=rngs)
    self.o = Dense(hd, d, logical_axes=("heads", "embed"), optimizer=MUON, rngs=rngs)

  def __call__(self, x_btd: jax.Array, fast_state: None = None) -> tuple[jax.Array, None]:
    """Attention over the call's tokens; `fast_state` (None) is passed through."""
    b, t, _ = x_btd.shape
    split = lambda y: y.reshape(b, t, self.cfg.num_heads, self.cfg.head_dim)
    positions = jnp.arange(t)  # positions restart at 0 in every chunk (PAPER.md section 3)
    q = rotary(split(self.q(x_btd)), positions, self.cfg.rope_base)
    k = rotary(split(self.k(x_btd)), positions, self.cfg.rope_base)
    out = jax.nn.dot_product_attention(q, k, split(self.v(x_btd)), is_causal=True)
    return self.o(out.reshape(b, t, -1)), fast_state


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
    self.out_norm = RMSNorm(cfg.head_dim, logical_axis="head_dim")
    self.o = Dense(hd, d, logical_axes=("heads", "embed"), optimizer=MUON, rngs=rngs)

  def __call__(self, x_btd: jax.Array, fast_state: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Reads and writes the fast weights S [B,H,K,V] float32 over the call's tokens."""
    b, t, _ = x_btd.shape
    heads = lambda y: y.reshape(b, t, self.cfg.num_heads, self.cfg.head_dim)
    q = l2_normalize(heads(jax.nn.silu(self.conv_q(self.q(x_btd)))))
    k = l2_normalize(heads(jax.nn.silu(self.conv_k(self.k(x_btd)))))
    v = heads(jax.nn.silu(self.conv_v(self.v(x_btd))))
    x32 = x_btd.astype(jnp.float32)
    g = -jnp.exp(self.A_log[...]) * jax.nn.softplus(self.decay_proj(x32) + self.dt_bias[...])
    beta = jax.nn.sigmoid(self.beta_proj(x32))
    o, fast_state = gated_delta_rule(
      q, k, v, g, beta, initial_state=fast_state, impl=self.cfg.fast_weight_impl
    )
    o = self.out_norm(o) * jax.nn.silu(heads(self.out_gate(x_btd)))
    return self.o(o.reshape(b, t, -1)), fast_state


MIXERS = {ATTENTION: CausalSelfAttention, GATED_DELTA: GatedDeltaNet}


class ResidualBlock(nnx.Module):
  """x + Mixer(RMSNorm(x), S); x + MLP(RMSNorm(x)), with the mixer named by a pattern letter.

  Args:
    cfg: the model configuration.
    kind: a letter of `config.BLOCK_KINDS` ("A" attention, "G" gated delta).
    rngs: the parameter initialisation keys.
  """

  def __init__(self, cfg: ModelConfig, kind: str, *, rngs: nnx.Rngs):
    self.mixer_norm = RMSNorm(cfg.d_model)
    self.mixer = MIXERS[kind](cfg, rngs=rngs)
    self.mlp_norm = RMSNorm(cfg.d_model)
    self.mlp = SwiGLU(cfg, rngs=rngs)

  def __call__(
    self, x_btd: jax.Array, fast_state: jax.Array | None
  ) -> tuple[jax.Array, jax.Array | None]:
    """(x, S) -> (x', S'); S is None for an attention mixer, [B,H,K,V] float32 for gated delta."""
    mixed, fast_state = self.mixer(self.mixer_norm(x_btd), fast_state)
    x_btd = x_btd + mixed
    return x_btd + self.mlp(self.mlp_norm(x_btd)), fast_state
