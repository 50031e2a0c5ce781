"""Pallas kernels of the gated delta rule for TPUs (Mosaic backend), forward and backward.

Grid: (batch, heads, chunks), with the chunk axis "arbitrary" (sequential on one core) and the
batch and head axes "parallel". Each grid step gets one chunk's tiles in VMEM through its
BlockSpecs (Mosaic double-buffers the next chunk's copy behind the current chunk's compute),
and the [K, V] float32 state lives in a VMEM scratch buffer that persists across the chunk
axis. The forward also writes the state entering every chunk; the backward walks the chunks in
reverse (its index maps read chunk N-1-c), recomputes each chunk from that saved state and
carries the state's cotangent in scratch. The per-chunk math is kernel_math.py, shared with
the GPU kernel.

No TPU is reachable from the development machines: these kernels are checked in interpret mode
(`pltpu.InterpretParams`) against the reference on the CPU (tests/ops/test_gated_delta.py), their
Mosaic lowering by exporting for the TPU platform (tests/ops/test_pallas_lowering.py), and their
compilation by XLA:TPU inside the sharded train step (tests/tpu_compile/test_aot.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from sleep_jax.ops.gated_delta import kernel_math

_SUBLANES = 8  # a chunk is a whole number of sublane rows


def _compiler_params():
  return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))


def _interpret_mode(interpret):
  return pltpu.InterpretParams() if interpret else False


def _forward_kernel(
  q_ref,
  k_ref,
  v_ref,
  g_ref,
  beta_ref,
  initial_state_ref,
  out_ref,
  state_in_ref,
  final_state_ref,
  state_scratch,
  *,
  scale,
):
  chunk_index = pl.program_id(2)

  @pl.when(chunk_index == 0)
  def _():
    state_scratch[...] = initial_state_ref[...]

  state_kv = state_scratch[...]
  state_in_ref[...] = state_kv
  tile = lambda ref: ref[...].astype(jnp.float32)
  out_cv, new_state_kv = kernel_math.chunk_forward(
    tile(q_ref), tile(k_ref), tile(v_ref), tile(g_ref), tile(beta_ref), state_kv, scale
  )
  out_ref[...] = out_cv.astype(out_ref.dtype)
  state_scratch[...] = new_state_kv

  @pl.when(chunk_index == pl.num_programs(2) - 1)
  def _():
    final_state_ref[...] = new_state_kv


def _backward_kernel(
  q_ref,
  k_ref,
  v_ref,
  g_ref,
  beta_ref,
  state_in_ref,
  d_out_ref,
  d_final_state_ref,
  dq_ref,
  dk_ref,
  dv_ref,
  dg_ref,
  dbeta_ref,
  d_initial_state_ref,
  d_state_scratch,
  *,
  scale,
):
  step = pl.program_id(2)

  @pl.when(step == 0)
  def _():
    d_state_scratch[...] = d_final_state_ref[...]

  tile = lambda ref: ref[...].astype(jnp.float32)
  dq, dk, dv, dg, dbeta, d_state_in_kv = kernel_math.chunk_backward(
    tile(q_ref),
    tile(k_ref),
    tile(v_ref),
    tile(g_ref),
    tile(beta_ref),
    state_in_ref[...],
    tile(d_out_ref),
    d_state_scratch[...],
    scale,
  )
  for ref, grad in ((dq_ref, dq), (dk_ref, dk), (dv_ref, dv), (dg_ref, dg), (dbeta_ref, dbeta)):
    ref[...] = grad.astype(ref.dtype)
  d_state_scratch[...] = d_state_in_kv

  @pl.when(step == pl.num_programs(2) - 1)
  def _():
    d_initial_state_ref[...] = d_state_in_kv


def _specs(q, v, chunk, *, reverse):
  """Block specs over the (batch, heads, chunks) grid; `reverse` walks the chunks backwards."""
  batch, heads, padded_len, key_dim = q.shape
  value_dim = v.shape[-1]
  num_chunks = padded_len // chunk
  at = (lambda c: num_chunks - 1 - c) if reverse else (lambda c: c)
  tiles = lambda width: pl.BlockSpec((None, None, chunk, width), lambda b, h, c: (b, h, at(c), 0))
  return dict(
    grid=(batch, heads, num_chunks),
    num_chunks=num_chunks,
    keys=tiles(key_dim),
    values=tiles(value_dim),
    column=tiles(1),
    state=pl.BlockSpec((None, None, key_dim, value_dim), lambda b, h, c: (b, h, 0, 0)),
    state_in=pl.BlockSpec(
      (None, None, None, key_dim, value_dim), lambda b, h, c: (b, h, at(c), 0, 0)
    ),
  )


def forward(q, k, v, g, beta, initial_state, *, scale, chunk, interpret):
  """Kernel-layout forward: (out [B,H,Tp,V], states_in [B,H,N,K,V], final_state [B,H,K,V])."""
  s = _specs(q, v, chunk, reverse=False)
  batch, heads, padded_len, key_dim = q.shape
  value_dim = v.shape[-1]
  return pl.pallas_call(
    functools.partial(_forward_kernel, scale=scale),
    grid=s["grid"],
    in_specs=[s["keys"], s["keys"], s["values"], s["column"], s["column"], s["state"]],
    out_specs=[s["values"], s["state_in"], s["state"]],
    out_shape=[
      jax.ShapeDtypeStruct((batch, heads, padded_len, value_dim), v.dtype),
      jax.ShapeDtypeStruct((batch, heads, s["num_chunks"], key_dim, value_dim), jnp.float32),
      jax.ShapeDtypeStruct((batch, heads, key_dim, value_dim), jnp.float32),
    ],
    scratch_shapes=[pltpu.VMEM((key_dim, value_dim), jnp.float32)],
    compiler_params=_compiler_params(),
    interpret=_interpret_mode(interpret),
    name="gated_delta_forward",
  )(q, k, v, g, beta, initial_state)


def backward(q, k, v, g, beta, states_in, d_out, d_final_state, *, scale, chunk, interpret):
  """Kernel-layout backward: gradients of (q, k, v, g, beta, initial_state)."""
  s = _specs(q, v, chunk, reverse=True)
  key_dim, value_dim = q.shape[-1], v.shape[-1]
  like = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)
  return tuple(
    pl.pallas_call(
      functools.partial(_backward_kernel, scale=scale),
      grid=s["grid"],
      in_specs=[
        s["keys"],
        s["keys"],
        s["values"],
        s["column"],
        s["column"],
        s["state_in"],
        s["values"],
        s["state"],
      ],
      out_specs=[s["keys"], s["keys"], s["values"], s["column"], s["column"], s["state"]],
      out_shape=[like(q), like(k), like(v), like(g), like(beta), like(d_final_state)],
      scratch_shapes=[pltpu.VMEM((key_dim, value_dim), jnp.float32)],
      compiler_params=_compiler_params(),
      interpret=_interpret_mode(interpret),
      name="gated_delta_backward",
    )(q, k, v, g, beta, states_in, d_out, d_final_state)
  )


_RUN = kernel_math.make_differentiable(forward, backward)


def gated_delta_rule_pallas_tpu(
  q, k, v, g, beta, *, scale=None, initial_state=None, chunk_size=64, interpret=False
):
  """Gated delta rule with the fused TPU kernels; the contract of `gated_delta_rule`.

  Args:
    q, k: [B,T,H,K]; v: [B,T,H,V]; g, beta: [B,T,H] (see `gated_delta_rule`).
    scale: multiplies q; defaults to K**-0.5.
    initial_state: [B,H,K,V] float32, or None for zeros.
    chunk_size: tokens per chunk, capped by T and rounded up to a multiple of 8.
    interpret: run the kernels in the TPU interpreter (`pltpu.InterpretParams`) on any backend.

  Returns:
    (o [B,T,H,V] in v's dtype, final_state [B,H,K,V] float32).
  """
  chunk = min(chunk_size, q.shape[1])
  chunk += -chunk % _SUBLANES
  return kernel_math.run_in_kernel_layout(
    _RUN,
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
