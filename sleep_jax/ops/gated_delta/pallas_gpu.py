"""Pallas kernels of the gated delta rule for NVIDIA GPUs (Triton backend), forward and backward.

Why Triton rather than Mosaic GPU (JAX's default Pallas backend on Hopper): the per-chunk work
is a handful of small matmuls plus triangular solves, written once as array code in
kernel_math.py and shared with the TPU kernel. The Triton backend lowers that array code
directly (it tiles, picks MMA instructions and pipelines loads itself), and the very same kernel
bodies run in interpret mode on a CPU, which is how the tests pin their values and gradients.
Mosaic GPU asks for the schedule by hand (warpgroups, TMA copies with 16-byte-aligned strides,
which our [C, 1] decay columns violate, explicit SMEM pipelining).

Design: kernels small enough for the register file. The first design, one program per (batch,
head, value block) doing all of every chunk's work as it walked the chunks, did not fit Hopper at
K = V = 128: ptxas spilled 120 KB forward, and the backward asked for 294,912 B of shared
memory. Measured on its PTX and on smaller bodies (ptxas 12.9, sm_90a, 255 registers a thread):
a [64, 64] float32 tile costs a thread 32 registers at 4 warps; a TF32x3 matmul holds its left
operand three times over; every warpgroup MMA k-step over a shared-memory operand needs a 64-bit
descriptor that LLVM computes once and keeps for the whole kernel (8 per operand of 64 rows in
TF32, two operands per TF32x3 matmul); and a loop keeps the hoisted address of every tile it
reads. So a loop over chunks can afford only the products that need its carry, and the rest
runs outside it, parallel over chunks, the way flash-linear-attention cuts chunk_gated_delta_rule:

  forward   1. local terms (grid B, H, N): the decays e, r, D and the Gram matrices
               A' = strictly lower (k k^T * D) and P = (s q k^T) * D, which do not depend on
               the values: once per chunk rather than once per value block.
            2. the walk (grid B, H, V/block): Y = beta (v - e k S), U~ = (I + A)^{-1} Y by
               forward substitution (A = beta A', never inverted), S' = gamma S + k^T (r U~).
               Saves the state entering every chunk and U~.
            3. outputs (grid B, H, N, V/block): o = (s q e) S + P U~.
  backward  1. local terms again (and D).
            2. local pulls (grid B, H, N, V/block): P^T dO and (s q e)^T dO, the parts of dU~
               and dS that do not depend on the walk's carry.
            3. the reverse walk (grid B, H, V/block): dU~ = P^T dO + r (k dS'), dY =
               (I + A)^{-T} dU~ by back substitution, dv = beta dY, dS = gamma dS' + (s q e)^T dO
               - k^T (beta e dY). Saves every chunk's outgoing-state cotangent dS' and dY.
            4. pair gradients (grid B, H, N): dP = dO U~^T and dA = -dY U~^T summed over the
               value blocks, turned into the cotangents of s q k^T and k k^T and the segment
               part of dg.
            5. key gradients (grid B, H, N, K/block): dq and dk of one key block of one chunk, from
               those and from dO S^T, dY S^T and U~ dS'^T summed over the value blocks.
            dg and dbeta are assembled from the kernels' per-token partial sums in XLA (a few
            [B, H, T] elementwise ops and running sums within each chunk).

Every product with the state goes by key blocks of `Tiles.key_block` rows, so no operand is wider
than 64 whatever K is, and the chunk is 64 so that every product has the 64 rows Hopper's
warpgroup MMA needs. Tiles are read where they are used (`read_tile`, a volatile load, neither
merged with an earlier read of the same tile nor hoisted above a loop), not kept in registers
in between. Measured with the table below (ptxas 12.9, B=2, T=1024, H=4, float32 and bfloat16,
K = V = 64 and 128): no kernel spills, the largest uses 244 registers and 32 KB of shared memory.

Matmul precision (`matmul_precision`): HIGHEST in the interpreter; TF32x3 when compiled (Pallas
lowers HIGHEST to Triton's IEEE dot, a scalar-FMA matmul whose register demand alone spills).

Triton wants power-of-two tiles of at least 16: K and V are zero-padded up to that (zero key and
value columns leave the state and outputs unchanged), and the chunk is a power of two. The tile
sizes per shape are in `_TILES`; the math does not depend on them.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from sleep_jax.ops.gated_delta import kernel_math
from sleep_jax.ops.gated_delta.kernel_math import Matmuls
from sleep_jax.ops.gated_delta.reference import fill_defaults

_NUM_STAGES = 1  # the chunk loops carry a dependency; there is nothing to prefetch ahead


class Tiles(NamedTuple):
  """How one shape is cut for the Triton kernels. Every entry gives the same math (up to
  rounding): the chunk only regroups the recurrence, and blocks of keys or values are summed."""

  chunk: int  # the largest chunk, in tokens (a smaller chunk_size is kept)
  block_v: int  # value columns per program of the walks and per step of the gradient kernels
  key_block: int  # key columns per product with the state, and per key-gradient program
  gram_block: int  # key columns per product of the Gram matrices
  local_warps: int
  walk_warps: int
  chunk_warps: int  # the outputs and local pulls
  gradient_warps: int


# Padded max(K, V) -> Tiles. Sized so that ptxas (sm_90a) spills nothing and shared memory stays
# under the H100/H200 opt-in limit of 232,448 B, float32 and bfloat16 alike, with TF32x3 (see
# the module docstring; checked by tests/gpu_compile/test_kernels.py). Value blocks of 16 at 128:
# the reverse walk used 252 of 255 registers with 32. 8 warps for the gradient kernels, which hold
# two or three [C, C] tiles at once (4 spilled 60 B). At 256, float32's reverse walk still spills
# 56 B.
_TILES = {
  16: Tiles(64, 16, 16, 16, 4, 4, 4, 8),
  32: Tiles(64, 32, 32, 16, 4, 4, 4, 8),
  64: Tiles(64, 32, 64, 16, 4, 4, 4, 8),
  128: Tiles(64, 16, 64, 16, 4, 4, 4, 8),
  256: Tiles(64, 16, 64, 16, 4, 4, 4, 8),
}


def tiles_for(key_dim, value_dim):
  """The tile table's entry for padded widths K and V (the largest listed one above 128)."""
  width = max(key_dim, value_dim)
  return _TILES.get(width, _TILES[max(_TILES)])


