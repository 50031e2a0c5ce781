"""Causal softmax attention in plain XLA, the twin of the fused kernel (pallas_gpu.py).

Shapes: B batch, T tokens, H query heads, G key/value heads (H a multiple of G: grouped-query
attention), D head width. Every query sees the keys at its own position and before it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def causal_attention_reference(q, k, v, *, scale):
  """softmax(scale q k^T, causal) v, scores and softmax in float32; output in q's dtype.

  Args:
    q: [B,T,H,D]; k, v: [B,T,G,D] with H a multiple of G (query head h reads key head
      h // (H/G)).
    scale: multiplies the scores.
  """
  group = q.shape[2] // k.shape[2]
  k, v = (jnp.repeat(x, group, axis=2) for x in (k, v))
  highest = jax.lax.Precision.HIGHEST
  scores = jnp.einsum("bthd,bshd->bhts", q, k, precision=highest).astype(jnp.float32) * scale
  tokens = q.shape[1]
  causal = jnp.tril(jnp.ones((tokens, tokens), bool))
  weights = jax.nn.softmax(jnp.where(causal, scores, -jnp.inf), axis=-1)
  out = jnp.einsum("bhts,bshd->bthd", weights, v.astype(jnp.float32), precision=highest)
  return out.astype(q.dtype)
