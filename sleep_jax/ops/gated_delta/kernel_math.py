"""One chunk of the gated delta rule on 2-D tiles: the math inside the Pallas kernels.

Both kernels (pallas_gpu.py, pallas_tpu.py) call `chunk_forward` and `chunk_backward` on tiles
they load from memory, so the math is written once, in the subset of jax.numpy that the Triton
and Mosaic lowerings accept: 2-D arrays, matmuls, elementwise ops, masks built from iota,
reductions with keepdims, a `fori_loop`. No cumsum, slicing, gathers or 1-D vectors. Per-token
quantities (g, beta, cumulative decay) are [C, 1] columns.

Notation follows shared/CHUNKED.md: C tokens per chunk, t the output token, s the source token,
state S [K, V] float32. The backward pass recomputes the chunk's forward quantities from its
incoming state (which the forward kernel saved) and differentiates them: `jax.vjp` for
everything except the triangular inverse, whose gradient has the closed form
dA = -M^T dM M^T for M = (I + A)^{-1}.

Also here: the layout helpers and the `jax.custom_vjp` that turn a pair of forward/backward
kernels into a differentiable `gated_delta_rule` implementation.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from sleep_jax.ops.gated_delta.reference import fill_defaults, pad_tokens

_HIGHEST = jax.lax.Precision.HIGHEST


def _dot(a, b, contract_a=1, contract_b=0):
  """Matmul of 2-D tiles in float32 (HIGHEST: no TF32 on GPUs), contracting the given axes."""
  dims = (((contract_a,), (contract_b,)), ((), ()))
  return jax.lax.dot_general(a, b, dims, precision=_HIGHEST, preferred_element_type=jnp.float32)


def _matmul_nt(a, b):
  """a @ b^T."""
  return _dot(a, b, 1, 1)


def _matmul_tn(a, b):
  """a^T @ b."""
  return _dot(a, b, 0, 0)


def _index_grids(size):
  return (
    jax.lax.broadcasted_iota(jnp.int32, (size, size), 0),
    jax.lax.broadcasted_iota(jnp.int32, (size, size), 1),
  )


def _column_to_row(x_c1):
  """[C, 1] -> [1, C] by a masked reduction over the diagonal (no transpose of a vector)."""
  row_ts, col_ts = _index_grids(x_c1.shape[0])
  return jnp.sum(jnp.where(row_ts == col_ts, x_c1, 0.0), axis=0, keepdims=True)


def _decay_terms(g_c1):
  """The chunk's decays, every one summed over its own tokens only.

  Returns:
    G [C,1] (g_1 + ... + g_t, the log decay from the chunk's start), the masked decay matrix
    D [C,C] (exp(g_{s+1} + ... + g_t) for s <= t, else 0), the log decay to the chunk's end
    [C,1] (g_{t+1} + ... + g_C) and the chunk's total [1,1].

  Never as differences of prefix sums: under strong decay G reaches -1000s in float32, and
  G_t - G_s would lose the small gap between two such numbers (see chunked._segment_sums).
  The segment sums are one matmul, seg = [j <= t] @ (g_j [j > s]), exact term by term.
  """
  row_ts, col_ts = _index_grids(g_c1.shape[0])
  causal_ts = row_ts >= col_ts
  g_1s = _column_to_row(g_c1)
  cum_log_decay_c1 = jnp.sum(jnp.where(causal_ts, g_1s, 0.0), axis=1, keepdims=True)
  to_end_c1 = jnp.sum(jnp.where(col_ts > row_ts, g_1s, 0.0), axis=1, keepdims=True)
  up_to_t_tj = jnp.where(causal_ts, 1.0, 0.0)
  after_s_js = jnp.where(row_ts > col_ts, g_c1, 0.0)  # rows j, columns s: g_j for j > s
  segment_ts = _dot(up_to_t_tj, after_s_js)
  decay_ts = jnp.where(causal_ts, jnp.exp(segment_ts), 0.0)  # segment sums are <= 0
  total_11 = jnp.sum(g_c1, axis=0, keepdims=True)
  return cum_log_decay_c1, decay_ts, to_end_c1, total_11


def _strict_lower_a(k_ck, g_c1, beta_c1):
  """Step 1: A = strictly lower part of beta_t (k_t . k_s) D_ts."""
  row_ts, col_ts = _index_grids(k_ck.shape[0])
  _, decay_ts, _, _ = _decay_terms(g_c1)
  return jnp.where(row_ts > col_ts, beta_c1 * _matmul_nt(k_ck, k_ck) * decay_ts, 0.0)


def invert_unit_lower(a_ts):
  """Step 2: (I + A)^{-1} for strictly lower-triangular A [C, C], by forward substitution.

  Row i of the inverse M is e_i - sum_{j<i} A[i, j] M[j, :]. Each step reads row i of A as a
  column (from A^T, by a mask) and overwrites row i of M (by a mask): C cheap steps of
  elementwise work, which every Pallas backend lowers.
  """
  size = a_ts.shape[0]
  row_ts, col_ts = _index_grids(size)
  col_1s = jax.lax.broadcasted_iota(jnp.int32, (1, size), 1)
  a_transposed_st = a_ts.T

  def substitute_row(i, inverse_ts):
    a_row_i_s1 = jnp.sum(jnp.where(col_ts == i, a_transposed_st, 0.0), axis=1, keepdims=True)
    new_row_1s = jnp.where(col_1s == i, 1.0, 0.0) - jnp.sum(
      a_row_i_s1 * inverse_ts, axis=0, keepdims=True
    )
    return jnp.where(row_ts == i, new_row_1s, inverse_ts)

  identity_ts = jnp.where(row_ts == col_ts, 1.0, 0.0)
  return jax.lax.fori_loop(1, size, substitute_row, identity_ts)


def _chunk_outputs(inverse_ts, q_ck, k_ck, v_cv, g_c1, beta_c1, state_kv, scale):
  """Steps 3-6 given M = (I + A)^{-1}: the chunk's outputs [C, V] and outgoing state [K, V]."""
  cum_log_decay_c1, decay_ts, to_end_c1, total_11 = _decay_terms(g_c1)
  decay_from_start_c1 = jnp.exp(cum_log_decay_c1)
  w_ck = _dot(inverse_ts, beta_c1 * decay_from_start_c1 * k_ck)
  u_cv = _dot(inverse_ts, beta_c1 * v_cv)
  corrected_cv = u_cv - _dot(w_ck, state_kv)
  scaled_q_ck = scale * q_ck
  scores_ts = _matmul_nt(scaled_q_ck, k_ck) * decay_ts
  out_cv = _dot(scaled_q_ck * decay_from_start_c1, state_kv) + _dot(scores_ts, corrected_cv)
  k_to_end_ck = k_ck * jnp.exp(to_end_c1)
  new_state_kv = jnp.exp(total_11) * state_kv + _matmul_tn(k_to_end_ck, corrected_cv)
  return out_cv, new_state_kv


def chunk_forward(q_ck, k_ck, v_cv, g_c1, beta_c1, state_kv, scale):
  """One chunk from its incoming state. All float32; returns (out [C, V], new state [K, V])."""
  inverse_ts = invert_unit_lower(_strict_lower_a(k_ck, g_c1, beta_c1))
  return _chunk_outputs(inverse_ts, q_ck, k_ck, v_cv, g_c1, beta_c1, state_kv, scale)


def chunk_backward(q_ck, k_ck, v_cv, g_c1, beta_c1, state_kv, d_out_cv, d_new_state_kv, scale):
  """Gradients of one chunk given the cotangents of its outputs and of its outgoing state.

  Returns:
    (dq, dk, dv, dg, dbeta, d_state) with the shapes of the inputs, float32.
  """
  a_ts, a_vjp = jax.vjp(_strict_lower_a, k_ck, g_c1, beta_c1)
  inverse_ts = invert_unit_lower(a_ts)
  _, outputs_vjp = jax.vjp(
    functools.partial(_chunk_outputs, scale=scale),
    inverse_ts,
    q_ck,
    k_ck,
    v_cv,
    g_c1,
    beta_c1,
    state_kv,
  )
  d_inverse_ts, dq, dk, dv, dg, dbeta, d_state = outputs_vjp((d_out_cv, d_new_state_kv))
  inverse_st = inverse_ts.T
  d_a_ts = -_dot(_dot(inverse_st, d_inverse_ts), inverse_st)
  dk_from_a, dg_from_a, dbeta_from_a = a_vjp(d_a_ts)  # a_vjp keeps only A's strict lower part
  return dq, dk + dk_from_a, dv, dg + dg_from_a, dbeta + dbeta_from_a, d_state


# --- Layout and the differentiable wrapper shared by the Pallas backends. ---------------------


def to_kernel_layout(q, k, v, g, beta, chunk):
  """[B,T,H,...] -> head-major [B,H,Tp,...] with T zero-padded to Tp, a multiple of `chunk`.

  q, k, v keep their dtype (the kernels upcast tiles to float32); g and beta become float32
  [B,H,Tp,1] columns. Zero padding is the no-op token (g = 0, beta = 0, k = q = v = 0).
  """

  def head_major(x):
    return jnp.moveaxis(pad_tokens(x, chunk), 2, 1)

  return (
    head_major(q),
    head_major(k),
    head_major(v),
    head_major(g.astype(jnp.float32))[..., None],
    head_major(beta.astype(jnp.float32))[..., None],
  )


# forward(q, k, v, g, beta, initial_state, *, scale, chunk, interpret) -> (o, states_in, final)
# backward(q, k, v, g, beta, states_in, d_o, d_final, *, scale, chunk, interpret)
#   -> (dq, dk, dv, dg, dbeta, d_initial_state); all in kernel layout.
ForwardKernel = Callable[..., tuple]
BackwardKernel = Callable[..., tuple]


def make_differentiable(forward: ForwardKernel, backward: BackwardKernel):
  """A custom-VJP function (q, k, v, g, beta, initial_state, scale, chunk, interpret) in kernel
  layout, whose forward runs `forward` and whose backward runs `backward`.

  The residuals are the inputs and the [K, V] state entering every chunk: O(T/C * K * V) per
  head, never O(T * K * V).
  """

  @functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
  def run(q, k, v, g, beta, initial_state, scale, chunk, interpret):
    out, _, final_state = forward(
      q, k, v, g, beta, initial_state, scale=scale, chunk=chunk, interpret=interpret
    )
    return out, final_state

  def run_forward(q, k, v, g, beta, initial_state, scale, chunk, interpret):
    out, states_in, final_state = forward(
      q, k, v, g, beta, initial_state, scale=scale, chunk=chunk, interpret=interpret
    )
    return (out, final_state), (q, k, v, g, beta, states_in)

  def run_backward(scale, chunk, interpret, residuals, cotangents):
    q, k, v, g, beta, states_in = residuals
    d_out, d_final_state = cotangents
    return backward(
      q,
      k,
      v,
      g,
      beta,
      states_in,
      d_out,
      d_final_state,
      scale=scale,
      chunk=chunk,
      interpret=interpret,
    )

  run.defvjp(run_forward, run_backward)
  return run


def run_in_kernel_layout(run, q, k, v, g, beta, *, scale, initial_state, chunk, interpret):
  """Applies the contract's defaults, moves to kernel layout, runs, and moves back.

  Args:
    run: a function made by `make_differentiable`.
    q, k, v, g, beta, scale, initial_state: as in `gated_delta_rule`.
    chunk: tokens per chunk (the backend's tile rules decide it); T is padded to a multiple.
    interpret: run the kernels in the Pallas interpreter.

  Returns:
    (o [B,T,H,V] in v's dtype, final_state [B,H,K,V] float32).
  """
  scale, initial_state = fill_defaults(q, v, scale, initial_state)
  laid_out = to_kernel_layout(q, k, v, g, beta, chunk)
  out_bhtv, final_state = run(
    *laid_out, initial_state.astype(jnp.float32), float(scale), chunk, interpret
  )
  out_bthv = jnp.moveaxis(out_bhtv, 1, 2)[:, : q.shape[1]]
  return out_bthv.astype(v.dtype), final_state
