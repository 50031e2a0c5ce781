"""Pallas kernels of the gated delta rule for NVIDIA GPUs (Triton backend), forward and backward.

Why Triton rather than Mosaic GPU (JAX's default Pallas backend on Hopper): the kernel is a
sequential walk over chunks whose per-chunk work is a handful of small matmuls plus a triangular
solve, written once as array code in kernel_math.py and shared with the TPU kernel. The Triton
backend lowers that array code directly (it tiles, picks MMA instructions and pipelines loads
itself), and the very same kernel body runs in interpret mode on a CPU, which is how the tests
pin its values and gradients. Mosaic GPU asks for the schedule by hand (warpgroups, TMA copies
with 16-byte-aligned strides, which our [C, 1] decay columns violate, explicit SMEM
pipelining): worth it for the last factor of speed, not for a first correct fused kernel. The
speed comparison of the two on an H100/H200 is still owed (see README).

Grid: (batch, heads, value blocks). Value columns of the delta rule never mix (the update
u_t = beta_t (v_t - S^T k_t) is column-wise in v), so each program owns a [K, block_v] slice of
the state and walks all chunks of its sequence, keeping that slice in registers. The forward
saves the state entering every chunk for the backward, which walks the chunks in reverse,
recomputes each chunk from its saved state and writes the chunk's gradients. Gradients of q, k,
g and beta get one partial per value block; they are summed outside the kernel.

Triton wants power-of-two tiles of at least 16: K and V are zero-padded up to that (zero key and
value columns leave the state and outputs unchanged), and the chunk is a power of two.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from sleep_jax.ops.gated_delta import kernel_math
from sleep_jax.ops.gated_delta.reference import fill_defaults

_BLOCK_V = 64  # state columns per program
_NUM_WARPS = 4
_NUM_STAGES = 1  # the chunk loop carries a dependency; there is nothing to prefetch ahead


def compiler_params():
  return pltriton.CompilerParams(num_warps=_NUM_WARPS, num_stages=_NUM_STAGES)


def _forward_kernel(
  q_ref,
  k_ref,
  v_ref,
  g_ref,
  beta_ref,
  initial_state_ref,
  out_ref,
  states_ref,
  final_state_ref,
  *,
  scale,
  chunk,
  num_chunks,
):
  def step(c, state_kv):
    rows = pl.ds(pl.multiple_of(c * chunk, chunk), chunk)

    def tile(ref):
      return ref[rows, :].astype(jnp.float32)

    states_ref[c, :, :] = state_kv
    out_cv, new_state_kv = kernel_math.chunk_forward(
      tile(q_ref), tile(k_ref), tile(v_ref), tile(g_ref), tile(beta_ref), state_kv, scale
    )
    out_ref[rows, :] = out_cv.astype(out_ref.dtype)
    return new_state_kv

  final_state_ref[...] = jax.lax.fori_loop(0, num_chunks, step, initial_state_ref[...])


def _backward_kernel(
  q_ref,
  k_ref,
  v_ref,
  g_ref,
  beta_ref,
  states_ref,
  d_out_ref,
  d_final_state_ref,
  dq_ref,
  dk_ref,
  dv_ref,
  dg_ref,
  dbeta_ref,
  d_initial_state_ref,
  *,
  scale,
  chunk,
  num_chunks,
):
  def step(i, d_state_kv):
    c = num_chunks - 1 - i
    rows = pl.ds(pl.multiple_of(c * chunk, chunk), chunk)

    def tile(ref):
      return ref[rows, :].astype(jnp.float32)

    dq, dk, dv, dg, dbeta, d_state_in_kv = kernel_math.chunk_backward(
      tile(q_ref),
      tile(k_ref),
      tile(v_ref),
      tile(g_ref),
      tile(beta_ref),
      states_ref[c, :, :],
      tile(d_out_ref),
      d_state_kv,
      scale,
    )
    for ref, grad in ((dq_ref, dq), (dk_ref, dk), (dv_ref, dv), (dg_ref, dg), (dbeta_ref, dbeta)):
      ref[rows, :] = grad.astype(ref.dtype)
    return d_state_in_kv

  d_initial_state_ref[...] = jax.lax.fori_loop(0, num_chunks, step, d_final_state_ref[...])


def _specs(q, v, chunk):
  """Grid and block specs shared by the forward and backward calls."""
  batch, heads, padded_len, key_dim = q.shape
  value_dim = v.shape[-1]
  block_v = min(_BLOCK_V, value_dim)
  num_chunks = padded_len // chunk
  sequence = lambda width: pl.BlockSpec(
    (None, None, padded_len, width), lambda b, h, j: (b, h, 0, 0)
  )
  return dict(
    grid=(batch, heads, value_dim // block_v),
    num_chunks=num_chunks,
    block_v=block_v,
    keys=sequence(key_dim),
    column=sequence(1),
    values=pl.BlockSpec((None, None, padded_len, block_v), lambda b, h, j: (b, h, 0, j)),
    state=pl.BlockSpec((None, None, key_dim, block_v), lambda b, h, j: (b, h, 0, j)),
    states=pl.BlockSpec(
      (None, None, num_chunks, key_dim, block_v), lambda b, h, j: (b, h, 0, 0, j)
    ),
    # One partial gradient per value block for the inputs every value block reads.
    partial_keys=pl.BlockSpec(
      (None, None, None, padded_len, key_dim), lambda b, h, j: (b, h, j, 0, 0)
    ),
    partial_column=pl.BlockSpec((None, None, None, padded_len, 1), lambda b, h, j: (b, h, j, 0, 0)),
  )


def forward(q, k, v, g, beta, initial_state, *, scale, chunk, interpret):
  """Kernel-layout forward: (out [B,H,Tp,V], states_in [B,H,N,K,V], final_state [B,H,K,V])."""
  s = _specs(q, v, chunk)
  batch, heads, padded_len, key_dim = q.shape
  value_dim = v.shape[-1]
  kernel = functools.partial(_forward_kernel, scale=scale, chunk=chunk, num_chunks=s["num_chunks"])
  return pl.pallas_call(
    kernel,
    grid=s["grid"],
    in_specs=[s["keys"], s["keys"], s["values"], s["column"], s["column"], s["state"]],
    out_specs=[s["values"], s["states"], s["state"]],
    out_shape=[
      jax.ShapeDtypeStruct((batch, heads, padded_len, value_dim), v.dtype),
      jax.ShapeDtypeStruct((batch, heads, s["num_chunks"], key_dim, value_dim), jnp.float32),
      jax.ShapeDtypeStruct((batch, heads, key_dim, value_dim), jnp.float32),
    ],
    compiler_params=compiler_params(),
    interpret=interpret,
    name="gated_delta_forward",
  )(q, k, v, g, beta, initial_state)


def backward(q, k, v, g, beta, states_in, d_out, d_final_state, *, scale, chunk, interpret):
  """Kernel-layout backward: gradients of (q, k, v, g, beta, initial_state)."""
  s = _specs(q, v, chunk)
  batch, heads, padded_len, key_dim = q.shape
  num_value_blocks = s["grid"][2]
  partial = lambda width: jax.ShapeDtypeStruct(
    (batch, heads, num_value_blocks, padded_len, width), jnp.float32
  )
  kernel = functools.partial(_backward_kernel, scale=scale, chunk=chunk, num_chunks=s["num_chunks"])
  dq, dk, dv, dg, dbeta, d_initial_state = pl.pallas_call(
    kernel,
    grid=s["grid"],
    in_specs=[
      s["keys"],
      s["keys"],
      s["values"],
      s["column"],
      s["column"],
      s["states"],
      s["values"],
      s["state"],
    ],
    out_specs=[
      s["partial_keys"],
      s["partial_keys"],
      s["values"],
      s["partial_column"],
      s["partial_column"],
      s["state"],
    ],
    out_shape=[
      partial(key_dim),
      partial(key_dim),
      jax.ShapeDtypeStruct(v.shape, v.dtype),
      partial(1),
      partial(1),
      jax.ShapeDtypeStruct(d_final_state.shape, jnp.float32),
    ],
    compiler_params=compiler_params(),
    interpret=interpret,
    name="gated_delta_backward",
  )(q, k, v, g, beta, states_in, d_out, d_final_state)
  summed = [
    x.sum(axis=2).astype(like.dtype) for x, like in ((dq, q), (dk, k), (dg, g), (dbeta, beta))
  ]
  return summed[0], summed[1], dv, summed[2], summed[3], d_initial_state


_RUN = kernel_math.make_differentiable(forward, backward)


def _power_of_two_at_least_16(n):
  return max(16, 1 << (n - 1).bit_length())


def gated_delta_rule_pallas_gpu(
  q, k, v, g, beta, *, scale=None, initial_state=None, chunk_size=64, interpret=False
):
  """Gated delta rule with the fused GPU kernels; the contract of `gated_delta_rule`.

  Args:
    q, k: [B,T,H,K]; v: [B,T,H,V]; g, beta: [B,T,H] (see `gated_delta_rule`).
    scale: multiplies q; defaults to K**-0.5.
    initial_state: [B,H,K,V] float32, or None for zeros.
    chunk_size: tokens per chunk, rounded up to a power of two >= 16 (and capped by T).
    interpret: run the kernels in the Pallas interpreter (CPU tests).

  Returns:
    (o [B,T,H,V] in v's dtype, final_state [B,H,K,V] float32).
  """
  return run_padded_for_triton(
    _RUN,
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
