"""Per-token `lax.scan` oracle of the gated delta rule: slow, obviously correct.

Shapes: B batch, T tokens, H heads, K key/query width, V value width. Per head the state
S is [K, V] float32 (float64 when given float64 inputs, for gradient checks) and every token does

  S <- S * exp(g_t);  u_t = beta_t (v_t - S^T k_t);  S <- S + k_t u_t^T;  o_t = S^T (scale q_t).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


def state_dtype(*arrays):
  """float32, or float64 if any input is float64 (x64 gradient checks); never below float32."""
  return jnp.result_type(jnp.float32, *(x.dtype for x in arrays if x is not None))


def _token_step(state_bhkv, token):
  """Advances the state by one token and reads it out with the query."""
  q_bhk, k_bhk, v_bhv, g_bh, beta_bh = token
  state_bhkv = state_bhkv * jnp.exp(g_bh)[..., None, None]
  predicted_bhv = jnp.einsum("bhk,bhkv->bhv", k_bhk, state_bhkv, precision=_HIGHEST)
  error_bhv = beta_bh[..., None] * (v_bhv - predicted_bhv)
  state_bhkv = state_bhkv + k_bhk[..., :, None] * error_bhv[..., None, :]
  out_bhv = jnp.einsum("bhk,bhkv->bhv", q_bhk, state_bhkv, precision=_HIGHEST)
  return state_bhkv, out_bhv


def fill_defaults(q, v, scale, initial_state):
  """The contract's defaults: scale = K**-0.5 and a zero [B,H,K,V] float32 initial state."""
  batch, _, heads, key_dim = q.shape
  if scale is None:
    scale = key_dim**-0.5
  if initial_state is None:
    initial_state = jnp.zeros((batch, heads, key_dim, v.shape[-1]), jnp.float32)
  return scale, initial_state


def pad_tokens(x_bt, multiple):
  """Zero-pads the token axis (axis 1) of a [B,T,...] input up to a multiple of `multiple`.

  A zero token is exactly a no-op: g = 0 keeps the state, beta = 0 writes nothing, q = 0 reads
  nothing. So the chunked forms pad to whole chunks and drop the padded outputs.
  """
  pad = -x_bt.shape[1] % multiple
  if not pad:
    return x_bt
  return jnp.pad(x_bt, [(0, 0), (0, pad)] + [(0, 0)] * (x_bt.ndim - 2))


def gated_delta_rule_reference(q, k, v, g, beta, *, scale=None, initial_state=None):
  """Runs the gated delta rule token by token.

  Args:
    q: queries [B,T,H,K].
    k: keys [B,T,H,K].
    v: values [B,T,H,V].
    g: log decay [B,T,H], <= 0.
    beta: delta-rule step size [B,T,H], in (0, 1).
    scale: multiplies q; defaults to K**-0.5.
    initial_state: [B,H,K,V] float32, or None for zeros.

  Returns:
    (o, final_state): o [B,T,H,V] in v's dtype, final_state [B,H,K,V] float32.
  """
  scale, initial_state = fill_defaults(q, v, scale, initial_state)

  compute_dtype = state_dtype(q, k, v, g, beta, initial_state)

  def time_major(x):
    return jnp.moveaxis(x.astype(compute_dtype), 1, 0)

  tokens = (time_major(q) * scale, time_major(k), time_major(v), time_major(g), time_major(beta))
  final_state, out_tbhv = jax.lax.scan(_token_step, initial_state.astype(compute_dtype), tokens)
  return jnp.moveaxis(out_tbhv, 0, 1).astype(v.dtype), final_state