def matmul_precision(interpret, requested=kernel_math.HIGHEST):
  """The precision to give a Triton kernel's float32 matmuls that should be `requested`.

  Interpreted (the CPU tests): `requested` itself. Compiled for a GPU, HIGHEST would lower to
  Triton's IEEE dot, a scalar-FMA matmul off the tensor cores whose register demand spills
  (thousands of fma.rn.f32 per chunk); TF32x3 (three TF32 MMAs on hi/lo splits) keeps the
  tensor cores at about float32 accuracy. XLA:CPU rejects that preset, hence the split.
  Anything below HIGHEST (TF32 for the staged kernels' bfloat16 inputs) passes through.
  """
  if interpret or requested != kernel_math.HIGHEST:
    return requested
  return jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3


def compiler_params(num_warps):
  return pltriton.CompilerParams(num_warps=num_warps, num_stages=_NUM_STAGES)


def read_tile(ref, *index):
  """A tile of `ref` in float32, read here and now (a volatile load, see the module docstring)."""
  view = ref.at[index] if index else ref
  return pltriton.load(view, volatile=True).astype(jnp.float32)


def block_slice(width, index, size):
  """The `index`-th block of `size` of an axis of `width` (the whole axis if it is one block)."""
  return pl.ds(index * size, size) if width > size else slice(None)


# --- Forward 1 / backward 1: the chunk's local terms. -------------------------------------------


