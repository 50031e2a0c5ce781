"""One chunk of the gated delta rule on 2-D tiles: the math inside the Pallas kernels.

The kernels (pallas_gpu.py, pallas_tpu.py) call these functions on tiles they load from memory,
so the math is written once, in the subset of jax.numpy that the Triton and Mosaic lowerings
accept: 2-D arrays, matmuls, elementwise ops, masks built from iota, reductions with keepdims,
a `fori_loop`. No cumsum, slicing, gathers or 1-D vectors. Per-token quantities (g, beta,
decays) are [C, 1] columns.

Notation follows shared/CHUNKED.md: C tokens per chunk, t the output token, s the source token,
state S [K, V] float32, A the strictly lower [C, C] matrix of step 1. The WY inverse
M = (I + A)^{-1} is never formed: its products are triangular solves on the [C, V] tiles that
it multiplies (`forward_substitute`, `back_substitute`), exact float32 whatever the matmul
precision, and C x C x V work instead of C x C x C.

`chunk_forward` and `chunk_backward` are one whole chunk, forward and backward, as the TPU
kernel runs it; the one-chunk GPU kernels (pallas_gpu_chunk.py) run `chunk_forward` and the
three parts that `chunk_backward` composes, on tiles they read lazily (`read`) and with results
they store as soon as final (`_Results`). The backward is differentiated by hand: autodiff inside
a kernel keeps every intermediate of the forward alive until its cotangent is used, where the
hand-written order lets each die after its last use. The chunk-parallel GPU kernels run the same
math cut into stages (pallas_gpu.py), from the same helpers.

The matmul precision is the caller's (`Matmuls`): HIGHEST in the interpreter and on TPUs,
TF32x3 when compiled for a GPU (pallas_gpu.matmul_precision); `Matmuls` also carries how a
Triton kernel with many products at once should issue them.

Also here: the layout helpers and the `jax.custom_vjp` that turn a pair of forward/backward
kernels into a differentiable `gated_delta_rule` implementation.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from sleep_jax.ops.gated_delta.reference import fill_defaults, pad_tokens

HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class Matmuls:
  """Matmuls of 2-D tiles with float32 results, all at one precision.

  `precision` is anything `jax.lax.dot_general` takes: a `jax.lax.Precision` or a
  `jax.lax.DotAlgorithmPreset`. The other two fields are for a Triton kernel that holds many
  products at once (pallas_gpu_chunk.py); they change no value:

  `stack_rows`: `rows` computes two products that share their right operand as one product of
  the two left operands' rows stacked (a [2C, W] tile, then split). On Hopper that is one
  warpgroup MMA of 64 rows on each of two warpgroups, where each product of 64 rows would run on
  both (Triton duplicates a chained product's accumulator across them) with its own operands.

  `guard`: a function of no arguments giving a boolean that is true but that the compiler cannot
  know to be: each product then runs in its own branch of a condition on it. A warpgroup MMA
  reads its shared-memory operands through 64-bit descriptors, one per step of 8 (TF32) along
  the contraction; two products on the same shared buffer (Triton reuses them) compute the same
  descriptors, which LLVM then computes once and keeps live from the first product to the last,
  scores of registers across the whole kernel. A branch does not dominate the code after it, so
  each product computes its own, right where it runs.
  """

  precision: object = HIGHEST
  stack_rows: bool = False
  guard: Callable[[], jax.Array] | None = None

  def _dot(self, a, b, contract_a, contract_b):
    dims = (((contract_a,), (contract_b,)), ((), ()))
    product = lambda a, b: jax.lax.dot_general(
      a, b, dims, precision=self.precision, preferred_element_type=jnp.float32
    )
    if self.guard is None:
      return product(a, b)
    shape = (a.shape[1 - contract_a], b.shape[1 - contract_b])
    skip = lambda a, b: jnp.zeros(shape, jnp.float32)
    return jax.lax.cond(self.guard(), product, skip, a, b)

  def nn(self, a, b):
    """a @ b."""
    return self._dot(a, b, 1, 0)

  def nt(self, a, b):
    """a @ b^T."""
    return self._dot(a, b, 1, 1)

  def tn(self, a, b):
    """a^T @ b."""
    return self._dot(a, b, 0, 0)

  def rows(self, product, a1, a2, b, transpose_second=False):
    """(product(a1, b), product(a2, b)), or product(a2^T, b) for the second if
    `transpose_second`: `product` is `nn` or `nt`. With `stack_rows`, one product of [a1; a2]
    when the two have one shape."""
    second = a2.T if transpose_second else a2
    if not self.stack_rows or a1.shape != second.shape:
      if transpose_second and product == self.nn:
        return product(a1, b), self.tn(a2, b)  # (no transpose of a tile outside a stack)
      return product(a1, b), product(second, b)
    first, second = jnp.split(product(_stack_rows(a1, second), b), 2, axis=0)
    return first, second


def _stack_rows(x, y):
  """[x; y] for two [R, W] tiles (a stack and a reshape: Triton concatenates no other way)."""
  return jnp.transpose(jnp.stack([x, y], axis=-1), (2, 0, 1)).reshape(-1, x.shape[1])


def as_matmuls(precision) -> Matmuls:
  """A `Matmuls` given one, or one at the given precision."""
  return precision if isinstance(precision, Matmuls) else Matmuls(precision)


# --- Small tile helpers. ------------------------------------------------------------------------


def index_grids(size):
  """(row index, column index), each [size, size] int32."""
  return (
    jax.lax.broadcasted_iota(jnp.int32, (size, size), 0),
    jax.lax.broadcasted_iota(jnp.int32, (size, size), 1),
  )


def column_to_row(x_c1):
  """[C, 1] -> [1, C] by a masked reduction over the diagonal (no transpose of a vector)."""
  row_ts, col_ts = index_grids(x_c1.shape[0])
  return jnp.sum(jnp.where(row_ts == col_ts, x_c1, 0.0), axis=0, keepdims=True)


def row_to_column(x_1c):
  """[1, C] -> [C, 1], the inverse of `column_to_row`."""
  row_ts, col_ts = index_grids(x_1c.shape[1])
  return jnp.sum(jnp.where(row_ts == col_ts, x_1c, 0.0), axis=1, keepdims=True)


def sum_all(x):
  """The sum of a 2-D tile as a [1, 1] tile."""
  return jnp.sum(jnp.sum(x, axis=0, keepdims=True), axis=1, keepdims=True)


def strictly_lower(x_ts):
  row_ts, col_ts = index_grids(x_ts.shape[0])
  return jnp.where(row_ts > col_ts, x_ts, 0.0)


# --- Decays. ------------------------------------------------------------------------------------


class Decays(NamedTuple):
  """The chunk's decay factors, each exp of a sum of g over the chunk's own tokens."""

  from_start_c1: jax.Array  # e: exp(g_1 + ... + g_t)
  matrix_ts: jax.Array  # D: exp(g_{s+1} + ... + g_t) for s <= t, else 0
  to_end_c1: jax.Array  # r: exp(g_{t+1} + ... + g_C)
  total_11: jax.Array  # gamma: exp(g_1 + ... + g_C)


def _segment_sums(g_c1):
  """seg[t, s] = g_{s+1} + ... + g_t for s < t, else 0: one token added per step, in order.

  Each sum is taken over its own tokens, never as the difference G_t - G_s of two prefix sums:
  under strong decay those reach -1000s in float32 and their difference loses the small gap
  between them (see chunked._segment_sums). A loop of C masked adds rather than a matmul: exact
  float32 whatever the matmul precision, and one [C, C] tile of registers.
  """
  size = g_c1.shape[0]
  row_ts, col_ts = index_grids(size)
  g_1j = column_to_row(g_c1)
  col_1j = jax.lax.broadcasted_iota(jnp.int32, (1, size), 1)

  def add_token(j, segment_ts):
    g_j_11 = jnp.sum(jnp.where(col_1j == j, g_1j, 0.0), axis=1, keepdims=True)
    return segment_ts + jnp.where((col_ts < j) & (row_ts >= j), g_j_11, 0.0)

  return jax.lax.fori_loop(1, size, add_token, jnp.zeros((size, size), jnp.float32))


class DecayColumns(NamedTuple):
  """The decays of `Decays` that are columns (no [C, C] tile)."""

  from_start_c1: jax.Array
  to_end_c1: jax.Array
  total_11: jax.Array


def decay_columns(g_c1) -> DecayColumns:
  """e, r and gamma of `Decays`: a few masked reductions, no loop."""
  row_ts, col_ts = index_grids(g_c1.shape[0])
  g_1s = column_to_row(g_c1)
  from_start_c1 = jnp.sum(jnp.where(row_ts >= col_ts, g_1s, 0.0), axis=1, keepdims=True)
  to_end_c1 = jnp.sum(jnp.where(col_ts > row_ts, g_1s, 0.0), axis=1, keepdims=True)
  return DecayColumns(
    from_start_c1=jnp.exp(from_start_c1),
    to_end_c1=jnp.exp(to_end_c1),
    total_11=jnp.exp(jnp.sum(g_c1, axis=0, keepdims=True)),
  )


def decay_matrix(g_c1):
  """D of `Decays`: exp of the segment sums on and below the diagonal, 0 above."""
  row_ts, col_ts = index_grids(g_c1.shape[0])
  return jnp.where(row_ts >= col_ts, jnp.exp(_segment_sums(g_c1)), 0.0)


def decays(g_c1) -> Decays:
  """The chunk's decays, every exponent summed over the chunk's own tokens (all <= 0)."""
  columns = decay_columns(g_c1)
  return Decays(
    from_start_c1=columns.from_start_c1,
    matrix_ts=decay_matrix(g_c1),
    to_end_c1=columns.to_end_c1,
    total_11=columns.total_11,
  )


# --- Triangular solves with I + A, A strictly lower [C, C]. -------------------------------------


def _column_of(a_ts, j):
  """Column j of a [C, C] tile, as [C, 1]."""
  _, col_ts = index_grids(a_ts.shape[0])
  return jnp.sum(jnp.where(col_ts == j, a_ts, 0.0), axis=1, keepdims=True)


def forward_substitute(a_ts, y_cv):
  """(I + A)^{-1} Y for Y [C, V].

  Column-oriented: once row j of the solution is final, subtract A[:, j] times it from every
  row (only rows below j have A[i, j] != 0). Reads A by columns, so A is never transposed.
  """
  row_cv = jax.lax.broadcasted_iota(jnp.int32, y_cv.shape, 0)

  def eliminate(j, x_cv):
    x_row_j_1v = jnp.sum(jnp.where(row_cv == j, x_cv, 0.0), axis=0, keepdims=True)
    return x_cv - _column_of(a_ts, j) * x_row_j_1v

  return jax.lax.fori_loop(0, a_ts.shape[0] - 1, eliminate, y_cv)


def back_substitute(a_ts, d_cv):
  """(I + A)^{-T} D for D [C, V], the transpose's solve (the backward of `forward_substitute`).

  Row i of the solution is D_i - sum_{j > i} A[j, i] Z_j, from the last row up; A[:, i] is again
  a column of A.
  """
  size = a_ts.shape[0]
  row_cv = jax.lax.broadcasted_iota(jnp.int32, d_cv.shape, 0)

  def solve_row(n, z_cv):
    i = size - 2 - n
    new_row_1v = jnp.sum(
      jnp.where(row_cv == i, z_cv, 0.0) - _column_of(a_ts, i) * z_cv, axis=0, keepdims=True
    )
    return jnp.where(row_cv == i, new_row_1v, z_cv)

  return jax.lax.fori_loop(0, size - 1, solve_row, d_cv)


# --- Gradients of the decays. -------------------------------------------------------------------


def segment_log_decay_gradient(d_log_segment_ts, mm: Matmuls):
  """dg [C, 1] from the cotangent of the segment sums (each d D * D): g_j is in the segment of
  (t, s) iff s < j <= t. Summed term by term, by one matmul with a 0/1 matrix (exact at every
  precision) and a masked row sum, never as a difference of running sums."""
  row_jt, col_jt = index_grids(d_log_segment_ts.shape[0])
  up_to_t_tj = jnp.where(row_jt >= col_jt, 1.0, 0.0)
  through_j_js = mm.tn(up_to_t_tj, d_log_segment_ts)  # sum over t >= j
  return jnp.sum(jnp.where(col_jt < row_jt, through_j_js, 0.0), axis=1, keepdims=True)


def segment_log_decay_gradient_by_rows(d_log_segment_ts):
  """`segment_log_decay_gradient` without a matmul: a loop over the rows j from the last up,
  carrying the sum of the rows t >= j (a [1, C] row) and summing its entries s < j into dg_j.
  The same sums term by term, exact float32, and no [C, C] operand besides the cotangent."""
  size = d_log_segment_ts.shape[0]
  row_ts, _ = index_grids(size)
  row_c1 = jax.lax.broadcasted_iota(jnp.int32, (size, 1), 0)
  col_1s = jax.lax.broadcasted_iota(jnp.int32, (1, size), 1)

  def add_row(n, carry):
    rows_through_j_1s, dg_c1 = carry
    j = size - 1 - n
    rows_through_j_1s += jnp.sum(
      jnp.where(row_ts == j, d_log_segment_ts, 0.0), axis=0, keepdims=True
    )
    dg_11 = jnp.sum(jnp.where(col_1s < j, rows_through_j_1s, 0.0), axis=1, keepdims=True)
    return rows_through_j_1s, jnp.where(row_c1 == j, dg_11, dg_c1)

  zeros = (jnp.zeros((1, size), jnp.float32), jnp.zeros((size, 1), jnp.float32))
  return jax.lax.fori_loop(0, size - 1, add_row, zeros)[1]


def log_decay_gradient(d_log_from_start_c1, d_log_to_end_c1, d_log_total_11):
  """dg [C, 1] from the cotangents of the prefix sums (t >= j), the sums to the chunk's end
  (t < j) and the total (all j), each d decay * decay."""
  row_jt, col_jt = index_grids(d_log_from_start_c1.shape[0])
  from_start_1t = column_to_row(d_log_from_start_c1)
  to_end_1t = column_to_row(d_log_to_end_c1)
  prefix_and_suffix_c1 = jnp.sum(
    jnp.where(col_jt >= row_jt, from_start_1t, to_end_1t), axis=1, keepdims=True
  )
  return prefix_and_suffix_c1 + d_log_total_11


# --- One whole chunk (the TPU kernel and pallas_gpu_chunk.py). ----------------------------------
#
# Every tile argument below (q, k, v, g, beta, the state, the cotangents, U~ and dY) is either an
# array or a loader: a function of no arguments that reads the tile (`read`). The TPU kernel
# passes arrays; the one-chunk GPU kernels pass volatile loads, so that every use reads its tile
# from memory right there and no tile is held in registers between its uses (pallas_gpu.py).
# Likewise `emit` (`_Results`): results returned, or stored by the kernel as soon as final. The
# order of the computations is the kernels' register plan: each [C, C] tile and the decay matrix
# made right before their uses, results out as soon as final.


def read(tile):
  """The tile itself, or what its loader reads (see above)."""
  return tile() if callable(tile) else tile


class _Results:
  """A one-chunk function's results: each handed to `emit(name, value)` as soon as it is final
  when the caller gives `emit` (a kernel stores it there and then, so it does not stay live while
  the rest is computed), else collected and returned as a tuple."""

  def __init__(self, emit):
    self._emit = emit
    self._values = {}

  def __setitem__(self, name, value):
    if self._emit is None:
      self._values[name] = value
    else:
      self._emit(name, value)

  def __call__(self, *names):
    return None if self._emit is not None else tuple(self._values[name] for name in names)


def _key_gram(k_ck, mm: Matmuls):
  """k k^T."""
  return mm.nt(read(k_ck), read(k_ck))


def _corrected(k_ck, v_cv, beta_c1, state_kv, from_start_c1, a_ts, mm: Matmuls):
  """U~ = (I + A)^{-1} Y with Y = beta (v - e k S): one solve for M (beta v) - W S."""
  keys_through_state_cv = mm.nn(read(k_ck), read(state_kv))
  right_cv = read(beta_c1) * (read(v_cv) - from_start_c1 * keys_through_state_cv)
  return forward_substitute(a_ts, right_cv)


def chunk_forward(q_ck, k_ck, v_cv, g_c1, beta_c1, state_kv, scale, precision=HIGHEST, emit=None):
  """One chunk from its incoming state. All float32; returns (out [C, V], new state [K, V]),
  or hands them to `emit` as "out" and "new_state" (`_Results`). `precision`: a `Matmuls` or
  its precision."""
  results = _Results(emit)
  mm = as_matmuls(precision)
  decay = decay_columns(read(g_c1))
  matrix_ts = decay_matrix(read(g_c1))
  key_gram_ts, scores_ts = mm.rows(mm.nt, read(k_ck), scale * read(q_ck), read(k_ck))
  a_ts = strictly_lower(read(beta_c1) * key_gram_ts * matrix_ts)
  scores_ts *= matrix_ts  # P = (s q k^T) * D
  keys_through_state_cv, out_cv = mm.rows(
    mm.nn, read(k_ck), scale * read(q_ck) * decay.from_start_c1, read(state_kv)
  )
  right_cv = read(beta_c1) * (read(v_cv) - decay.from_start_c1 * keys_through_state_cv)
  corrected_cv = forward_substitute(a_ts, right_cv)  # U~ = (I + A)^{-1} (beta v - X S)
  # O = (s q e) S + P U~ and S' = gamma S + (r k)^T U~.
  out_through_corrected_cv, state_through_corrected_kv = mm.rows(
    mm.nn, scores_ts, read(k_ck) * decay.to_end_c1, corrected_cv, transpose_second=True
  )
  results["out"] = out_cv + out_through_corrected_cv
  results["new_state"] = decay.total_11 * read(state_kv) + state_through_corrected_kv
  return results("out", "new_state")


def chunk_backward(
  q_ck, k_ck, v_cv, g_c1, beta_c1, state_kv, d_out_cv, d_new_state_kv, scale, precision=HIGHEST
):
  """Gradients of one chunk given the cotangents of its outputs and of its outgoing state.

  The forward, in the names used here (e the decay from the chunk's start, r the decay to its
  end, gamma the total, D the decay matrix, X = beta e k):
      U~ = (I + A)^{-1} Y,  Y = beta v - X S,   P = (s q k^T) * D,
      O = (s q e) S + P U~,   S' = gamma S + (r k)^T U~.
  With dU~ the cotangent of U~, Y's is dY = (I + A)^{-T} dU~ and A's is -dY U~^T (on A's
  strictly lower support): the inverse's gradient -M^T dM M^T with dM = dU~ Y^T, in one
  C x C x V product. In three parts, which a kernel may run as three programs: through the
  triangular solves (`chunk_backward_values`), then, given U~ and dY, the key-side gradients
  through the outputs (`chunk_backward_output_keys`) and through the state, Y and A
  (`chunk_backward_state_keys`).

  Returns:
    (dq, dk, dv, dg, dbeta, d_state) with the shapes of the inputs, float32.
  """
  inputs = (q_ck, k_ck, v_cv, g_c1, beta_c1, state_kv, d_out_cv, d_new_state_kv, scale, precision)
  dv_cv, d_state_kv, corrected_cv, d_right_cv = chunk_backward_values(*inputs)
  dq_ck, dk_ck, dg_c1, dbeta_c1 = chunk_backward_keys(*inputs, corrected_cv, d_right_cv)
  return dq_ck, dk_ck, dv_cv, dg_c1, dbeta_c1, d_state_kv


def chunk_backward_values(
  q_ck, k_ck, v_cv, g_c1, beta_c1, state_kv, d_out_cv, d_new_state_kv, scale, precision=HIGHEST,
  emit=None,
):  # fmt: skip
  """The part of `chunk_backward` through the triangular solves.

  Returns:
    (dv [C, V], d_state [K, V], U~ [C, V], dY [C, V]), the last two for `chunk_backward_keys`;
    or hands them to `emit` as "dv", "d_state", "corrected" and "d_right" (`_Results`).
  """
  results = _Results(emit)
  mm = as_matmuls(precision)
  decay = decay_columns(read(g_c1))
  matrix_ts = decay_matrix(read(g_c1))
  key_gram_ts, scores_ts = mm.rows(mm.nt, read(k_ck), scale * read(q_ck), read(k_ck))
  a_ts = strictly_lower(read(beta_c1) * key_gram_ts * matrix_ts)
  # S' = gamma S + (r k)^T U~ and O = ... + P U~: the cotangent of U~ (no U~ in it).
  d_corrected_cv = mm.tn(scores_ts * matrix_ts, read(d_out_cv))
  d_corrected_cv += mm.nn(read(k_ck) * decay.to_end_c1, read(d_new_state_kv))
  results["corrected"] = _corrected(k_ck, v_cv, beta_c1, state_kv, decay.from_start_c1, a_ts, mm)
  d_right_cv = back_substitute(a_ts, d_corrected_cv)  # dY; U~ = (I + A)^{-1} Y
  results["d_right"] = d_right_cv
  results["dv"] = read(beta_c1) * d_right_cv
  results["d_state"] = (
    decay.total_11 * read(d_new_state_kv)
    + mm.tn(scale * read(q_ck) * decay.from_start_c1, read(d_out_cv))
    - mm.tn(read(beta_c1) * decay.from_start_c1 * read(k_ck), d_right_cv)
  )
  return results("dv", "d_state", "corrected", "d_right")


def chunk_backward_keys(
  q_ck,
  k_ck,
  v_cv,
  g_c1,
  beta_c1,
  state_kv,
  d_out_cv,
  d_new_state_kv,
  scale,
  precision,
  corrected_cv,
  d_right_cv,
):
  """The part of `chunk_backward` after the solves, given U~ and dY: no substitution loop.

  The sum of two independent parts (`chunk_backward_output_keys`, through O's second term,
  and `chunk_backward_state_keys`, through S', Y and A), which a kernel may run apart.

  Returns:
    (dq [C, K], dk [C, K], dg [C, 1], dbeta [C, 1]).
  """
  dq_ck, dk_out_ck, dg_out_c1 = chunk_backward_output_keys(
    q_ck, k_ck, g_c1, state_kv, d_out_cv, scale, precision, corrected_cv
  )
  dk_ck, dg_c1, dbeta_c1 = chunk_backward_state_keys(
    k_ck, v_cv, g_c1, beta_c1, state_kv, d_new_state_kv, precision, corrected_cv, d_right_cv
  )
  return dq_ck, dk_out_ck + dk_ck, dg_out_c1 + dg_c1, dbeta_c1


def chunk_backward_output_keys(
  q_ck, k_ck, g_c1, state_kv, d_out_cv, scale, precision, corrected_cv, emit=None
):
  """dq, and the parts of dk and dg through O = (s q e) S + P U~ (P = (s q k^T) * D).

  Returns (dq [C, K], dk [C, K], dg [C, 1]), or hands them to `emit` as "dq", "dk" and "dg".
  """
  results = _Results(emit)
  mm = as_matmuls(precision)
  matrix_ts = decay_matrix(read(g_c1))
  d_scores_ts = mm.nt(read(d_out_cv), read(corrected_cv)) * matrix_ts  # dP, masked like P
  # g's part through P: dP * P is the cotangent of P's log.
  scores_ts = mm.nt(scale * read(q_ck), read(k_ck))  # (P's mask and D are in dP already)
  dg_c1 = segment_log_decay_gradient_by_rows(d_scores_ts * scores_ts)
  results["dk"] = mm.tn(d_scores_ts, scale * read(q_ck))
  dq_ck = mm.nn(d_scores_ts, read(k_ck))
  from_start_c1 = decay_columns(read(g_c1)).from_start_c1
  d_queries_decayed_ck = mm.nt(read(d_out_cv), read(state_kv))  # what s q e receives
  results["dq"] = scale * (dq_ck + from_start_c1 * d_queries_decayed_ck)
  d_log_from_start_c1 = from_start_c1 * jnp.sum(
    scale * read(q_ck) * d_queries_decayed_ck, axis=1, keepdims=True
  )
  results["dg"] = dg_c1 + log_decay_gradient(
    d_log_from_start_c1, jnp.zeros_like(d_log_from_start_c1), jnp.zeros((1, 1), jnp.float32)
  )
  return results("dq", "dk", "dg")


def chunk_backward_state_keys(
  k_ck, v_cv, g_c1, beta_c1, state_kv, d_new_state_kv, precision, corrected_cv, d_right_cv,
  emit=None,
):  # fmt: skip
  """The parts of dk, dg and dbeta through S' = gamma S + (r k)^T U~, Y = beta v - X S
  (X = beta e k) and A = strictly lower (beta k k^T * D).

  Returns (dk [C, K], dg [C, 1], dbeta [C, 1]), or hands them to `emit` as "dk", "dg", "dbeta".
  """
  results = _Results(emit)
  mm = as_matmuls(precision)
  # Through A first, while no [C, K] tile is live.
  matrix_ts = decay_matrix(read(g_c1))
  d_a_ts = strictly_lower(-mm.nt(read(d_right_cv), read(corrected_cv))) * matrix_ts
  a_pull_ts = d_a_ts * _key_gram(k_ck, mm)
  dbeta_c1 = jnp.sum(a_pull_ts, axis=1, keepdims=True)
  dg_c1 = segment_log_decay_gradient_by_rows(read(beta_c1) * a_pull_ts)  # has D's factor
  d_key_gram_ts = read(beta_c1) * d_a_ts
  dk_ck = mm.nn(d_key_gram_ts + d_key_gram_ts.T, read(k_ck))  # k k^T has k on both sides

  decay = decay_columns(read(g_c1))
  d_keys_to_end_ck = mm.nt(read(corrected_cv), read(d_new_state_kv))
  dk_ck += decay.to_end_c1 * d_keys_to_end_ck
  d_log_to_end_c1 = decay.to_end_c1 * jnp.sum(read(k_ck) * d_keys_to_end_ck, axis=1, keepdims=True)
  d_log_total_11 = decay.total_11 * sum_all(read(state_kv) * read(d_new_state_kv))

  d_decayed_keys_ck = -mm.nt(read(d_right_cv), read(state_kv))
  keys_pull_c1 = jnp.sum(read(k_ck) * d_decayed_keys_ck, axis=1, keepdims=True)
  results["dk"] = dk_ck + read(beta_c1) * decay.from_start_c1 * d_decayed_keys_ck
  dbeta_c1 += (
    jnp.sum(read(v_cv) * read(d_right_cv), axis=1, keepdims=True)
    + decay.from_start_c1 * keys_pull_c1
  )
  results["dbeta"] = dbeta_c1
  d_log_from_start_c1 = read(beta_c1) * keys_pull_c1 * decay.from_start_c1
  results["dg"] = dg_c1 + log_decay_gradient(d_log_from_start_c1, d_log_to_end_c1, d_log_total_11)
  return results("dk", "dg", "dbeta")


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


# forward(q, k, v, g, beta, initial_state, *, scale, chunk, interpret) -> (o, saved, final)
# backward(q, k, v, g, beta, saved, d_o, d_final, *, scale, chunk, interpret)
#   -> (dq, dk, dv, dg, dbeta, d_initial_state); all in kernel layout. `saved` is what the
#   backward needs besides the inputs (the state entering every chunk, and whatever else the
#   backend keeps), any pytree.
ForwardKernel = Callable[..., tuple]
BackwardKernel = Callable[..., tuple]


def make_differentiable(forward: ForwardKernel, backward: BackwardKernel):
  """A custom-VJP function (q, k, v, g, beta, initial_state, scale, chunk, interpret) in kernel
  layout, whose forward runs `forward` and whose backward runs `backward`.

  The residuals are the inputs and the forward's `saved` (the [K, V] state entering every
  chunk, O(T/C * K * V) per head, never O(T * K * V); the GPU kernels add a [T, V] tile).
  """

  @functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
  def run(q, k, v, g, beta, initial_state, scale, chunk, interpret):
    out, _, final_state = forward(
      q, k, v, g, beta, initial_state, scale=scale, chunk=chunk, interpret=interpret
    )
    return out, final_state

  def run_forward(q, k, v, g, beta, initial_state, scale, chunk, interpret):
    out, saved, final_state = forward(
      q, k, v, g, beta, initial_state, scale=scale, chunk=chunk, interpret=interpret
    )
    return (out, final_state), (q, k, v, g, beta, saved)

  def run_backward(scale, chunk, interpret, residuals, cotangents):
    q, k, v, g, beta, saved = residuals
    d_out, d_final_state = cotangents
    return backward(
      q,
      k,
      v,
      g,
      beta,
      saved,
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
