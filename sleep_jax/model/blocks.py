"""The residual block of the hybrid stack and the temporal mixers it wraps.

Every mixer maps `(x [B,T,D], state_in, *, context) -> (y [B,T,D], state_out)`, so one
`ResidualBlock` serves every letter of a model's `pattern`. Nothing is held between calls:
  * Gated DeltaNet ("G") and Jet ("J"): state_in is `(S, conv_tails)`: the fast weights S
    [B,H,K,V] float32 and the convolutions' last inputs (G: the q, k, v tails; J: the v tail;
    None: zeros); state_out is the same pair after the call.
  * attention ("A", and "S" with a sliding window): state_in is the prefix `(k, v)` [B,C,H,Dh]
    of earlier tokens the call may also see (None: only the call's own tokens, the paper's hard
    eviction); state_out is the call's own `(k, v)` [B,T,H,Dh], before rotary positions, for
    the caller to keep or drop.
`context` (a `PassContext`, None by default) places the call's tokens and the prefix in one
position frame and carries the sliding window width; without it, positions run from 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from sleep_jax.model.config import (
  ATTENTION,
  GATED_DELTA,
  JET,
  SLIDING_ATTENTION,
  ModelConfig,
  has_mlp,
  mixer_kind,
)
from sleep_jax.model.layers import (
  ADAMW,
  MUON,
  CausalDepthwiseConv,
  Dense,
  RMSNorm,
  convolve_stacked,
  convolve_together,
  dynamic_causal_conv,
  l2_normalize,
  pad_with_tail,
  param,
  project_stacked,
  project_together,
  rotary,
)
from sleep_jax.ops import causal_attention, gated_delta_rule


class SwiGLU(nnx.Module):
  """down(silu(x @ W_gate) * (x @ W_up))."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d, f = cfg.d_model, cfg.mlp_dim
    self.gate = Dense(d, f, logical_axes=("embed", "mlp"), optimizer=MUON, rngs=rngs)
    self.up = Dense(d, f, logical_axes=("embed", "mlp"), optimizer=MUON, rngs=rngs)
    self.down = Dense(f, d, logical_axes=("mlp", "embed"), optimizer=MUON, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Products in x's dtype; the gating and the result in float32 (see `ResidualBlock`)."""
    gate, up = project_together(x, self.gate, self.up, result_dtype=jnp.float32)
    return self.down((jax.nn.silu(gate) * up).astype(x.dtype), jnp.float32)


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
  """Multi-head causal softmax attention over one call's tokens (and an optional prefix).

  With `window`, a query sees only keys fewer than `window` positions back (itself included):
  the sliding-window layers of Jet-Nemotron ("S" blocks).
  """

  def __init__(self, cfg: ModelConfig, *, window: int | None = None, rngs: nnx.Rngs):
    d, hd = cfg.d_model, cfg.num_heads * cfg.head_dim
    kv = cfg.kv_heads * cfg.head_dim  # grouped-query attention when fewer than num_heads
    self.cfg = cfg
    self.window = window
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
    q, k, v = map(split, project_together(x_btd, self.q, self.k, self.v))
    rope = lambda y, positions: rotary(y, positions, self.cfg.rope_base, self.cfg.rope_scaling)
    if context is None and prefix_kv is None and self.window is None:
      positions = jnp.arange(t)  # positions restart at 0 in every chunk (PAPER.md section 3)
      out = causal_attention(
        rope(q, positions), rope(k, positions), v, impl=self.cfg.attention_impl
      )
    else:
      if context is None:  # a sliding-window layer over a fresh chunk
        context = PassContext(
          positions=jnp.arange(t), prefix_positions=jnp.arange(0), prefix_valid=jnp.ones(0, bool)
        )
      if self.window is not None:
        width = self.window if context.width is None else min(context.width, self.window)
        context = context.replace(width=width)
      prefix_kv = prefix_kv if prefix_kv is not None else (k[:, :0], v[:, :0])
      # Rotary positions are applied at use, so a cached key keeps its raw value and any
      # position frame works (only differences of positions matter).
      prefix_k, prefix_v = prefix_kv
      keys = jnp.concatenate(
        [rope(prefix_k, context.prefix_positions), rope(k, context.positions)], axis=1
      )
      values = jnp.concatenate([prefix_v.astype(v.dtype), v], axis=1)
      mask = attention_mask(context, t)[None, None]
      out = jax.nn.dot_product_attention(
        rope(q, context.positions), keys.astype(q.dtype), values, mask=mask
      )
    return self.o(out.reshape(b, t, -1), jnp.float32), (k, v)


class FastWeightMixer(nnx.Module):
  """What Gated DeltaNet and the Jet block share: the gates, the delta rule and the read-out.

  g_t = -exp(A_log) * softplus(x W_a + dt_bias) (log decay <= 0), beta_t = sigmoid(x W_b).
  The delta rule writes the tokens into S; the read-out o_t = S^T (q_t / sqrt(K)) goes through
  a per-head RMSNorm, an output gate silu(x W_g), and the output projection. Subclasses build
  q, k, v, then call `_init_gates_and_read_out` (parameter order fixes the initialisation).
  """

  def _init_gates_and_read_out(self, cfg: ModelConfig, rngs: nnx.Rngs):
    d = cfg.d_model
    h, _, value_dim = cfg.fast_state_shape
    # Gate projections to one scalar per head: tiny matrices, trained with AdamW, not Muon.
    self.decay_proj = Dense(d, h, logical_axes=("embed", "gate_heads"), optimizer=ADAMW, rngs=rngs)
    self.beta_proj = Dense(d, h, logical_axes=("embed", "gate_heads"), optimizer=ADAMW, rngs=rngs)
    # Mamba-2 initialisation: decay rate A ~ U[1, 16], time step dt log-uniform in [1e-3, 1e-1].
    key_a, key_dt = jax.random.split(rngs.params())
    decay_rate = jax.random.uniform(key_a, (h,), minval=1.0, maxval=16.0)
    self.A_log = param(jnp.log(decay_rate), ("gate_heads",))
    dt = jnp.exp(jax.random.uniform(key_dt, (h,), minval=jnp.log(1e-3), maxval=jnp.log(1e-1)))
    self.dt_bias = param(dt + jnp.log(-jnp.expm1(-dt)), ("gate_heads",))  # softplus^-1(dt)
    out_width = h * value_dim
    self.out_gate = Dense(d, out_width, logical_axes=("embed", "heads"), optimizer=MUON, rngs=rngs)
    eps = cfg.norm_eps if cfg.fast_norm_eps is None else cfg.fast_norm_eps
    self.out_norm = RMSNorm(value_dim, logical_axis="head_dim", eps=eps)
    self.o = Dense(out_width, d, logical_axes=("heads", "embed"), optimizer=MUON, rngs=rngs)

  def _project(self, x_btd, *layers: Dense) -> tuple[jax.Array, ...]:
    """The projections feeding the recurrence, multiplied in the compute dtype, in float32.

    Mixed precision: the short convolutions, the normalisations and the delta rule, whose
    error S carries from token to token and pass to pass, run in float32 (their inputs rounded
    to bfloat16 moved the paper model's logits by ~1.5%, the attention blocks' by 0.4%).
    """
    return project_together(x_btd, *layers, result_dtype=jnp.float32)

  def _heads(self, y_btc: jax.Array, width: int) -> jax.Array:
    """[..., H*width] -> [..., H, width]."""
    return y_btc.reshape(*y_btc.shape[:-1], -1, width)

  def _delta_rule_and_read_out(self, q, k, v, out_gate, x_btd, fast_state, context):
    """Gates from x, the gated delta rule from S, and the read-out, normalised and gated by
    silu(out_gate) (x W_g, projected by the subclass with its q, k and v)."""
    x32 = x_btd.astype(jnp.float32)
    decay, beta = project_together(x32, self.decay_proj, self.beta_proj)
    g = -jnp.exp(self.A_log[...]) * jax.nn.softplus(decay + self.dt_bias[...])
    beta = jax.nn.sigmoid(beta)
    impl = (context and context.fast_weight_impl) or self.cfg.fast_weight_impl
    o, fast_state = gated_delta_rule(q, k, v, g, beta, initial_state=fast_state, impl=impl)
    o = self.out_norm(o) * jax.nn.silu(self._heads(out_gate, o.shape[-1]))
    read_out = o.reshape(o.shape[0], o.shape[1], -1).astype(x_btd.dtype)
    return self.o(read_out, jnp.float32), fast_state


class GatedDeltaNet(FastWeightMixer):
  """The Gated DeltaNet mixer of PAPER.md section 2 over an explicit fast-weight state.

  q, k, v: projection -> causal depthwise conv (width 4) -> SiLU; q and k L2-normalised; then
  the gates, delta rule and read-out of `FastWeightMixer`.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d = cfg.d_model
    h, key_dim, value_dim = cfg.fast_state_shape
    self.cfg = cfg
    self.q = Dense(d, h * key_dim, logical_axes=("embed", "heads"), optimizer=MUON, rngs=rngs)
    self.k = Dense(d, h * key_dim, logical_axes=("embed", "heads"), optimizer=MUON, rngs=rngs)
    self.v = Dense(d, h * value_dim, logical_axes=("embed", "heads"), optimizer=MUON, rngs=rngs)
    conv = lambda width: CausalDepthwiseConv(width, cfg.conv_width, logical_axis="heads", rngs=rngs)
    self.conv_q, self.conv_k, self.conv_v = (
      conv(h * key_dim),
      conv(h * key_dim),
      conv(h * value_dim),
    )
    self._init_gates_and_read_out(cfg, rngs)

  def __call__(self, x_btd: jax.Array, state, *, context: PassContext | None = None):
    """(x, (S, conv_tails)) -> (y, (S', conv_tails')): reads and writes the fast weights.

    S is [B,H,K,V] float32; conv_tails is (q, k, v) tails [B, conv_width-1, H*K or H*V] or None.
    """
    fast_state, conv_tails = state
    _, key_dim, value_dim = self.cfg.fast_state_shape
    convs = [self.conv_q, self.conv_k, self.conv_v]
    if key_dim == value_dim:
      # One width: q, k and v stay stacked from their projection through the convolution, the
      # SiLU and the norm. Split and stacked again, they cost a copy each way, forward and
      # backward (34 of the paper step's ~1,060 GPU kernels).
      projected = project_stacked(
        x_btd, self.q, self.k, self.v, self.out_gate, result_dtype=jnp.float32
      )
      qkv, tails = convolve_stacked(projected[..., :3, :], convs, conv_tails)
      qkv = self._heads(jax.nn.silu(qkv), key_dim)  # [B,T,3,H,K]
      qk = l2_normalize(qkv[:, :, :2])
      q, k, v, out_gate = qk[:, :, 0], qk[:, :, 1], qkv[:, :, 2], projected[..., 3, :]
    else:
      q, k, v, out_gate = self._project(x_btd, self.q, self.k, self.v, self.out_gate)
      (q, q_tail), (k, k_tail), (v, v_tail) = convolve_together([q, k, v], convs, conv_tails)
      q = l2_normalize(self._heads(jax.nn.silu(q), key_dim))
      k = l2_normalize(self._heads(jax.nn.silu(k), key_dim))
      v = self._heads(jax.nn.silu(v), value_dim)
      tails = [q_tail, k_tail, v_tail]
    y, fast_state = self._delta_rule_and_read_out(q, k, v, out_gate, x_btd, fast_state, context)
    return y, (fast_state, tuple(tails))


class JetDeltaNet(FastWeightMixer):
  """Jet-Nemotron's Jet block: Gated DeltaNet with an input-generated convolution on V.

  q = silu(x W_q), k = silu(x W_k) (no convolution on q and k), both L2-normalised; v =
  silu(DynamicConv(x W_v)), whose width-W causal filter is generated per token from the same
  input: kernels_t = silu(x_t W_1) W_2 + b_2, one W-tap filter per value channel (tap W-1 is
  the current token). Then the gates, delta rule and read-out of `FastWeightMixer`.
  A fresh block starts as a static convolution: W_2 is zero and b_2 holds the filter.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d, width = cfg.d_model, cfg.conv_width
    h, key_dim, value_dim = cfg.fast_state_shape
    self.cfg = cfg
    self.q = Dense(d, h * key_dim, logical_axes=("embed", "heads"), optimizer=MUON, rngs=rngs)
    self.k = Dense(d, h * key_dim, logical_axes=("embed", "heads"), optimizer=MUON, rngs=rngs)
    self.v = Dense(d, h * value_dim, logical_axes=("embed", "heads"), optimizer=MUON, rngs=rngs)
    hidden = max(1, h * value_dim // cfg.dconv_reduction)
    self.kernel_hidden = Dense(
      d, hidden, logical_axes=("embed", "dconv"), optimizer=MUON, rngs=rngs
    )
    self.kernel_out = Dense(
      hidden,
      h * value_dim * width,
      logical_axes=("dconv", "heads"),
      optimizer=MUON,
      rngs=rngs,
      init_scale=0.0,  # the generated part starts at zero: a fresh block convolves statically
      use_bias=True,
    )
    bound = width**-0.5
    static_filter = jax.random.uniform(
      rngs.params(), (h * value_dim * width,), minval=-bound, maxval=bound
    )
    self.kernel_out.bias = param(static_filter, ("heads",))
    self._init_gates_and_read_out(cfg, rngs)

  def __call__(self, x_btd: jax.Array, state, *, context: PassContext | None = None):
    """(x, (S, (v_tail,))) -> (y, (S', (v_tail',))); v_tail [B, conv_width-1, H*V] or None."""
    fast_state, conv_tails = state
    (v_tail,) = conv_tails or (None,)
    b, t, _ = x_btd.shape
    width = self.cfg.conv_width
    _, key_dim, value_dim = self.cfg.fast_state_shape
    q, k, v_in, out_gate = self._project(x_btd, self.q, self.k, self.v, self.out_gate)
    q = l2_normalize(self._heads(jax.nn.silu(q), key_dim))
    k = l2_normalize(self._heads(jax.nn.silu(k), key_dim))
    padded = pad_with_tail(v_in, v_tail, width)
    # The generator's output channel c * W + w is tap w of value channel c.
    kernels = self.kernel_out(jax.nn.silu(self.kernel_hidden(x_btd)))
    kernels = jnp.swapaxes(kernels.reshape(b, t, -1, width), -1, -2)
    v = self._heads(jax.nn.silu(dynamic_causal_conv(padded, kernels)), value_dim)
    y, fast_state = self._delta_rule_and_read_out(q, k, v, out_gate, x_btd, fast_state, context)
    return y, (fast_state, (padded[:, t:],))


def make_mixer(cfg: ModelConfig, letter: str, rngs: nnx.Rngs) -> nnx.Module:
  """The temporal mixer of a pattern letter."""
  kind = mixer_kind(letter)
  if kind == ATTENTION:
    return CausalSelfAttention(cfg, rngs=rngs)
  if kind == SLIDING_ATTENTION:
    return CausalSelfAttention(cfg, window=cfg.sliding_window, rngs=rngs)
  if kind == GATED_DELTA:
    return GatedDeltaNet(cfg, rngs=rngs)
  if kind == JET:
    return JetDeltaNet(cfg, rngs=rngs)
  raise ValueError(f"unknown block letter {letter!r}")


class ResidualBlock(nnx.Module):
  """x + Mixer(RMSNorm(x), S); x + MLP(RMSNorm(x)), with the mixer named by a pattern letter.

  A lower-case letter has no MLP. With `sandwich_norm` each branch's output is normalised
  before its residual add: x + Norm(Mixer(Norm(x))) (Ouro).

  Args:
    cfg: the model configuration.
    letter: a letter of `config.BLOCK_KINDS` ("A" attention, "G" gated delta, ...), or its
      lower case.
    rngs: the parameter initialisation keys.
  """

  def __init__(self, cfg: ModelConfig, letter: str, *, rngs: nnx.Rngs):
    norm = lambda: RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    self.compute_dtype = cfg.dtype
    self.mixer_norm = norm()
    self.mixer = make_mixer(cfg, letter, rngs)
    self.mixer_out_norm = norm() if cfg.sandwich_norm else None
    mlp = has_mlp(letter)
    self.mlp_norm = norm() if mlp else None
    self.mlp = SwiGLU(cfg, rngs=rngs) if mlp else None
    self.mlp_out_norm = norm() if mlp and cfg.sandwich_norm else None

  def __call__(self, x_btd: jax.Array, state, *, context: PassContext | None = None):
    """(x, mixer state in) -> (x', mixer state out); see the module docstring for the states.

    Mixed precision: x, the residual stream, is float32 (from the embedding). A branch
    multiplies in the model's dtype (`cfg.dtype`: bfloat16 runs the matmuls on bfloat16
    tensor cores) and sums and returns its products in float32, so that bfloat16 rounding
    does not pile up along the stack and the passes (the paper model's logits stay within
    1e-2 of float32's: tests/model/test_model.py)."""
    branch_input = lambda norm: norm(x_btd).astype(self.compute_dtype)
    # Named scopes label every op of a block in compiled programs and profiles.
    with jax.named_scope(type(self.mixer).__name__):
      mixed, state = self.mixer(branch_input(self.mixer_norm), state, context=context)
      if self.mixer_out_norm is not None:
        mixed = self.mixer_out_norm(mixed)
      x_btd = x_btd + mixed.astype(x_btd.dtype)
    if self.mlp is None:
      return x_btd, state
    with jax.named_scope("SwiGLU"):
      mlp_out = self.mlp(branch_input(self.mlp_norm))
      if self.mlp_out_norm is not None:
        mlp_out = self.mlp_out_norm(mlp_out)
      return x_btd + mlp_out.astype(x_btd.dtype), state
