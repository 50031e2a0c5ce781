"""Causal softmax attention over a short window in one Triton program per (batch, head).

Why a kernel: a sleep pass attends within one window of L tokens (24 in Rule 110), at a batch
of hundreds. XLA runs that as two batched matmuls, a masked softmax of several reductions and
the layout changes between them: about six kernel launches forward and ten backward per layer
and pass, each moving the whole [B, H, T, T] score tensor through memory. For T up to
`MAX_TOKENS` one head's [T, T] scores fit in registers, so here the forward is one kernel and
the backward one more, and the scores never leave the chip. (Longer windows belong to a
flash-attention kernel with key blocks; `api.causal_attention` leaves them to XLA.)

Layout: q, k, v and the output stay in the model's [B,T,H,D] layout. A program reads the T
rows of its head as one block, T rounded up to a power of two (Triton's tile rule): the rows
past T are masked off, read as zeros and never written (they belong to the next example), so
no pad or transpose kernel runs around the call. The forward also writes the softmax's log-normaliser per query [B,H,Tp], from
which the backward recomputes the weights instead of storing them.

Backward, per head (P the weights, dO the output's cotangent):
  dV = P^T dO;  dP = dO V^T;  dS = P * (dP - rowsum(dO * O));  dQ = scale dS K;  dK = scale dS^T Q.
Grouped-query attention: each query head writes its own dK, dV; the group's are summed outside.

Matmuls accumulate in float32. bfloat16 operands multiply as bfloat16 (the weights P and dS are
rounded to bfloat16 for their products, as flash attention does); float32 operands use three
TF32 passes on a GPU (float32 accuracy on tensor cores) and true float32 in the interpreter.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

MAX_TOKENS = 64  # the longest window one program holds (its [T, T] scores in registers)


def padded_tokens(num_tokens: int) -> int:
  """Rows per program: T rounded up to a power of two, at least 16 (Triton's tile rules)."""
  return max(16, 1 << (num_tokens - 1).bit_length())


def _dot(a, b, contract_a, contract_b, precision):
  dims = (((contract_a,), (contract_b,)), ((), ()))
  return jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _precision(dtype, interpret: bool):
  """float32 operands: exact in the interpreter (the CPU rejects TF32 presets), TF32 x3 on a GPU
  (Triton's HIGHEST is scalar FMA: slow and register-hungry); narrower ones: the default."""
  if jnp.dtype(dtype) != jnp.float32:
    return None
  return jax.lax.Precision.HIGHEST if interpret else jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3


def _valid_rows(ref, num_tokens: int):
  return jax.lax.broadcasted_iota(jnp.int32, ref.shape, 0) < num_tokens


def _load_rows(ref, num_tokens: int):
  """A head's [Tp, D] block, the rows past T read as zeros. Those rows lie in the next
  example's rows (or past the array), and Pallas' Triton lowering does not mask a block that
  overhangs its array: the load's mask does (only where the block overhangs: masks cost
  registers). The select after it stays even where it selects everything: Triton then keeps a
  matmul's loaded operand in shared memory instead of hoisting it into registers, without which
  the 64-row float32 backward spills (pallas_gpu_chunk.py measured the same)."""
  valid = _valid_rows(ref, num_tokens)
  x = ref[...] if ref.shape[0] == num_tokens else pltriton.load(ref, mask=valid, other=0)
  return jnp.where(valid, x, jnp.zeros_like(x))


def _store_rows(ref, x, num_tokens: int):
  """Stores a head's [Tp, D] block, rows past T left alone (they are another example's)."""
  if ref.shape[0] == num_tokens:
    ref[...] = x.astype(ref.dtype)
  else:
    pltriton.store(ref, x.astype(ref.dtype), mask=_valid_rows(ref, num_tokens))


def _causal(shape):
  rows = jax.lax.broadcasted_iota(jnp.int32, shape, 0)
  cols = jax.lax.broadcasted_iota(jnp.int32, shape, 1)
  return cols <= rows


def _scores(q, k, scale, precision):
  """Scaled scores [Tp, Tp] float32, -inf above the diagonal."""
  scores = _dot(q, k, 1, 1, precision) * scale
  return jnp.where(_causal(scores.shape), scores, -jnp.inf)


def _forward_kernel(q_ref, k_ref, v_ref, out_ref, lse_ref, *, scale, num_tokens, precision):
  q, k, v = (_load_rows(ref, num_tokens) for ref in (q_ref, k_ref, v_ref))
  scores = _scores(q, k, scale, precision)
  peak = jnp.max(scores, axis=1)  # the diagonal is always there: finite
  weights = jnp.exp(scores - peak[:, None])
  total = jnp.sum(weights, axis=1)
  out = _dot(weights.astype(v.dtype), v, 1, 0, precision) / total[:, None]
  _store_rows(out_ref, out, num_tokens)
  lse_ref[...] = peak + jnp.log(total)


def _backward_kernel(
  q_ref,
  k_ref,
  v_ref,
  out_ref,
  lse_ref,
  d_out_ref,
  dq_ref,
  dk_ref,
  dv_ref,
  *,
  scale,
  num_tokens,
  precision,
):
  q, k, v, out, d_out = (
    _load_rows(ref, num_tokens) for ref in (q_ref, k_ref, v_ref, out_ref, d_out_ref)
  )
  scores = _scores(q, k, scale, precision)
  weights = jnp.exp(scores - lse_ref[...][:, None])  # exactly 0 above the diagonal
  _store_rows(dv_ref, _dot(weights.astype(d_out.dtype), d_out, 0, 0, precision), num_tokens)
  d_weights = _dot(d_out, v, 1, 1, precision)
  row_dot = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=1)
  d_scores = (weights * (d_weights - row_dot[:, None])).astype(q.dtype)
  _store_rows(dq_ref, scale * _dot(d_scores, k, 1, 0, precision), num_tokens)
  _store_rows(dk_ref, scale * _dot(d_scores, q, 0, 0, precision), num_tokens)