def _local_terms_kernel(
  q_ref,
  k_ref,
  g_ref,
  from_start_ref,
  to_end_ref,
  key_gram_ref,
  scores_ref,
  *decay_ref,
  scale,
  gram_block,
  precision,
):
  """A' = strictly lower (k k^T * D), P = (s q k^T) * D, e and r of one chunk (and D if asked)."""
  mm = Matmuls(precision)
  key_dim = k_ref.shape[-1]
  decay = kernel_math.decays(read_tile(g_ref))
  from_start_ref[...] = decay.from_start_c1
  to_end_ref[...] = decay.to_end_c1
  if decay_ref:
    decay_ref[0][...] = decay.matrix_ts

  def gram(left_ref, right_ref):
    total = None
    for j in range(key_dim // gram_block):
      cols = block_slice(key_dim, j, gram_block)
      product = mm.nt(
        read_tile(left_ref, slice(None), cols), read_tile(right_ref, slice(None), cols)
      )
      total = product if total is None else total + product
    return total

  key_gram_ref[...] = kernel_math.strictly_lower(gram(k_ref, k_ref) * decay.matrix_ts)
  scores_ref[...] = scale * gram(q_ref, k_ref) * decay.matrix_ts


def _local_terms(q, k, g, *, scale, chunk, tiles, with_decay_matrix, interpret):
  """(e [B,H,Tp,1], r [B,H,Tp,1], A' [B,H,N,C,C], P [B,H,N,C,C], and D [B,H,N,C,C] if asked)."""
  batch, heads, padded_len, key_dim = q.shape
  num_chunks = padded_len // chunk
  tile = lambda width: pl.BlockSpec((None, None, chunk, width), lambda b, h, c: (b, h, c, 0))
  square = pl.BlockSpec((None, None, None, chunk, chunk), lambda b, h, c: (b, h, c, 0, 0))
  column = jax.ShapeDtypeStruct((batch, heads, padded_len, 1), jnp.float32)
  squares = jax.ShapeDtypeStruct((batch, heads, num_chunks, chunk, chunk), jnp.float32)
  num_squares = 3 if with_decay_matrix else 2
  kernel = functools.partial(
    _local_terms_kernel,
    scale=scale,
    gram_block=min(tiles.gram_block, key_dim),
    precision=matmul_precision(interpret),
  )
  return pl.pallas_call(
    kernel,
    grid=(batch, heads, num_chunks),
    in_specs=[tile(key_dim), tile(key_dim), tile(1)],
    out_specs=[tile(1), tile(1)] + [square] * num_squares,
    out_shape=[column, column] + [squares] * num_squares,
    compiler_params=compiler_params(tiles.local_warps),
    interpret=interpret,
    name="gated_delta_local_terms",
  )(q, k, g)


# --- Forward 2 / backward 3: the walks. ---------------------------------------------------------


def _walk_kernel(
  k_ref,
  v_ref,
  g_ref,
  beta_ref,
  from_start_ref,
  to_end_ref,
  key_gram_ref,
  initial_state_ref,
  states_ref,
  corrected_ref,
  final_state_ref,
  *,
  chunk,
  key_block,
  precision,
):
  """The forward walk: per chunk Y = beta (v - e k S), U~ = (I + A)^{-1} Y (A = beta A') and
  S' = gamma S + k^T (r U~). Saves S entering each chunk and U~."""
  mm = Matmuls(precision)
  key_dim = k_ref.shape[-1]
  blocks = range(key_dim // key_block)
  state_rows = lambda j: pl.ds(j * key_block, key_block)

  def step(c, state_blocks):
    rows = pl.ds(pl.multiple_of(c * chunk, chunk), chunk)
    keys = lambda j: read_tile(k_ref, rows, block_slice(key_dim, j, key_block))
    for j in blocks:
      states_ref[c, state_rows(j), :] = state_blocks[j]
    beta_c1 = beta_ref[rows, :]
    keys_through_state = sum(mm.nn(keys(j), state_blocks[j]) for j in blocks)
    right_cv = beta_c1 * (
      read_tile(v_ref, rows, slice(None)) - from_start_ref[rows, :] * keys_through_state
    )
    corrected_cv = kernel_math.forward_substitute(beta_c1 * read_tile(key_gram_ref, c), right_cv)
    corrected_ref[rows, :] = corrected_cv
    total_11 = jnp.exp(jnp.sum(g_ref[rows, :], axis=0, keepdims=True))
    corrected_to_end_cv = to_end_ref[rows, :] * corrected_cv
    return tuple(total_11 * state_blocks[j] + mm.tn(keys(j), corrected_to_end_cv) for j in blocks)

  initial = tuple(initial_state_ref[state_rows(j), :] for j in blocks)
  final = jax.lax.fori_loop(0, states_ref.shape[0], step, initial)
  for j in blocks:
    final_state_ref[state_rows(j), :] = final[j]


def _reverse_walk_kernel(
  k_ref,
  v_ref,
  g_ref,
  beta_ref,
  from_start_ref,
  to_end_ref,
  key_gram_ref,
  d_corrected_local_ref,
  d_state_local_ref,
  d_final_state_ref,
  d_states_out_ref,
  d_right_ref,
  dv_ref,
  dbeta_ref,
  d_initial_state_ref,
  *,
  chunk,
  key_block,
  precision,
):
  """The reverse walk: per chunk dU~ = P^T dO + r (k dS'), dY = (I + A)^{-T} dU~,
  dv = beta dY and dS = gamma dS' + (s q e)^T dO - k^T (beta e dY). The terms without dS'
  (P^T dO, (s q e)^T dO) come precomputed. Saves every chunk's dS' and dY."""
  mm = Matmuls(precision)
  key_dim = k_ref.shape[-1]
  num_chunks = d_states_out_ref.shape[0]
  blocks = range(key_dim // key_block)
  state_rows = lambda j: pl.ds(j * key_block, key_block)

  def step(i, d_state_blocks):
    c = num_chunks - 1 - i
    rows = pl.ds(pl.multiple_of(c * chunk, chunk), chunk)
    keys = lambda j: read_tile(k_ref, rows, block_slice(key_dim, j, key_block))
    for j in blocks:
      d_states_out_ref[c, state_rows(j), :] = d_state_blocks[j]
    beta_c1 = beta_ref[rows, :]
    keys_through_d_state = sum(mm.nn(keys(j), d_state_blocks[j]) for j in blocks)
    d_corrected_cv = (
      read_tile(d_corrected_local_ref, rows, slice(None))
      + to_end_ref[rows, :] * keys_through_d_state
    )
    d_right_cv = kernel_math.back_substitute(beta_c1 * read_tile(key_gram_ref, c), d_corrected_cv)
    d_right_ref[rows, :] = d_right_cv
    dv_ref[rows, :] = (beta_c1 * d_right_cv).astype(dv_ref.dtype)
    dbeta_ref[rows, :] = jnp.sum(
      read_tile(v_ref, rows, slice(None)) * d_right_cv, axis=1, keepdims=True
    )
    total_11 = jnp.exp(jnp.sum(g_ref[rows, :], axis=0, keepdims=True))
    d_right_decayed_cv = beta_c1 * from_start_ref[rows, :] * d_right_cv
    return tuple(
      total_11 * d_state_blocks[j]
      + read_tile(d_state_local_ref, c, state_rows(j), slice(None))
      - mm.tn(keys(j), d_right_decayed_cv)
      for j in blocks
    )

  d_final = tuple(d_final_state_ref[state_rows(j), :] for j in blocks)
  d_initial = jax.lax.fori_loop(0, num_chunks, step, d_final)
  for j in blocks:
    d_initial_state_ref[state_rows(j), :] = d_initial[j]


def _walk_specs(k, v, chunk, block_v):
  """Block specs over the walks' grid (B, H, V/block): each program reads whole sequences."""
  _, _, padded_len, key_dim = k.shape
  num_chunks = padded_len // chunk
  whole = lambda width: pl.BlockSpec((None, None, padded_len, width), lambda b, h, j: (b, h, 0, 0))
  return dict(
    keys=whole(key_dim),
    column=whole(1),
    squares=pl.BlockSpec((None, None, num_chunks, chunk, chunk), lambda b, h, j: (b, h, 0, 0, 0)),
    values=pl.BlockSpec((None, None, padded_len, block_v), lambda b, h, j: (b, h, 0, j)),
    state=pl.BlockSpec((None, None, key_dim, block_v), lambda b, h, j: (b, h, 0, j)),
    states=pl.BlockSpec(
      (None, None, num_chunks, key_dim, block_v), lambda b, h, j: (b, h, 0, 0, j)
    ),
    # One partial sum per value block, for the columns every value block adds to.
    partial_column=pl.BlockSpec((None, None, None, padded_len, 1), lambda b, h, j: (b, h, j, 0, 0)),
  )


def _walk(k, v, g, beta, local, initial_state, *, chunk, tiles, interpret):
  """(the state entering every chunk [B,H,N,K,V], U~ [B,H,Tp,V], the final state)."""
  batch, heads, padded_len, key_dim = k.shape
  value_dim = v.shape[-1]
  num_chunks = padded_len // chunk
  block_v = min(tiles.block_v, value_dim)
  s = _walk_specs(k, v, chunk, block_v)
  from_start, to_end, key_gram, *_ = local
  kernel = functools.partial(
    _walk_kernel,
    chunk=chunk,
    key_block=min(tiles.key_block, key_dim),
    precision=matmul_precision(interpret),
  )
  return pl.pallas_call(
    kernel,
    grid=(batch, heads, value_dim // block_v),
    in_specs=[s["keys"], s["values"]] + [s["column"]] * 4 + [s["squares"], s["state"]],
    out_specs=[s["states"], s["values"], s["state"]],
    out_shape=[
      jax.ShapeDtypeStruct((batch, heads, num_chunks, key_dim, value_dim), jnp.float32),
      jax.ShapeDtypeStruct((batch, heads, padded_len, value_dim), jnp.float32),
      jax.ShapeDtypeStruct((batch, heads, key_dim, value_dim), jnp.float32),
    ],
    compiler_params=compiler_params(tiles.walk_warps),
    interpret=interpret,
    name="gated_delta_forward_walk",
  )(k, v, g, beta, from_start, to_end, key_gram, initial_state)


def _reverse_walk(k, v, g, beta, local, pulls, d_final_state, *, chunk, tiles, interpret):
  """(dS' [B,H,N,K,V], dY [B,H,Tp,V], dv, dbeta partials [B,H,V/block,Tp,1], d_initial_state)."""
  batch, heads, padded_len, key_dim = k.shape
  value_dim = v.shape[-1]
  num_chunks = padded_len // chunk
  block_v = min(tiles.block_v, value_dim)
  num_value_blocks = value_dim // block_v
  s = _walk_specs(k, v, chunk, block_v)
  from_start, to_end, key_gram, *_ = local
  kernel = functools.partial(
    _reverse_walk_kernel,
    chunk=chunk,
    key_block=min(tiles.key_block, key_dim),
    precision=matmul_precision(interpret),
  )
  return pl.pallas_call(
    kernel,
    grid=(batch, heads, num_value_blocks),
    in_specs=[s["keys"], s["values"]]
    + [s["column"]] * 4
    + [s["squares"], s["values"], s["states"], s["state"]],
    out_specs=[s["states"], s["values"], s["values"], s["partial_column"], s["state"]],
    out_shape=[
      jax.ShapeDtypeStruct((batch, heads, num_chunks, key_dim, value_dim), jnp.float32),
      jax.ShapeDtypeStruct((batch, heads, padded_len, value_dim), jnp.float32),
      jax.ShapeDtypeStruct(v.shape, v.dtype),
      jax.ShapeDtypeStruct((batch, heads, num_value_blocks, padded_len, 1), jnp.float32),
      jax.ShapeDtypeStruct(d_final_state.shape, jnp.float32),
    ],
    compiler_params=compiler_params(tiles.walk_warps),
    interpret=interpret,
    name="gated_delta_backward_walk",
  )(k, v, g, beta, from_start, to_end, key_gram, *pulls, d_final_state)


# --- Forward 3 / backward 2: what the outputs take from and give to each chunk, chunk-parallel. -


def _chunk_specs(q, v, chunk, block_v):
  """Block specs over the grid (B, H, N, V/block) of one chunk and one value block."""
  key_dim = q.shape[-1]
  return dict(
    keys=pl.BlockSpec((None, None, chunk, key_dim), lambda b, h, c, j: (b, h, c, 0)),
    column=pl.BlockSpec((None, None, chunk, 1), lambda b, h, c, j: (b, h, c, 0)),
    square=pl.BlockSpec((None, None, None, chunk, chunk), lambda b, h, c, j: (b, h, c, 0, 0)),
    values=pl.BlockSpec((None, None, chunk, block_v), lambda b, h, c, j: (b, h, c, j)),
    state=pl.BlockSpec((None, None, None, key_dim, block_v), lambda b, h, c, j: (b, h, c, 0, j)),
  )


def _outputs_kernel(
  q_ref,
  from_start_ref,
  scores_ref,
  state_ref,
  corrected_ref,
  out_ref,
  *,
  scale,
  key_block,
  precision,
):
  """o = (s q e) S + P U~ for one chunk and one value block."""
  mm = Matmuls(precision)
  key_dim = q_ref.shape[-1]
  queries_through_state = sum(
    mm.nn(
      read_tile(q_ref, slice(None), block_slice(key_dim, j, key_block)),
      read_tile(state_ref, pl.ds(j * key_block, key_block), slice(None)),
    )
    for j in range(key_dim // key_block)
  )
  out_cv = scale * read_tile(from_start_ref) * queries_through_state + mm.nn(
    read_tile(scores_ref), read_tile(corrected_ref)
  )
  out_ref[...] = out_cv.astype(out_ref.dtype)


def _local_pulls_kernel(
  q_ref,
  from_start_ref,
  scores_ref,
  d_out_ref,
  d_corrected_ref,
  d_state_ref,
  *,
  scale,
  key_block,
  precision,
):
  """The parts of dU~ and of dS that do not depend on dS': P^T dO and (s q e)^T dO."""
  mm = Matmuls(precision)
  key_dim = q_ref.shape[-1]
  d_corrected_ref[...] = mm.tn(read_tile(scores_ref), read_tile(d_out_ref))
  d_out_decayed_cv = scale * read_tile(from_start_ref) * read_tile(d_out_ref)
  for j in range(key_dim // key_block):
    queries = read_tile(q_ref, slice(None), block_slice(key_dim, j, key_block))
    d_state_ref[pl.ds(j * key_block, key_block), :] = mm.tn(queries, d_out_decayed_cv)


def _outputs(q, v, local, states_in, corrected, *, scale, chunk, tiles, interpret):
  """o [B,H,Tp,V] in v's dtype, from the state entering every chunk and U~."""
  batch, heads, padded_len, key_dim = q.shape
  value_dim = v.shape[-1]
  block_v = min(tiles.block_v, value_dim)
  s = _chunk_specs(q, v, chunk, block_v)
  from_start, _, _, scores, *_ = local
  kernel = functools.partial(
    _outputs_kernel,
    scale=scale,
    key_block=min(tiles.key_block, key_dim),
    precision=matmul_precision(interpret),
  )
  return pl.pallas_call(
    kernel,
    grid=(batch, heads, padded_len // chunk, value_dim // block_v),
    in_specs=[s["keys"], s["column"], s["square"], s["state"], s["values"]],
    out_specs=s["values"],
    out_shape=jax.ShapeDtypeStruct((batch, heads, padded_len, value_dim), v.dtype),
    compiler_params=compiler_params(tiles.chunk_warps),
    interpret=interpret,
    name="gated_delta_outputs",
  )(q, from_start, scores, states_in, corrected)


def _local_pulls(q, d_out, local, *, scale, chunk, tiles, interpret):
  """(P^T dO [B,H,Tp,V], (s q e)^T dO [B,H,N,K,V])."""
  batch, heads, padded_len, key_dim = q.shape
  value_dim = d_out.shape[-1]
  num_chunks = padded_len // chunk
  block_v = min(tiles.block_v, value_dim)
  s = _chunk_specs(q, d_out, chunk, block_v)
  from_start, _, _, scores, *_ = local
  kernel = functools.partial(
    _local_pulls_kernel,
    scale=scale,
    key_block=min(tiles.key_block, key_dim),
    precision=matmul_precision(interpret),
  )
  return pl.pallas_call(
    kernel,
    grid=(batch, heads, num_chunks, value_dim // block_v),
    in_specs=[s["keys"], s["column"], s["square"], s["values"]],
    out_specs=[s["values"], s["state"]],
    out_shape=[
      jax.ShapeDtypeStruct((batch, heads, padded_len, value_dim), jnp.float32),
      jax.ShapeDtypeStruct((batch, heads, num_chunks, key_dim, value_dim), jnp.float32),
    ],
    compiler_params=compiler_params(tiles.chunk_warps),
    interpret=interpret,
    name="gated_delta_local_pulls",
  )(q, from_start, scores, d_out)


def forward(q, k, v, g, beta, initial_state, *, scale, chunk, interpret):
  """Kernel-layout forward: (out [B,H,Tp,V], saved, final_state [B,H,K,V]).

  `saved` is (the state entering every chunk [B,H,N,K,V], U~ [B,H,Tp,V]), both float32.
  """
  tiles = tiles_for(q.shape[-1], v.shape[-1])
  common = dict(chunk=chunk, tiles=tiles, interpret=interpret)
  local = _local_terms(q, k, g, scale=scale, with_decay_matrix=False, **common)
  states_in, corrected, final_state = _walk(k, v, g, beta, local, initial_state, **common)
  out = _outputs(q, v, local, states_in, corrected, scale=scale, **common)
  return out, (states_in, corrected), final_state


# --- Backward 4: the C x C cotangents. ----------------------------------------------------------


def _pair_gradients_kernel(
  d_out_ref,
  corrected_ref,
  d_right_ref,
  beta_ref,
  decay_ref,
  key_gram_ref,
  scores_ref,
  d_scores_ref,
  d_key_gram_ref,
  columns_ref,
  *,
  block_v,
  precision,
):
  """Per chunk: dP = dO U~^T and dA = -dY U~^T (strictly lower), summed over the value blocks,
  turned into the cotangents of s q k^T (dP * D) and of k k^T (beta dA * D, symmetrised), plus
  dbeta through A and the segment part of dg (columns 0 and 1)."""
  mm = Matmuls(precision)
  chunk, value_dim = d_out_ref.shape

  def add_value_block(jv, pair):
    d_scores_ts, d_a_ts = pair
    cols = pl.ds(pl.multiple_of(jv * block_v, block_v), block_v)
    corrected_cv = read_tile(corrected_ref, slice(None), cols)
    return (
      d_scores_ts + mm.nt(read_tile(d_out_ref, slice(None), cols), corrected_cv),
      d_a_ts - mm.nt(read_tile(d_right_ref, slice(None), cols), corrected_cv),
    )

  zeros = jnp.zeros((chunk, chunk), jnp.float32)
  d_scores_ts, d_a_ts = jax.lax.fori_loop(0, value_dim // block_v, add_value_block, (zeros, zeros))
  d_a_ts = kernel_math.strictly_lower(d_a_ts)
  beta_c1 = read_tile(beta_ref)
  key_gram_ts = read_tile(key_gram_ref)  # A' = strictly lower (k k^T * D), so A = beta A'
  d_log_segment_ts = d_scores_ts * read_tile(scores_ref) + beta_c1 * d_a_ts * key_gram_ts
  dbeta_c1 = jnp.sum(d_a_ts * key_gram_ts, axis=1, keepdims=True)
  decay_ts = read_tile(decay_ref)
  d_scores_ref[...] = d_scores_ts * decay_ts
  d_key_gram_ts = beta_c1 * d_a_ts * decay_ts
  d_key_gram_ref[...] = d_key_gram_ts + d_key_gram_ts.T  # k k^T uses k on both sides
  dg_c1 = kernel_math.segment_log_decay_gradient(d_log_segment_ts, mm)
  col_c2 = jax.lax.broadcasted_iota(jnp.int32, (chunk, 2), 1)
  columns_ref[...] = jnp.where(col_c2 == 0, dbeta_c1, dg_c1)


def _pair_gradients(d_out, corrected, d_right, beta, local, *, chunk, tiles, interpret):
  """(d(s q k^T) [B,H,N,C,C], d(k k^T) [B,H,N,C,C], [dbeta through A, dg of the segments])."""
  batch, heads, padded_len, value_dim = d_out.shape
  num_chunks = padded_len // chunk
  tile = lambda width: pl.BlockSpec((None, None, chunk, width), lambda b, h, c: (b, h, c, 0))
  square = pl.BlockSpec((None, None, None, chunk, chunk), lambda b, h, c: (b, h, c, 0, 0))
  squares = jax.ShapeDtypeStruct((batch, heads, num_chunks, chunk, chunk), jnp.float32)
  _, _, key_gram, scores, decay = local
  kernel = functools.partial(
    _pair_gradients_kernel,
    block_v=min(tiles.block_v, value_dim),
    precision=matmul_precision(interpret),
  )
  return pl.pallas_call(
    kernel,
    grid=(batch, heads, num_chunks),
    in_specs=[tile(value_dim)] * 3 + [tile(1)] + [square] * 3,
    out_specs=[square, square, tile(2)],
    out_shape=[
      squares,
      squares,
      jax.ShapeDtypeStruct((batch, heads, padded_len, 2), jnp.float32),
    ],
    compiler_params=compiler_params(tiles.gradient_warps),
    interpret=interpret,
    name="gated_delta_pair_gradients",
  )(d_out, corrected, d_right, beta, decay, key_gram, scores)


# --- Backward 5: dq and dk by key blocks. -------------------------------------------------------


def _key_gradients_kernel(
  q_ref,
  k_ref,
  beta_ref,
  from_start_ref,
  to_end_ref,
  d_out_ref,
  corrected_ref,
  d_right_ref,
  state_ref,
  d_state_out_ref,
  d_scores_ref,
  d_key_gram_ref,
  dq_ref,
  dk_ref,
  columns_ref,
  *,
  scale,
  block_v,
  precision,
):
  """dq, dk of one key block of one chunk, and its share of the columns dg and dbeta need:
  sum_k (s q dO S^T), sum_k (k dY S^T), sum_k (k U~ dS'^T) and sum (S dS') (columns 0-3)."""
  mm = Matmuls(precision)
  chunk, value_dim = d_out_ref.shape
  key_block = q_ref.shape[-1]

  def add_value_block(jv, pulls):
    queries_pull, keys_pull, keys_to_end_pull, total_11 = pulls
    cols = pl.ds(pl.multiple_of(jv * block_v, block_v), block_v)
    state_kv = read_tile(state_ref, slice(None), cols)
    d_state_out_kv = read_tile(d_state_out_ref, slice(None), cols)
    return (
      queries_pull + mm.nt(read_tile(d_out_ref, slice(None), cols), state_kv),
      keys_pull + mm.nt(read_tile(d_right_ref, slice(None), cols), state_kv),
      keys_to_end_pull + mm.nt(read_tile(corrected_ref, slice(None), cols), d_state_out_kv),
      total_11 + kernel_math.sum_all(state_kv * d_state_out_kv),
    )

  zeros = jnp.zeros((chunk, key_block), jnp.float32)
  # dO S^T (what s q e receives), dY S^T (minus what beta e k receives), U~ dS'^T (r k's).
  queries_pull, keys_pull, keys_to_end_pull, total_11 = jax.lax.fori_loop(
    0,
    value_dim // block_v,
    add_value_block,
    (zeros, zeros, zeros, jnp.zeros((1, 1), jnp.float32)),
  )
  from_start_c1 = read_tile(from_start_ref)
  dq_ref[...] = (
    scale * (mm.nn(read_tile(d_scores_ref), read_tile(k_ref)) + from_start_c1 * queries_pull)
  ).astype(dq_ref.dtype)
  queries_c1 = jnp.sum(scale * read_tile(q_ref) * queries_pull, axis=1, keepdims=True)
  k_ck = read_tile(k_ref)
  keys_c1 = jnp.sum(k_ck * keys_pull, axis=1, keepdims=True)
  keys_to_end_c1 = jnp.sum(k_ck * keys_to_end_pull, axis=1, keepdims=True)
  dk_ref[...] = (
    scale * mm.tn(read_tile(d_scores_ref), read_tile(q_ref))
    + mm.nn(read_tile(d_key_gram_ref), read_tile(k_ref))
    + read_tile(to_end_ref) * keys_to_end_pull
    - read_tile(beta_ref) * from_start_c1 * keys_pull
  ).astype(dk_ref.dtype)
  col_c4 = jax.lax.broadcasted_iota(jnp.int32, (chunk, 4), 1)
  columns_ref[...] = jnp.where(
    col_c4 == 0,
    queries_c1,
    jnp.where(col_c4 == 1, keys_c1, jnp.where(col_c4 == 2, keys_to_end_c1, total_11)),
  )


def _key_gradients(
  q, k, beta, local, d_out, corrected, d_right, states_in, d_states_out, pair, *, scale, chunk,
  tiles, interpret,
):  # fmt: skip
  """(dq, dk in the inputs' dtypes, column partials [B,H,K/block,Tp,4])."""
  batch, heads, padded_len, key_dim = q.shape
  value_dim = d_out.shape[-1]
  num_chunks = padded_len // chunk
  key_block = min(tiles.key_block, key_dim)
  num_key_blocks = key_dim // key_block
  from_start, to_end, *_ = local
  d_scores, d_key_gram, _ = pair
  keys = pl.BlockSpec((None, None, chunk, key_block), lambda b, h, c, j: (b, h, c, j))
  tile = lambda width: pl.BlockSpec((None, None, chunk, width), lambda b, h, c, j: (b, h, c, 0))
  state = pl.BlockSpec((None, None, None, key_block, value_dim), lambda b, h, c, j: (b, h, c, j, 0))
  square = pl.BlockSpec((None, None, None, chunk, chunk), lambda b, h, c, j: (b, h, c, 0, 0))
  partial_columns = pl.BlockSpec((None, None, None, chunk, 4), lambda b, h, c, j: (b, h, j, c, 0))
  kernel = functools.partial(
    _key_gradients_kernel,
    scale=scale,
    block_v=min(tiles.block_v, value_dim),
    precision=matmul_precision(interpret),
  )
  return pl.pallas_call(
    kernel,
    grid=(batch, heads, num_chunks, num_key_blocks),
    in_specs=[keys, keys] + [tile(1)] * 3 + [tile(value_dim)] * 3 + [state, state, square, square],
    out_specs=[keys, keys, partial_columns],
    out_shape=[
      jax.ShapeDtypeStruct(q.shape, q.dtype),
      jax.ShapeDtypeStruct(k.shape, k.dtype),
      jax.ShapeDtypeStruct((batch, heads, num_key_blocks, padded_len, 4), jnp.float32),
    ],
    compiler_params=compiler_params(tiles.gradient_warps),
    interpret=interpret,
    name="gated_delta_key_gradients",
  )(
    q, k, beta, from_start, to_end, d_out, corrected, d_right, states_in, d_states_out, d_scores,
    d_key_gram,
  )  # fmt: skip


# --- Backward: the columns, and the whole pass. -------------------------------------------------


def _decay_and_beta_gradients(g, beta, local, dbeta_values, pair_columns, key_columns, chunk):
  """dg and dbeta [B,H,Tp,1] from the kernels' partial sums (see `_key_gradients_kernel`).

  With e, r, gamma the decays from the chunk's start, to its end and over all of it, the log
  decays' cotangents are e (sum s q dO S^T - beta sum k dY S^T), r sum k U~ dS'^T and
  gamma sum S dS'; g_j collects those of the prefix sums over t >= j, of the sums to the end over
  t < j, and gamma's, within its chunk.
  """
  from_start, to_end, *_ = local
  queries_pull, keys_pull, keys_to_end_pull, state_pull = jnp.split(
    key_columns.sum(axis=2), 4, axis=-1
  )
  dbeta_through_a, dg_segments = jnp.split(pair_columns, 2, axis=-1)
  batch, heads, padded_len, _ = g.shape
  by_chunk = lambda x: x.reshape(batch, heads, padded_len // chunk, chunk)
  d_log_from_start = by_chunk(from_start * (queries_pull - beta * keys_pull))
  d_log_to_end = by_chunk(to_end * keys_to_end_pull)
  total = jnp.exp(by_chunk(g).sum(axis=-1, keepdims=True))
  d_log_total = total * by_chunk(state_pull)[..., :1]  # the same value on every row of a chunk
  from_start_through_j = jnp.flip(jnp.cumsum(jnp.flip(d_log_from_start, -1), axis=-1), -1)
  # Exclusive: a running sum of the shifted terms, not the inclusive one minus the last term
  # (which can be 1e5 times larger than the sum, its rounding error with it).
  shifted = jnp.pad(d_log_to_end[..., :-1], [(0, 0)] * 3 + [(1, 0)])
  to_end_before_j = jnp.cumsum(shifted, axis=-1)
  dg = from_start_through_j + to_end_before_j + d_log_total + by_chunk(dg_segments)
  dbeta = dbeta_values.sum(axis=2) + dbeta_through_a - from_start * keys_pull
  return dg.reshape(g.shape), dbeta


def backward(q, k, v, g, beta, saved, d_out, d_final_state, *, scale, chunk, interpret):
  """Kernel-layout backward: gradients of (q, k, v, g, beta, initial_state)."""
  states_in, corrected = saved
  tiles = tiles_for(q.shape[-1], v.shape[-1])
  common = dict(chunk=chunk, tiles=tiles, interpret=interpret)
  local = _local_terms(q, k, g, scale=scale, with_decay_matrix=True, **common)
  pulls = _local_pulls(q, d_out, local, scale=scale, **common)
  d_states_out, d_right, dv, dbeta_values, d_initial_state = _reverse_walk(
    k, v, g, beta, local, pulls, d_final_state, **common
  )
  pair = _pair_gradients(d_out, corrected, d_right, beta, local, **common)
  dq, dk, key_columns = _key_gradients(
    q, k, beta, local, d_out, corrected, d_right, states_in, d_states_out, pair, scale=scale,
    **common,
  )  # fmt: skip
  dg, dbeta = _decay_and_beta_gradients(g, beta, local, dbeta_values, pair[2], key_columns, chunk)
  return dq, dk, dv, dg.astype(g.dtype), dbeta.astype(beta.dtype), d_initial_state


_RUN = kernel_math.make_differentiable(forward, backward)


def _power_of_two_at_least_16(n):
  return max(16, 1 << (n - 1).bit_length())


def gated_delta_rule_pallas_gpu(
  q, k, v, g, beta, *, scale=None, initial_state=None, chunk_size=64, interpret=False
):
  """Gated delta rule with the GPU kernels; the contract of `gated_delta_rule`.

  Args:
    q, k: [B,T,H,K]; v: [B,T,H,V]; g, beta: [B,T,H] (see `gated_delta_rule`).
    scale: multiplies q; defaults to K**-0.5.
    initial_state: [B,H,K,V] float32, or None for zeros.
    chunk_size: tokens per chunk, rounded up to a power of two >= 16, capped by T and by the
      tile table's chunk for this K and V (`tiles_for`).
    interpret: run the kernels in the Pallas interpreter (CPU tests).

  Returns:
    (o [B,T,H,V] in v's dtype, final_state [B,H,K,V] float32).
  """
  padded_k = _power_of_two_at_least_16(q.shape[-1])
  padded_v = _power_of_two_at_least_16(v.shape[-1])
  largest_chunk = tiles_for(padded_k, padded_v).chunk
  return run_padded_for_triton(
    _RUN,
    q,
    k,
    v,
    g,
    beta,
    scale=scale,
    initial_state=initial_state,
    chunk_size=min(chunk_size, largest_chunk),
    interpret=interpret,
  )


def run_padded_for_triton(run, q, k, v, g, beta, *, scale, initial_state, chunk_size, interpret):
  """Runs a `kernel_math.make_differentiable` function under Triton's tile rules.

  K and V are zero-padded to powers of two >= 16 and the chunk is one too (capped by T); the
  padding is cut off the results.
  """
  key_dim, value_dim = q.shape[-1], v.shape[-1]
  scale, initial_state = fill_defaults(q, v, scale, initial_state)
  padded_k, padded_v = _power_of_two_at_least_16(key_dim), _power_of_two_at_least_16(value_dim)
  widen = lambda x, width: jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, width - x.shape[-1])])
  q, k, v = widen(q, padded_k), widen(k, padded_k), widen(v, padded_v)
  initial_state = jnp.pad(
    initial_state, [(0, 0), (0, 0), (0, padded_k - key_dim), (0, padded_v - value_dim)]
  )
  chunk = _power_of_two_at_least_16(min(chunk_size, q.shape[1]))
  out, final_state = kernel_math.run_in_kernel_layout(
    run,
    q,
    k,
    v,
    g,
    beta,
    scale=scale,
    initial_state=initial_state,
    chunk=chunk,
    interpret=interpret,
  )
  return out[..., :value_dim], final_state[..., :key_dim, :value_dim]
