"""The gated delta rule on GPUs in stages: parallel chunk work in XLA, a thin sequential kernel.

pallas_gpu.py runs the chunks' parallel work in Pallas kernels of its own around its walks. Here
XLA does it, the way flash-linear-attention splits the work:

  1. local terms (XLA, all B*H*N chunks at once): w, u, the decayed queries, the intra-chunk
     scores, the keys decayed to the chunk's end and the chunk's total decay
     (`chunked.chunk_local_terms`: big batched matmuls and the block-recursive inverse);
  2. the state walk (one Pallas kernel, grid (B, H, V/block)): per chunk two matmuls,
         S_c+1 = decay_c S_c + k_to_end_c^T (u_c - w_c S_c),
     storing the state S_c entering every chunk;
  3. outputs (XLA, all chunks at once): o_c = q_decayed_c S_c + scores_c (u_c - w_c S_c).

The backward pass mirrors it: recompute the local terms (keeping their VJP), then
  X_c = q_decayed_c^T dO_c - w_c^T scores_c^T dO_c   (XLA, all chunks: dO_c's pull on S_c),
then a reverse walk over chunks (the second kernel),
  dS_c = X_c + decay_c dS_c+1 - w_c^T (k_to_end_c dS_c+1),
storing the cotangent of every chunk's outgoing state, and finally the VJP of every chunk's
(o_c, S_c+1) with respect to its local terms, all chunks at once, pulled back through step 1.

The walks hold the state in blocks of key rows and read their tiles where they use them, with
pallas_gpu's tiles for the shape (`pallas_gpu.tiles_for`, `pallas_gpu.read_tile`): ptxas spills
nothing (sm_90a, float32 and bfloat16, K = V = 64 and 128).

Matmul precision: float32 inputs get HIGHEST everywhere (as chunked.py), which the walk kernels
run as TF32x3 when compiled (`pallas_gpu.matmul_precision`). bfloat16 inputs get the default
(TF32 on Hopper, in XLA and in Triton) for the state walk and the local terms; the triangular
inverse stays HIGHEST.

The contract (shapes, padding to Triton's power-of-two tiles) is pallas_gpu.py's.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from sleep_jax.ops.gated_delta import chunked, kernel_math, pallas_gpu
from sleep_jax.ops.gated_delta.kernel_math import Matmuls


def _chunk_decay_11(decay_ref, rows):
  """The chunk's total decay as a [1, 1] tile, read from its [C, 1] column of copies."""
  return jnp.max(decay_ref[rows, :], axis=0, keepdims=True)