def _specs(q, k):
  """Block specs: a head's rows of q (and the output), of its key/value head, and of lse."""
  _, num_tokens, heads, width = q.shape
  group = heads // k.shape[2]
  rows = padded_tokens(num_tokens)
  query = pl.BlockSpec((None, rows, None, width), lambda b, h: (b, 0, h, 0))
  key = pl.BlockSpec((None, rows, None, width), lambda b, h: (b, 0, h // group, 0))
  lse = pl.BlockSpec((None, None, rows), lambda b, h: (b, h, 0))
  return query, key, lse, rows


def _compiler_params(rows: int, backward: bool = False):
  # 64 rows of float32 scores, their gradient and five [64, D] tiles spill with 4 warps' 255
  # registers a thread (ptxas, sm_90a), and so do the backward's masked loads of 32 rows: 8 warps
  # share them out.
  wide = rows >= 64 or (backward and rows >= 32)
  return pltriton.CompilerParams(num_warps=8 if wide else 4, num_stages=1)


def _forward(q, k, v, scale, interpret):
  query, key, lse, rows = _specs(q, k)
  batch, num_tokens, heads, _ = q.shape
  kernel = functools.partial(
    _forward_kernel,
    scale=scale,
    num_tokens=num_tokens,
    precision=_precision(q.dtype, interpret),
  )
  return pl.pallas_call(
    kernel,
    grid=(batch, heads),
    in_specs=[query, key, key],
    out_specs=[query, lse],
    out_shape=[
      jax.ShapeDtypeStruct(q.shape, q.dtype),
      jax.ShapeDtypeStruct((batch, heads, rows), jnp.float32),
    ],
    compiler_params=_compiler_params(rows),
    interpret=interpret,
    name="causal_attention_forward",
  )(q, k, v)


def _backward(q, k, v, out, lse, d_out, scale, interpret):
  query, key, lse_spec, rows = _specs(q, k)
  batch, num_tokens, heads, _ = q.shape
  kernel = functools.partial(
    _backward_kernel,
    scale=scale,
    num_tokens=num_tokens,
    precision=_precision(q.dtype, interpret),
  )
  per_query_head = jax.ShapeDtypeStruct(q.shape, q.dtype)  # dK, dV per query head
  dq, dk, dv = pl.pallas_call(
    kernel,
    grid=(batch, heads),
    in_specs=[query, key, key, query, lse_spec, query],
    out_specs=[query, query, query],
    out_shape=[per_query_head] * 3,
    compiler_params=_compiler_params(rows, backward=True),
    interpret=interpret,
    name="causal_attention_backward",
  )(q, k, v, out, lse, d_out)
  kv_heads = k.shape[2]
  if kv_heads != heads:  # grouped-query attention: sum the group's query heads
    group_sum = lambda x: x.reshape(*x.shape[:2], kv_heads, -1, x.shape[-1]).sum(axis=3)
    dk, dv = group_sum(dk).astype(k.dtype), group_sum(dv).astype(v.dtype)
  return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _attention(q, k, v, scale, interpret):
  return _forward(q, k, v, scale, interpret)[0]


def _attention_forward(q, k, v, scale, interpret):
  out, lse = _forward(q, k, v, scale, interpret)
  return out, (q, k, v, out, lse)


def _attention_backward(scale, interpret, residuals, d_out):
  return _backward(*residuals, d_out, scale, interpret)


_attention.defvjp(_attention_forward, _attention_backward)


def causal_attention_pallas_gpu(q, k, v, *, scale, interpret=False):
  """Causal attention with the fused Triton kernels; the contract of `api.causal_attention`.

  Args:
    q: [B,T,H,D]; k, v: [B,T,G,D] (H a multiple of G), with T <= MAX_TOKENS and D a power of
      two of at least 16.
    scale: multiplies the scores.
    interpret: run the kernels in the Pallas interpreter (CPU tests).

  Returns:
    [B,T,H,D] in q's dtype.
  """
  return _attention(q, k, v.astype(q.dtype), float(scale), interpret)
