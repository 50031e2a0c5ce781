"""Chunked (WY / UT) form of the gated delta rule in plain JAX, differentiated by autodiff.

The math is in shared/CHUNKED.md. Shapes: B batch, T tokens, H heads, K key/query width,
V value width, N chunks, C tokens per chunk (t indexes the output token of a chunk, s the
source token). Everything that depends only on a chunk's own tokens (the decay matrix, the
triangular inverse, the intra-chunk attention scores) is computed for all chunks at once; only
the hand-off of the [K, V] float32 state from chunk to chunk is a `lax.scan`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sleep_jax.ops.gated_delta.reference import fill_defaults, state_dtype

_HIGHEST = jax.lax.Precision.HIGHEST


def _einsum(spec, *operands):
    # GPUs default float32 matmuls to TF32; the state must stay accurate over many chunks.
    return jnp.einsum(spec, *operands, precision=_HIGHEST)


def _to_chunks(x_bt, num_chunks, chunk, dtype):
    """[B,T,H,...] -> [B,H,N,C,...] in `dtype`, zero-padding T up to N*C.

    Zero padding is exactly the no-op token: g = 0 keeps the state, beta = 0 writes nothing,
    q = 0 reads nothing.
    """
    x_bt = x_bt.astype(dtype)
    pad = num_chunks * chunk - x_bt.shape[1]
    x_bt = jnp.pad(x_bt, [(0, 0), (0, pad)] + [(0, 0)] * (x_bt.ndim - 2))
    x_bht = jnp.moveaxis(x_bt, 1, 2)
    return x_bht.reshape(x_bht.shape[:2] + (num_chunks, chunk) + x_bht.shape[3:])


def _masked_decay(cum_log_decay_bhnc):
    """D[t, s] = exp(G_t - G_s) for s <= t, else exactly 0.

    The exponent is masked before `exp`: above the diagonal G_t - G_s > 0 can overflow, and
    masking only the result would still send inf * 0 = NaN into the backward pass.
    """
    chunk = cum_log_decay_bhnc.shape[-1]
    causal_ts = jnp.tril(jnp.ones((chunk, chunk), bool))
    gap_bhnts = cum_log_decay_bhnc[..., :, None] - cum_log_decay_bhnc[..., None, :]
    safe_gap_bhnts = jnp.where(causal_ts, gap_bhnts, 0.0)
    return jnp.where(causal_ts, jnp.exp(safe_gap_bhnts), 0.0)


def _invert_unit_lower(strict_lower_ts):
    """(I + A)^{-1} for strictly lower-triangular A [..., C, C], by recursive block inversion.

    Uses the identity inv([[L11, 0], [L21, L22]]) = [[inv11, 0], [-inv22 L21 inv11, inv22]]
    bottom-up: diagonal blocks of size 1, 2, 4, ... up to C rounded up to a power of two (the
    padding is identity). Only batched matmuls: as accurate as forward substitution here, cheap
    to differentiate, and it avoids the batched CPU LAPACK `trsm` that `triangular_solve` lowers
    to, which deadlocks jaxlib 0.10's thread pool on 2-core hosts (both pool threads block in
    its `ParallelBatchMap` waiting for work that only they could run).
    """
    size = strict_lower_ts.shape[-1]
    padded = 1 << (size - 1).bit_length()
    lead_shape = strict_lower_ts.shape[:-2]
    pad = [(0, 0)] * len(lead_shape) + [(0, padded - size)] * 2
    strict_lower_ts = jnp.pad(strict_lower_ts, pad)
    inverse_blocks = jnp.ones(lead_shape + (padded, 1, 1), strict_lower_ts.dtype)
    block = 1
    while block < padded:  # log2(C) levels, unrolled at trace time
        pairs = padded // (2 * block)
        grid = strict_lower_ts.reshape(lead_shape + (pairs, 2 * block, pairs, 2 * block))
        # Diagonal blocks by a masked sum rather than jnp.diagonal (a gather, slow to compile).
        same_pair = jnp.eye(pairs, dtype=grid.dtype)[:, None, :, None]
        diagonal_blocks = jnp.sum(grid * same_pair, axis=-2)
        lower_left = diagonal_blocks[..., block:, :block]
        upper_inverse = inverse_blocks[..., 0::2, :, :]
        lower_inverse = inverse_blocks[..., 1::2, :, :]
        corner = -_einsum("...ij,...jk->...ik", lower_inverse,
                          _einsum("...ij,...jk->...ik", lower_left, upper_inverse))
        top = jnp.concatenate([upper_inverse, jnp.zeros_like(upper_inverse)], axis=-1)
        bottom = jnp.concatenate([corner, lower_inverse], axis=-1)
        inverse_blocks = jnp.concatenate([top, bottom], axis=-2)
        block *= 2
    return inverse_blocks[..., 0, :size, :size]


def _chunk_local_terms(q_bhnck, k_bhnck, v_bhncv, g_bhnc, beta_bhnc, scale):
    """Steps 1-3 and the intra-chunk scores of step 5, for all chunks at once."""
    cum_log_decay_bhnc = jnp.cumsum(g_bhnc, axis=-1)
    decay_from_start_bhnc = jnp.exp(cum_log_decay_bhnc)
    # G_C - G_t is a sum of g's, hence <= 0: the decay from token t to the chunk's end.
    decay_to_end_bhnc = jnp.exp(cum_log_decay_bhnc[..., -1:] - cum_log_decay_bhnc)

    decay_bhnts = _masked_decay(cum_log_decay_bhnc)
    key_gram_bhnts = _einsum("bhntk,bhnsk->bhnts", k_bhnck, k_bhnck)
    chunk = g_bhnc.shape[-1]
    strictly_lower_ts = jnp.tril(jnp.ones((chunk, chunk), bool), k=-1)
    a_bhnts = jnp.where(
        strictly_lower_ts, beta_bhnc[..., :, None] * key_gram_bhnts * decay_bhnts, 0.0
    )

    inverse_bhnts = _invert_unit_lower(a_bhnts)
    decayed_keys_bhnck = (beta_bhnc * decay_from_start_bhnc)[..., None] * k_bhnck
    w_bhnck = _einsum("bhnts,bhnsk->bhntk", inverse_bhnts, decayed_keys_bhnck)
    u_bhncv = _einsum("bhnts,bhnsv->bhntv", inverse_bhnts, beta_bhnc[..., None] * v_bhncv)

    scaled_q_bhnck = scale * q_bhnck
    scores_bhnts = _einsum("bhntk,bhnsk->bhnts", scaled_q_bhnck, k_bhnck) * decay_bhnts
    return {
        "w": w_bhnck,
        "u": u_bhncv,
        "q_decayed": scaled_q_bhnck * decay_from_start_bhnc[..., None],
        "scores": scores_bhnts,
        "k_to_end": k_bhnck * decay_to_end_bhnc[..., None],
        "chunk_decay": decay_from_start_bhnc[..., -1],
    }


def _chunk_step(state_bhkv, local):
    """Steps 4-6 for one chunk: correct the values with the incoming state, read, update."""
    corrected_bhcv = local["u"] - _einsum("bhck,bhkv->bhcv", local["w"], state_bhkv)
    out_bhcv = _einsum("bhck,bhkv->bhcv", local["q_decayed"], state_bhkv) + _einsum(
        "bhts,bhsv->bhtv", local["scores"], corrected_bhcv
    )
    new_state_bhkv = local["chunk_decay"][..., None, None] * state_bhkv + _einsum(
        "bhck,bhcv->bhkv", local["k_to_end"], corrected_bhcv
    )
    return new_state_bhkv, out_bhcv


def gated_delta_rule_chunked(
    q, k, v, g, beta, *, scale=None, initial_state=None, chunk_size=64
):
    """Runs the gated delta rule chunk by chunk; same contract as the reference.

    Args:
      q: queries [B,T,H,K].
      k: keys [B,T,H,K].
      v: values [B,T,H,V].
      g: log decay [B,T,H], <= 0.
      beta: delta-rule step size [B,T,H], in (0, 1).
      scale: multiplies q; defaults to K**-0.5.
      initial_state: [B,H,K,V] float32, or None for zeros.
      chunk_size: tokens per chunk; the effective chunk is min(chunk_size, T).

    Returns:
      (o, final_state): o [B,T,H,V] in v's dtype, final_state [B,H,K,V] float32.
    """
    batch, num_tokens, heads, _ = q.shape
    value_dim = v.shape[-1]
    scale, initial_state = fill_defaults(q, v, scale, initial_state)
    chunk = min(chunk_size, num_tokens)
    num_chunks = -(-num_tokens // chunk)

    compute_dtype = state_dtype(q, k, v, g, beta, initial_state)
    chunked = [_to_chunks(x, num_chunks, chunk, compute_dtype) for x in (q, k, v, g, beta)]
    local = _chunk_local_terms(*chunked, scale)
    local_by_chunk = jax.tree.map(lambda x: jnp.moveaxis(x, 2, 0), local)
    final_state, out_nbhcv = jax.lax.scan(
        _chunk_step, initial_state.astype(compute_dtype), local_by_chunk
    )
    out_bhtv = jnp.moveaxis(out_nbhcv, 0, 2).reshape(batch, heads, num_chunks * chunk, value_dim)
    out_bthv = jnp.moveaxis(out_bhtv, 1, 2)[:, :num_tokens]
    return out_bthv.astype(v.dtype), final_state