def _walk_forward_kernel(
  w_ref,
  u_ref,
  k_to_end_ref,
  decay_ref,
  initial_ref,
  states_ref,
  final_ref,
  *,
  chunk,
  key_block,
  precision,
):
  """S_c+1 = decay_c S_c + k_to_end_c^T (u_c - w_c S_c), the state held in blocks of key rows."""
  mm = Matmuls(precision)
  key_dim = w_ref.shape[-1]
  blocks = range(key_dim // key_block)
  state_rows = lambda j: pl.ds(j * key_block, key_block)

  def step(c, state_blocks):
    rows = pl.ds(pl.multiple_of(c * chunk, chunk), chunk)
    keys = lambda ref, j: pallas_gpu.read_tile(
      ref, rows, pallas_gpu.block_slice(key_dim, j, key_block)
    )
    for j in blocks:
      states_ref[c, state_rows(j), :] = state_blocks[j]
    corrected_cv = pallas_gpu.read_tile(u_ref, rows, slice(None)) - sum(
      mm.nn(keys(w_ref, j), state_blocks[j]) for j in blocks
    )
    decay_11 = _chunk_decay_11(decay_ref, rows)
    return tuple(
      decay_11 * state_blocks[j] + mm.tn(keys(k_to_end_ref, j), corrected_cv) for j in blocks
    )

  initial = tuple(initial_ref[state_rows(j), :] for j in blocks)
  final = jax.lax.fori_loop(0, states_ref.shape[0], step, initial)
  for j in blocks:
    final_ref[state_rows(j), :] = final[j]


def _walk_backward_kernel(
  pull_ref,
  w_ref,
  k_to_end_ref,
  decay_ref,
  d_final_ref,
  d_states_ref,
  d_initial_ref,
  *,
  chunk,
  key_block,
  precision,
):
  """dS_c = X_c + decay_c dS_c+1 - w_c^T (k_to_end_c dS_c+1), in blocks of key rows."""
  mm = Matmuls(precision)
  key_dim = w_ref.shape[-1]
  num_chunks = d_states_ref.shape[0]
  blocks = range(key_dim // key_block)
  state_rows = lambda j: pl.ds(j * key_block, key_block)

  def step(i, d_state_blocks):
    c = num_chunks - 1 - i
    rows = pl.ds(pl.multiple_of(c * chunk, chunk), chunk)
    keys = lambda ref, j: pallas_gpu.read_tile(
      ref, rows, pallas_gpu.block_slice(key_dim, j, key_block)
    )
    for j in blocks:
      d_states_ref[c, state_rows(j), :] = d_state_blocks[j]
    through_keys_cv = sum(mm.nn(keys(k_to_end_ref, j), d_state_blocks[j]) for j in blocks)
    decay_11 = _chunk_decay_11(decay_ref, rows)
    return tuple(
      pallas_gpu.read_tile(pull_ref, c, state_rows(j), slice(None))
      + decay_11 * d_state_blocks[j]
      - mm.tn(keys(w_ref, j), through_keys_cv)
      for j in blocks
    )

  d_final = tuple(d_final_ref[state_rows(j), :] for j in blocks)
  d_initial = jax.lax.fori_loop(0, num_chunks, step, d_final)
  for j in blocks:
    d_initial_ref[state_rows(j), :] = d_initial[j]


def _walk(kernel, per_chunk_in, tokens_in, state_in, *, chunk, precision, interpret, name):
  """Runs a walk kernel over grid (B, H, V/block), with pallas_gpu's tiles for this K and V.

  Args:
    per_chunk_in: [B,H,N,K,V] float32 arrays, or () (one [K, block] tile per chunk is read).
    tokens_in: (token-major float32 input [B,H,Tp,W], whether W is the value width V and is
      split into value blocks like the state) pairs; other widths are read whole.
    state_in: [B,H,K,V] float32, the walk's starting carry.

  Returns:
    (the carry entering every chunk [B,H,N,K,V], the final carry [B,H,K,V]).
  """
  batch, heads, key_dim, value_dim = state_in.shape
  padded_len = tokens_in[0][0].shape[2]
  num_chunks = padded_len // chunk
  tiles = pallas_gpu.tiles_for(key_dim, value_dim)
  block_v = min(tiles.block_v, value_dim)

  def token_spec(x, is_value):
    if is_value:
      return pl.BlockSpec((None, None, padded_len, block_v), lambda b, h, j: (b, h, 0, j))
    return pl.BlockSpec((None, None, padded_len, x.shape[-1]), lambda b, h, j: (b, h, 0, 0))

  per_chunk = pl.BlockSpec(
    (None, None, num_chunks, key_dim, block_v), lambda b, h, j: (b, h, 0, 0, j)
  )
  state = pl.BlockSpec((None, None, key_dim, block_v), lambda b, h, j: (b, h, 0, j))
  return pl.pallas_call(
    functools.partial(
      kernel,
      chunk=chunk,
      key_block=min(tiles.key_block, key_dim),
      precision=pallas_gpu.matmul_precision(interpret, precision),
    ),
    grid=(batch, heads, value_dim // block_v),
    in_specs=[per_chunk] * len(per_chunk_in)
    + [token_spec(x, is_value) for x, is_value in tokens_in]
    + [state],
    out_specs=[per_chunk, state],
    out_shape=[
      jax.ShapeDtypeStruct((batch, heads, num_chunks, key_dim, value_dim), jnp.float32),
      jax.ShapeDtypeStruct(state_in.shape, jnp.float32),
    ],
    compiler_params=pallas_gpu.compiler_params(tiles.walk_warps),
    interpret=interpret,
    name=name,
  )(*per_chunk_in, *(x for x, _ in tokens_in), state_in)


def _by_chunk(x_bht, chunk):
  """Kernel layout [B,H,Tp,W] -> [B,H,N,C,W] float32 (W = 1 drops to [B,H,N,C])."""
  batch, heads, padded_len, width = x_bht.shape
  x = x_bht.astype(jnp.float32).reshape(batch, heads, padded_len // chunk, chunk, width)
  return x[..., 0] if width == 1 else x


def _by_token(x_bhnc):
  """[B,H,N,C,W] -> [B,H,Tp,W]."""
  batch, heads, num_chunks, chunk, width = x_bhnc.shape
  return x_bhnc.reshape(batch, heads, num_chunks * chunk, width)


def _chunk_column(decay_bhn, chunk):
  """The chunk's total decay [B,H,N] as a [B,H,Tp,1] column (every row of a chunk the same)."""
  batch, heads, num_chunks = decay_bhn.shape
  column = jnp.broadcast_to(decay_bhn[..., None], (batch, heads, num_chunks, chunk))
  return column.reshape(batch, heads, num_chunks * chunk, 1)


def _merge_chunks_into_heads(tree):
  """[B,H,N,...] -> [B,H*N,...]: every chunk becomes a head of `chunked.chunk_step`."""
  return jax.tree.map(lambda x: x.reshape((x.shape[0], -1) + x.shape[3:]), tree)


def _local_terms_fn(scale, chunk, precision):
  def local_terms(q, k, v, g, beta):
    return chunked.chunk_local_terms(
      *(_by_chunk(x, chunk) for x in (q, k, v, g, beta)),
      scale,
      invert=chunked.invert_unit_lower_analytic_vjp,
      precision=precision,
    )

  return local_terms


def _walk_inputs(local, chunk):
  return (
    _by_token(local["w"]),
    _by_token(local["u"]),
    _by_token(local["k_to_end"]),
    _chunk_column(local["chunk_decay"], chunk),
  )


def _chunk_outputs(local, states_bhnkv, precision):
  """(outgoing states [B,H*N,K,V], outputs [B,H*N,C,V]) of every chunk from its entering state."""
  merged_states = states_bhnkv.reshape((states_bhnkv.shape[0], -1) + states_bhnkv.shape[3:])
  return chunked.chunk_step(merged_states, _merge_chunks_into_heads(local), precision)


def _walk_states(local, initial_state, *, chunk, precision, interpret):
  """(the state entering every chunk [B,H,N,K,V], the final state [B,H,K,V]) by the walk kernel.

  Needs two chunks or more: for one, `forward` takes the outgoing state from `_chunk_outputs`.
  """
  w, u, k_to_end, decay = _walk_inputs(local, chunk)
  return _walk(
    _walk_forward_kernel,
    (),
    ((w, False), (u, True), (k_to_end, False), (decay, False)),
    initial_state,
    chunk=chunk,
    precision=precision,
    interpret=interpret,
    name="gated_delta_state_walk",
  )


def _reverse_walk(local, pull_bhnkv, d_final_state, *, chunk, precision, interpret):
  """(the cotangent of every chunk's outgoing state [B,H,N,K,V], that of the initial state)."""
  if local["w"].shape[2] == 1:  # one chunk: one step of the reverse walk, in XLA
    einsum = functools.partial(jnp.einsum, precision=precision)
    through_keys_bhcv = einsum("bhck,bhkv->bhcv", local["k_to_end"][:, :, 0], d_final_state)
    d_initial_state = (
      pull_bhnkv[:, :, 0]
      + local["chunk_decay"][:, :, 0, None, None] * d_final_state
      - einsum("bhck,bhcv->bhkv", local["w"][:, :, 0], through_keys_bhcv)
    )
    return d_final_state[:, :, None], d_initial_state
  w, _, k_to_end, decay = _walk_inputs(local, chunk)
  return _walk(
    _walk_backward_kernel,
    (pull_bhnkv,),
    ((w, False), (k_to_end, False), (decay, False)),
    d_final_state,
    chunk=chunk,
    precision=precision,
    interpret=interpret,
    name="gated_delta_state_walk_backward",
  )


def forward(q, k, v, g, beta, initial_state, *, scale, chunk, interpret, precision):
  """Kernel-layout forward: (out [B,H,Tp,V], states_in [B,H,N,K,V], final_state [B,H,K,V])."""
  local = _local_terms_fn(scale, chunk, precision)(q, k, v, g, beta)
  one_chunk = local["w"].shape[2] == 1
  if one_chunk:  # nothing to walk, no kernel to launch
    states_in = initial_state[:, :, None]
  else:
    states_in, final_state = _walk_states(
      local, initial_state, chunk=chunk, precision=precision, interpret=interpret
    )
  states_out, out_bmcv = _chunk_outputs(local, states_in, precision)
  if one_chunk:
    final_state = states_out.reshape(initial_state.shape)
  batch, heads, padded_len, value_dim = v.shape
  out = out_bmcv.reshape(batch, heads, padded_len, value_dim).astype(v.dtype)
  return out, states_in, final_state


def backward(
  q, k, v, g, beta, states_in, d_out, d_final_state, *, scale, chunk, interpret, precision
):
  """Kernel-layout backward: gradients of (q, k, v, g, beta, initial_state)."""
  local, local_vjp = jax.vjp(_local_terms_fn(scale, chunk, precision), q, k, v, g, beta)
  d_out_bhncv = _by_chunk(d_out, chunk)
  einsum = functools.partial(jnp.einsum, precision=precision)
  # How each chunk's outputs pull on the state entering it: (q_decayed - scores w)^T dO.
  scores_pull_bhncv = einsum("bhnts,bhntv->bhnsv", local["scores"], d_out_bhncv)
  pull_bhnkv = einsum("bhnck,bhncv->bhnkv", local["q_decayed"], d_out_bhncv) - einsum(
    "bhnck,bhncv->bhnkv", local["w"], scores_pull_bhncv
  )
  d_states_out, d_initial_state = _reverse_walk(
    local, pull_bhnkv, d_final_state, chunk=chunk, precision=precision, interpret=interpret
  )
  _, outputs_vjp = jax.vjp(lambda loc: _chunk_outputs(loc, states_in, precision), local)
  (d_local,) = outputs_vjp(_merge_chunks_into_heads((d_states_out, d_out_bhncv)))
  dq, dk, dv, dg, dbeta = local_vjp(d_local)
  return dq, dk, dv, dg, dbeta, d_initial_state


@functools.cache
def _run(precision):
  return kernel_math.make_differentiable(
    functools.partial(forward, precision=precision),
    functools.partial(backward, precision=precision),
  )


def default_precision(dtype):
  """HIGHEST for float32 inputs; the platform default (TF32 on GPUs) for narrower ones."""
  if jnp.dtype(dtype) == jnp.float32:
    return jax.lax.Precision.HIGHEST
  return jax.lax.Precision.DEFAULT


def gated_delta_rule_pallas_gpu_staged(
  q,
  k,
  v,
  g,
  beta,
  *,
  scale=None,
  initial_state=None,
  chunk_size=64,
  interpret=False,
  precision=None,
):
  """Gated delta rule with the staged GPU kernels; the contract of `gated_delta_rule`.

  Args:
    q, k, v, g, beta, scale, initial_state, chunk_size, interpret: as
      `pallas_gpu.gated_delta_rule_pallas_gpu`.
    precision: a `jax.lax.Precision` for the matmuls; None: `default_precision(q.dtype)`.

  Returns:
    (o [B,T,H,V] in v's dtype, final_state [B,H,K,V] float32).
  """
  precision = default_precision(q.dtype) if precision is None else precision
  return pallas_gpu.run_padded_for_triton(
    _run(precision),
    q,
    k,
    v,
    g,
    beta,
    scale=scale,
    initial_state=initial_state,
    chunk_size=chunk_size,
    interpret=interpret,
  )
