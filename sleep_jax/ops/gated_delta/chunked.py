"""Chunked (WY / UT) form of the gated delta rule in plain JAX, with a memory-lean custom VJP.

The math is in shared/CHUNKED.md. Shapes: B batch, T tokens, H heads, K key/query width,
V value width, N chunks, C tokens per chunk (t indexes the output token of a chunk, s the
source token). Two versions share the per-chunk math:

  * `gated_delta_rule_chunked` (impl="chunked"): a `lax.scan` over chunks, each step computing
    one chunk's local terms (decay matrix, triangular inverse, intra-chunk scores) and its state
    hand-off, under a `jax.custom_vjp`. The forward saves only the inputs (in their own layout)
    and the [K, V] state entering every chunk; the backward walks the chunks in reverse,
    re-runs one chunk and differentiates it, using the closed-form gradient of the inverse.
    Working memory is O(T/C * K * V + C * C) per head, whatever T is. A call of one chunk
    (T <= chunk_size) is that chunk differentiated by plain autodiff: the same memory bound,
    no scans and no recomputation.
  * `gated_delta_rule_chunked_autodiff`: the local terms of all chunks at once (big batched
    matmuls), then the state scan, differentiated by plain autodiff, which keeps every [T, C]
    intermediate alive until the backward pass. Kept as the benchmark's baseline and as a
    second opinion in the tests.

One chunk at a time measured faster than all chunks at once on the CPU, forward and backward
(python bench/gated_delta.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from sleep_jax.ops.gated_delta.reference import fill_defaults, pad_tokens, state_dtype

_HIGHEST = jax.lax.Precision.HIGHEST


def _einsum(spec, *operands, precision=_HIGHEST):
  # GPUs default float32 matmuls to TF32; the state must stay accurate over many chunks.
  return jnp.einsum(spec, *operands, precision=precision)


def _to_chunks(x_bt, chunk, dtype):
  """[B,T,H,...] -> [B,H,N,C,...] in `dtype`, zero-padding T up to N*C (see `pad_tokens`)."""
  x_bht = jnp.moveaxis(pad_tokens(x_bt.astype(dtype), chunk), 1, 2)
  return x_bht.reshape(x_bht.shape[:2] + (-1, chunk) + x_bht.shape[3:])


def _segment_sums(g_bhnc):
  """seg[t, s] = g_{s+1} + ... + g_t for s < t, and 0 for s >= t: [..., C, C].

  Summed segment by segment (a cumulative sum over t of g_t masked to t > s), not as the
  difference G_t - G_s of two prefix sums: under strong decay G reaches -1000s, and the
  difference of two such float32 numbers loses the small gap between them (a 1e-4 relative
  error in exp(gap), seen by the fuzzer). Every entry is <= 0, so exp never overflows.
  """
  chunk = g_bhnc.shape[-1]
  strictly_below_ts = jnp.tril(jnp.ones((chunk, chunk), bool), k=-1)
  return jnp.cumsum(jnp.where(strictly_below_ts, g_bhnc[..., :, None], 0.0), axis=-2)


def _sums_by_matmul(g_bhnc):
  """(prefix sums g_1 + ... + g_t [..., C], `_segment_sums` [..., C, C]) as one matmul.

  g [..., C] times a constant 0/1 matrix [C, C + C*C] whose columns select the terms of each
  sum: every sum is still taken over its own tokens only (no difference of prefix sums), and
  one matmul replaces the two cumulative sums, which XLA:CPU runs as several reduce-window
  kernels each way. It multiplies C times the additions, so only small chunks use it.
  """
  chunk = g_bhnc.shape[-1]
  r, t, s = np.ogrid[:chunk, :chunk, :chunk]
  prefix_rt = (r <= t)[:, :, 0]
  segment_rts = ((s < r) & (r <= t)).reshape(chunk, chunk * chunk)
  selector = np.concatenate([prefix_rt, segment_rts], axis=1).astype(g_bhnc.dtype)
  sums = _einsum("...r,rx->...x", g_bhnc, selector)
  return sums[..., :chunk], sums[..., chunk:].reshape(g_bhnc.shape + (chunk,))


def _masked_decay(segment_sums_bhnts):
  """D[t, s] = exp(g_{s+1} + ... + g_t) for s <= t, else exactly 0."""
  chunk = segment_sums_bhnts.shape[-1]
  causal_ts = jnp.tril(jnp.ones((chunk, chunk), bool))
  return jnp.where(causal_ts, jnp.exp(segment_sums_bhnts), 0.0)


# Chunks up to this length take the forms with the fewest kernels (the CPU step is bound by
# kernel count): the inverse by masked doubling and the decay sums as one matmul. Longer ones
# take the forms with the fewest FLOPs: block pairs (masked doubling multiplies whole C x C
# matrices, 4 C^3 per level) and cumulative sums. model/flops.py counts the same rule.
SMALL_CHUNK = 32


def _invert_unit_lower(strict_lower_ts):
  """(I + A)^{-1} for strictly lower-triangular A [..., C, C], by recursive block inversion.

  Both forms use inv([[L11, 0], [L21, L22]]) = [[inv11, 0], [-inv22 L21 inv11, inv22]] bottom-up
  on diagonal blocks of size 1, 2, 4, ...: only batched matmuls, as accurate as forward
  substitution here, cheap to differentiate, and free of the batched CPU LAPACK `trsm` that
  `triangular_solve` lowers to, which deadlocks jaxlib 0.10's thread pool on 2-core hosts (both
  pool threads block in its `ParallelBatchMap` waiting for work that only they could run).
  """
  size = strict_lower_ts.shape[-1]
  # One batch dimension: with several, XLA CPU's YNNPACK fusion of the backward pass crashed
  # (jaxlib 0.10, chunk >= 32; found by bench/fuzz_gated_delta.py).
  one_batch_nts = strict_lower_ts.reshape((-1, size, size))
  if size <= SMALL_CHUNK:
    inverse_nts = _invert_by_masked_doubling(one_batch_nts)
  else:
    inverse_nts = _invert_by_block_pairs(one_batch_nts)
  return inverse_nts.reshape(strict_lower_ts.shape)


def _invert_by_masked_doubling(strict_lower_nts):
  """`_invert_unit_lower` of [N, C, C] with the diagonal blocks of size b held as one
  block-diagonal C x C matrix X: joining the pairs of b-blocks is
  X := X - X (A restricted to the pairs' lower-left blocks) X. Two matmuls and a masked
  select per level and no padding, slicing or concatenation, so few kernels (17 for C = 24
  where block pairs take 39); the products only add exact zeros to the per-block recursion.
  """
  size = strict_lower_nts.shape[-1]
  row, col = np.arange(size)[:, None], np.arange(size)[None, :]

  def lower_left_of_pairs(block):  # (t, s) in the lower-left block of a pair of b-blocks
    same_pair = row // (2 * block) == col // (2 * block)
    return same_pair & (row // block % 2 == 1) & (col // block % 2 == 0)

  # Blocks of size 1 hold 1; joining them needs no product: X = I - A on the first subdiagonal
  # pairs.
  inverse_nts = jnp.eye(size, dtype=strict_lower_nts.dtype) - jnp.where(
    lower_left_of_pairs(1), strict_lower_nts, 0.0
  )
  block = 2
  while block < size:  # ceil(log2(C)) - 1 more levels, unrolled at trace time
    joining_nts = jnp.where(lower_left_of_pairs(block), strict_lower_nts, 0.0)
    inverse_nts = inverse_nts - _einsum(
      "nij,njk->nik", inverse_nts, _einsum("nij,njk->nik", joining_nts, inverse_nts)
    )
    block *= 2
  return inverse_nts


def _invert_by_block_pairs(strict_lower_nts):
  """`_invert_unit_lower` of [N, C, C] on C rounded up to a power of two (the padding is
  identity), the inverses of the diagonal blocks kept as [N, pairs, b, b]."""
  size = strict_lower_nts.shape[-1]
  padded = 1 << (size - 1).bit_length()
  lead_shape = strict_lower_nts.shape[:-2]
  strict_lower_nts = jnp.pad(strict_lower_nts, [(0, 0), (0, padded - size), (0, padded - size)])
  inverse_blocks = jnp.ones(lead_shape + (padded, 1, 1), strict_lower_nts.dtype)
  block = 1
  while block < padded:  # log2(C) levels, unrolled at trace time
    pairs = padded // (2 * block)
    grid = strict_lower_nts.reshape(lead_shape + (pairs, 2 * block, pairs, 2 * block))
    # Diagonal blocks by a masked sum rather than jnp.diagonal (a gather, slow to compile).
    same_pair = jnp.eye(pairs, dtype=grid.dtype)[:, None, :, None]
    diagonal_blocks = jnp.sum(grid * same_pair, axis=-2)
    lower_left = diagonal_blocks[..., block:, :block]
    upper_inverse = inverse_blocks[..., 0::2, :, :]
    lower_inverse = inverse_blocks[..., 1::2, :, :]
    corner = -_einsum(
      "...ij,...jk->...ik", lower_inverse, _einsum("...ij,...jk->...ik", lower_left, upper_inverse)
    )
    top = jnp.concatenate([upper_inverse, jnp.zeros_like(upper_inverse)], axis=-1)
    bottom = jnp.concatenate([corner, lower_inverse], axis=-1)
    inverse_blocks = jnp.concatenate([top, bottom], axis=-2)
    block *= 2
  return inverse_blocks[..., 0, :size, :size]


@jax.custom_vjp
def invert_unit_lower_analytic_vjp(strict_lower_ts):
  """`_invert_unit_lower` with the closed-form gradient of a matrix inverse.

  For M = (I + A)^{-1}: dA = -M^T dM M^T, kept on A's strictly lower support. Two matmuls,
  instead of differentiating through every level of the block recursion.
  """
  return _invert_unit_lower(strict_lower_ts)


def _inverse_forward(strict_lower_ts):
  inverse_ts = _invert_unit_lower(strict_lower_ts)
  return inverse_ts, inverse_ts


def _inverse_backward(inverse_ts, d_inverse_ts):
  inverse_st = jnp.swapaxes(inverse_ts, -1, -2)
  d_lower = -_einsum("...ij,...jk,...kl->...il", inverse_st, d_inverse_ts, inverse_st)
  return (jnp.tril(d_lower, k=-1),)


invert_unit_lower_analytic_vjp.defvjp(_inverse_forward, _inverse_backward)


def chunk_local_terms(
  q_bhnck,
  k_bhnck,
  v_bhncv,
  g_bhnc,
  beta_bhnc,
  scale,
  invert=_invert_unit_lower,
  precision=_HIGHEST,
):
  """Steps 1-3 and the intra-chunk scores of step 5, for all chunks at once.

  `invert` computes (I + A)^{-1}; the lean VJP passes the variant with the closed-form gradient.
  `precision` is that of the matmuls outside the inverse (the staged GPU kernels lower it for
  bfloat16 inputs, see pallas_gpu_staged.py).
  """
  if g_bhnc.shape[-1] <= SMALL_CHUNK:
    cum_bhnc, segment_sums_bhnts = _sums_by_matmul(g_bhnc)
    decay_from_start_bhnc = jnp.exp(cum_bhnc)
  else:
    decay_from_start_bhnc = jnp.exp(jnp.cumsum(g_bhnc, axis=-1))
    segment_sums_bhnts = _segment_sums(g_bhnc)
  # The decay from token t to the chunk's end: the last row of the segment sums.
  decay_to_end_bhnc = jnp.exp(segment_sums_bhnts[..., -1, :])

  decay_bhnts = _masked_decay(segment_sums_bhnts)
  key_gram_bhnts = _einsum("bhntk,bhnsk->bhnts", k_bhnck, k_bhnck, precision=precision)
  chunk = g_bhnc.shape[-1]
  strictly_lower_ts = jnp.tril(jnp.ones((chunk, chunk), bool), k=-1)
  a_bhnts = jnp.where(
    strictly_lower_ts, beta_bhnc[..., :, None] * key_gram_bhnts * decay_bhnts, 0.0
  )

  inverse_bhnts = invert(a_bhnts)
  decayed_keys_bhnck = (beta_bhnc * decay_from_start_bhnc)[..., None] * k_bhnck
  w_bhnck = _einsum("bhnts,bhnsk->bhntk", inverse_bhnts, decayed_keys_bhnck, precision=precision)
  u_bhncv = _einsum(
    "bhnts,bhnsv->bhntv", inverse_bhnts, beta_bhnc[..., None] * v_bhncv, precision=precision
  )

  scaled_q_bhnck = scale * q_bhnck
  scores_bhnts = _einsum("bhntk,bhnsk->bhnts", scaled_q_bhnck, k_bhnck, precision=precision)
  scores_bhnts = scores_bhnts * decay_bhnts
  return {
    "w": w_bhnck,
    "u": u_bhncv,
    "q_decayed": scaled_q_bhnck * decay_from_start_bhnc[..., None],
    "scores": scores_bhnts,
    "k_to_end": k_bhnck * decay_to_end_bhnc[..., None],
    "chunk_decay": decay_from_start_bhnc[..., -1],
  }


def chunk_step(state_bhkv, local, precision=_HIGHEST):
  """Steps 4-6 for one chunk: correct the values with the incoming state, read, update."""
  einsum = functools.partial(_einsum, precision=precision)
  corrected_bhcv = local["u"] - einsum("bhck,bhkv->bhcv", local["w"], state_bhkv)
  out_bhcv = einsum("bhck,bhkv->bhcv", local["q_decayed"], state_bhkv) + einsum(
    "bhts,bhsv->bhtv", local["scores"], corrected_bhcv
  )
  new_state_bhkv = local["chunk_decay"][..., None, None] * state_bhkv + einsum(
    "bhck,bhcv->bhkv", local["k_to_end"], corrected_bhcv
  )
  return new_state_bhkv, out_bhcv


def _prepare(q, k, v, g, beta, scale, initial_state, chunk_size):
  """Defaults, compute dtype and [B,H,N,C,...] chunked inputs for the autodiff path."""
  scale, initial_state = fill_defaults(q, v, scale, initial_state)
  chunk = min(chunk_size, q.shape[1])
  compute_dtype = state_dtype(q, k, v, g, beta, initial_state)
  chunked = tuple(_to_chunks(x, chunk, compute_dtype) for x in (q, k, v, g, beta))
  return chunked, initial_state.astype(compute_dtype), scale


def _run_chunks(chunked, initial_state, scale):
  """Local terms of all chunks at once, then the state scan: (out [B,H,N,C,V], final state)."""
  local = chunk_local_terms(*chunked, scale)
  local_by_chunk = jax.tree.map(lambda x: jnp.moveaxis(x, 2, 0), local)
  final_state, out_nbhcv = jax.lax.scan(chunk_step, initial_state, local_by_chunk)
  return jnp.moveaxis(out_nbhcv, 0, 2), final_state


# --- The lean VJP. It works on the inputs in their own [B,T,H,...] layout and dtype (T padded to
# a whole number of chunks): each step slices one chunk out, so nothing is copied into a chunked
# layout and kept alive. Residuals are the inputs themselves plus the [K,V] state entering every
# chunk; gradients are written chunk by chunk into [B,T,H,...] buffers in place.


def _chunk_at(x_bt, index, chunk, dtype):
  """Chunk `index` of a [B,T,H,...] array as [B,H,C,...] in `dtype`."""
  x_bc = jax.lax.dynamic_slice_in_dim(x_bt, index * chunk, chunk, axis=1)
  return jnp.moveaxis(x_bc, 1, 2).astype(dtype)


def _one_chunk(scale, q_bhck, k_bhck, v_bhcv, g_bhc, beta_bhc, state_bhkv):
  """Output [B,H,C,V] and outgoing state of one chunk: what the backward pass re-differentiates.

  The inverse uses its closed-form gradient, two matmuls instead of the recursion's chain.
  """
  one = tuple(x[:, :, None] for x in (q_bhck, k_bhck, v_bhcv, g_bhc, beta_bhc))
  local = chunk_local_terms(*one, scale, invert=invert_unit_lower_analytic_vjp)
  new_state_bhkv, out_bhcv = chunk_step(state_bhkv, jax.tree.map(lambda x: x[:, :, 0], local))
  return out_bhcv, new_state_bhkv


def _lean_forward(inputs, initial_state, scale, chunk):
  """Returns ((out [B,T,H,V] float, final state), states entering each chunk [N,B,H,K,V])."""
  compute_dtype = initial_state.dtype
  num_chunks = inputs[0].shape[1] // chunk

  def step(state_bhkv, index):
    chunk_inputs = (_chunk_at(x, index, chunk, compute_dtype) for x in inputs)
    out_bhcv, new_state_bhkv = _one_chunk(scale, *chunk_inputs, state_bhkv)
    return new_state_bhkv, (out_bhcv, state_bhkv)

  final_state, (out_nbhcv, states_in) = jax.lax.scan(step, initial_state, jnp.arange(num_chunks))
  num, batch, heads, chunk_len, value_dim = out_nbhcv.shape
  out_btv = jnp.transpose(out_nbhcv, (1, 0, 3, 2, 4)).reshape(
    batch, num * chunk_len, heads, value_dim
  )
  return (out_btv, final_state), states_in


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _chunked_with_lean_vjp(q, k, v, g, beta, initial_state, scale, chunk):
  return _lean_forward((q, k, v, g, beta), initial_state, scale, chunk)[0]


def _lean_vjp_forward(q, k, v, g, beta, initial_state, scale, chunk):
  outputs, states_in = _lean_forward((q, k, v, g, beta), initial_state, scale, chunk)
  return outputs, ((q, k, v, g, beta), states_in)


def _lean_vjp_backward(scale, chunk, residuals, cotangents):
  inputs, states_in = residuals
  d_out_btv, d_final_state = cotangents
  compute_dtype = d_final_state.dtype

  def reverse_step(carry, index):
    d_state_bhkv, grads = carry
    chunk_inputs = [_chunk_at(x, index, chunk, compute_dtype) for x in inputs]
    _, chunk_vjp = jax.vjp(functools.partial(_one_chunk, scale), *chunk_inputs, states_in[index])
    *d_chunk_inputs, d_state_in_bhkv = chunk_vjp(
      (_chunk_at(d_out_btv, index, chunk, compute_dtype), d_state_bhkv)
    )
    grads = tuple(
      jax.lax.dynamic_update_slice_in_dim(buffer, jnp.moveaxis(d, 2, 1), index * chunk, axis=1)
      for buffer, d in zip(grads, d_chunk_inputs)
    )
    return (d_state_in_bhkv, grads), None

  zero_grads = tuple(jnp.zeros(x.shape, compute_dtype) for x in inputs)
  (d_initial_state, grads), _ = jax.lax.scan(
    reverse_step, (d_final_state, zero_grads), jnp.arange(states_in.shape[0]), reverse=True
  )
  return (*(d.astype(x.dtype) for d, x in zip(grads, inputs)), d_initial_state)


_chunked_with_lean_vjp.defvjp(_lean_vjp_forward, _lean_vjp_backward)


def gated_delta_rule_chunked(q, k, v, g, beta, *, scale=None, initial_state=None, chunk_size=64):
  """Runs the gated delta rule chunk by chunk, with the memory-lean custom VJP.

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
    (o, final_state): o [B,T,H,V] in v's dtype, final_state [B,H,K,V] float32. The VJP accepts
    a cotangent for final_state and gives gradients for all six inputs.
  """
  scale, initial_state = fill_defaults(q, v, scale, initial_state)
  num_tokens = q.shape[1]
  chunk = min(chunk_size, num_tokens)
  inputs = [pad_tokens(x, chunk) for x in (q, k, v, g, beta)]
  compute_dtype = state_dtype(q, k, v, g, beta, initial_state)
  if num_tokens == chunk:
    # One chunk: plain autodiff of it keeps only that chunk's terms, the memory the lean VJP
    # exists to bound, and spares the scans, the chunk's recomputation in the backward pass
    # and the gradient buffers (the sleep passes over a short window on the CPU).
    one = [_chunk_at(x, 0, chunk, compute_dtype) for x in inputs]
    out_bhcv, final_state = _one_chunk(float(scale), *one, initial_state.astype(compute_dtype))
    return jnp.moveaxis(out_bhcv, 2, 1).astype(v.dtype), final_state
  out_btv, final_state = _chunked_with_lean_vjp(
    *inputs, initial_state.astype(compute_dtype), float(scale), chunk
  )
  return out_btv[:, :num_tokens].astype(v.dtype), final_state


def gated_delta_rule_chunked_autodiff(
  q, k, v, g, beta, *, scale=None, initial_state=None, chunk_size=64
):
  """The same forward as `gated_delta_rule_chunked`, differentiated by plain autodiff."""
  chunked, initial_state, scale = _prepare(q, k, v, g, beta, scale, initial_state, chunk_size)
  out_bhncv, final_state = _run_chunks(chunked, initial_state, scale)
  batch, heads, num_chunks, chunk, value_dim = out_bhncv.shape
  out_bhtv = out_bhncv.reshape(batch, heads, num_chunks * chunk, value_dim)
  return jnp.moveaxis(out_bhtv, 1, 2)[:, : q.shape[1]].astype(v.dtype), final_state
