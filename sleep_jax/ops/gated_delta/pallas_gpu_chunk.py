"""The gated delta rule over a single chunk in one Triton program per (batch, head).

Why: a sleep pass runs the rule over one short window (24 tokens in Rule 110): a single chunk,
so there is no state to walk between chunks and nothing for the chunk-parallel kernels of
pallas_gpu.py to spread out. Here one program per (batch, head) does the whole chunk, from the
incoming state to the outgoing one: one kernel forward (`kernel_math.chunk_forward`) and three
backward (`kernel_math.chunk_backward_values` through the triangular solves, saving U~ and dY;
then `chunk_backward_output_keys` and `chunk_backward_state_keys`, independent of each other).

Layout: the inputs and outputs stay in the caller's [B,T,H,...] layout. A program reads its
head's T rows as one block of C = 64 rows (Hopper's warpgroup MMA takes 64); the loads of the
rows past T are masked off (they lie in another batch's rows, or past the array) and read as
zeros, which makes them no-op tokens (g = 0 keeps the state, beta = 0 writes nothing, q = 0 reads
nothing), and the stores past T are masked. So no pad or transpose kernel runs around the call.

Registers (ptxas 12.9, sm_90a, 8 warps, [64, 64] float32 tiles of 16 registers a thread, TF32x3
products): every kernel fits without a spill for K, V <= 64 and T <= 64 (tests/gpu_compile), the
forward within 232 registers, the backward's within 200. What it takes, beyond pallas_gpu.py's
volatile reads at the point of use:
  - no address kept: every load addresses its rows from its own opaque zero (`_Reader`);
  - a matmul's loaded left operand stays in shared memory (a `where` on every loaded tile);
  - each product in its own branch of an opaque condition, so that no shared-memory descriptor is
    computed once and kept live until the next product on the same buffer
    (`kernel_math.Matmuls.guard`), and two products of one right operand as one of 128 rows, 64
    on each warpgroup (`kernel_math.Matmuls.stack_rows`);
  - each result stored as soon as it is final (`kernel_math._Results`), the decay matrix computed
    where it is needed, and the segment part of dg by a loop rather than a product.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from sleep_jax.ops.gated_delta import kernel_math
from sleep_jax.ops.gated_delta.pallas_gpu import compiler_params, matmul_precision, read_tile
from sleep_jax.ops.gated_delta.reference import fill_defaults

MAX_CHUNK = 64
MAX_WIDTH = 64
_NUM_WARPS = 8  # two warpgroups: a [64, 64] float32 tile is 16 registers a thread (4 spill more)


def _rows(num_tokens: int) -> int:
  return max(64, 1 << (num_tokens - 1).bit_length())


def fits(num_tokens: int, key_dim: int, value_dim: int) -> bool:
  """Whether one program takes the whole call: one chunk of tiles that fit its registers."""
  power_of_two = lambda n: 16 <= n <= MAX_WIDTH and n & (n - 1) == 0
  return _rows(num_tokens) <= MAX_CHUNK and power_of_two(key_dim) and power_of_two(value_dim)


class _Reader:
  """Loaders of one program's tiles (`kernel_math.read`), each a fresh volatile load at its use.

  Every load addresses its rows from a zero that the compiler cannot see through and that differs
  from use to use (program b of B divided by B + n, for the n-th load), so that no address
  tensor (a [64, 64] tile's costs 32 registers a thread) is computed once and kept live between
  the uses of a tile. And every tile passes through a `where` on its rows (past T for the
  caller's tokens; for the others a condition that always holds but is as opaque): Triton then
  keeps a matmul's left operand that was loaded in shared memory, where it would otherwise hoist
  it into registers (Triton's MMAv3 hoisting stops at a select), hi and lo parts of TF32x3 each,
  32 registers apiece.
  """

  def __init__(self, num_tokens):
    self.num_tokens = num_tokens
    self.uses = 0

  def _zero(self):
    self.uses += 1
    return jax.lax.div(pl.program_id(0), pl.num_programs(0) + self.uses)

  def tokens(self, ref, column=False):
    """A head's [C, W] block (or [C] vector, as a [C, 1] column) of the caller's array, float32;
    the rows past T are masked off (they lie past the array or in another batch's rows) and read
    as zeros."""

    def load():
      zero = self._zero()
      rows = jax.lax.broadcasted_iota(jnp.int32, ref.shape, 0) < self.num_tokens + zero
      x = pltriton.load(ref.at[pl.ds(zero, ref.shape[0])], mask=rows, other=0, volatile=True)
      x = jnp.where(rows, x.astype(jnp.float32), 0.0)
      return x[:, None] if column else x

    return load

  def tile(self, ref):
    """A whole [R, W] block (a state, or an intermediate between the backward's programs)."""

    def load():
      zero = self._zero()
      x = read_tile(ref.at[pl.ds(zero, ref.shape[0])])
      return jnp.where(jax.lax.broadcasted_iota(jnp.int32, x.shape, 0) >= zero, x, 0.0)

    return load

  def store_tokens(self, ref, x):
    """Stores a [C, W] tile (or a [C, 1] column) to a head's rows; the rows past T are masked."""
    if len(ref.shape) == 1:
      x = x[:, 0]
    rows = jax.lax.broadcasted_iota(jnp.int32, ref.shape, 0) < self.num_tokens
    pltriton.store(ref, x.astype(ref.dtype), mask=rows)


def _forward_kernel(
  q_ref, k_ref, v_ref, g_ref, beta_ref, state_ref, out_ref, final_ref, *, scale, num_tokens,
  precision,
):  # fmt: skip
  reader = _Reader(num_tokens)
  tokens = reader.tokens

  def emit(name, value):
    if name == "out":
      reader.store_tokens(out_ref, value)
    else:
      final_ref[...] = value

  kernel_math.chunk_forward(
    tokens(q_ref), tokens(k_ref), tokens(v_ref), tokens(g_ref, column=True),
    tokens(beta_ref, column=True), reader.tile(state_ref), scale, precision, emit=emit,
  )  # fmt: skip


def _backward_values_kernel(
  q_ref, k_ref, v_ref, g_ref, beta_ref, state_ref, d_out_ref, d_final_ref, dv_ref, d_state_ref,
  corrected_ref, d_right_ref, *, scale, num_tokens, precision,
):  # fmt: skip
  reader = _Reader(num_tokens)
  tokens = reader.tokens
  refs = {"corrected": corrected_ref, "d_right": d_right_ref, "d_state": d_state_ref}

  def emit(name, value):
    if name == "dv":
      reader.store_tokens(dv_ref, value)
    else:
      refs[name][...] = value

  kernel_math.chunk_backward_values(
    tokens(q_ref), tokens(k_ref), tokens(v_ref), tokens(g_ref, column=True),
    tokens(beta_ref, column=True), reader.tile(state_ref), tokens(d_out_ref),
    reader.tile(d_final_ref), scale, precision, emit=emit,
  )  # fmt: skip


def _output_keys_kernel(
  q_ref, k_ref, g_ref, state_ref, d_out_ref, corrected_ref, dq_ref, dk_ref, dg_ref, *, scale,
  num_tokens, precision,
):  # fmt: skip
  reader = _Reader(num_tokens)
  tokens = reader.tokens
  refs = {"dq": dq_ref, "dk": dk_ref, "dg": dg_ref}
  kernel_math.chunk_backward_output_keys(
    tokens(q_ref), tokens(k_ref), tokens(g_ref, column=True), reader.tile(state_ref),
    tokens(d_out_ref), scale, precision, reader.tile(corrected_ref),
    emit=lambda name, value: reader.store_tokens(refs[name], value),
  )  # fmt: skip


def _state_keys_kernel(
  k_ref, v_ref, g_ref, beta_ref, state_ref, d_final_ref, corrected_ref, d_right_ref, dk_ref,
  dg_ref, dbeta_ref, *, scale, num_tokens, precision,
):  # fmt: skip
  del scale  # (the state side has no query)
  reader = _Reader(num_tokens)
  tokens = reader.tokens
  refs = {"dk": dk_ref, "dg": dg_ref, "dbeta": dbeta_ref}
  kernel_math.chunk_backward_state_keys(
    tokens(k_ref), tokens(v_ref), tokens(g_ref, column=True), tokens(beta_ref, column=True),
    reader.tile(state_ref), reader.tile(d_final_ref), precision, reader.tile(corrected_ref),
    reader.tile(d_right_ref), emit=lambda name, value: reader.store_tokens(refs[name], value),
  )  # fmt: skip


class _Specs(NamedTuple):
  """Block specs over grid (B, H): a head's rows of [B,T,H,W] and [B,T,H], its state, and its
  [C, V] float32 intermediates between the backward's programs ([B,H,C,V])."""

  keys: pl.BlockSpec
  values: pl.BlockSpec
  column: pl.BlockSpec
  state: pl.BlockSpec
  chunk_tile: pl.BlockSpec


def _specs(q, v):
  _, num_tokens, _, key_dim = q.shape
  rows, value_dim = _rows(num_tokens), v.shape[-1]
  return _Specs(
    keys=pl.BlockSpec((None, rows, None, key_dim), lambda b, h: (b, 0, h, 0)),
    values=pl.BlockSpec((None, rows, None, value_dim), lambda b, h: (b, 0, h, 0)),
    column=pl.BlockSpec((None, rows, None), lambda b, h: (b, 0, h)),
    state=pl.BlockSpec((None, None, key_dim, value_dim), lambda b, h: (b, h, 0, 0)),
    chunk_tile=pl.BlockSpec((None, None, rows, value_dim), lambda b, h: (b, h, 0, 0)),
  )


def _always_true():
  """True (program b of B has b < B), but not to the compiler: `kernel_math.Matmuls.guard`."""
  return pl.program_id(0) < pl.num_programs(0)


def _call(kernel, q, v, *, name, scale, interpret, specs, outputs):
  """`kernel` over grid (B, H); `specs` takes the block specs (`_Specs`) and gives (in_specs,
  out_specs); `outputs`: the outputs' ShapeDtypeStructs."""
  batch, num_tokens, heads, _ = q.shape
  in_specs, out_specs = specs(_specs(q, v))
  matmuls = kernel_math.Matmuls(matmul_precision(interpret), stack_rows=True, guard=_always_true)
  return pl.pallas_call(
    functools.partial(kernel, scale=scale, num_tokens=num_tokens, precision=matmuls),
    grid=(batch, heads),
    in_specs=in_specs,
    out_specs=out_specs,
    out_shape=outputs,
    compiler_params=compiler_params(_NUM_WARPS),
    interpret=interpret,
    name=name,
  )


_FORWARD = "gated_delta_chunk_forward"
_VALUES = "gated_delta_chunk_backward_values"
_OUTPUT_KEYS = "gated_delta_chunk_backward_output_keys"
_STATE_KEYS = "gated_delta_chunk_backward_state_keys"


def _forward(q, k, v, g, beta, state, scale, interpret):
  return _call(
    _forward_kernel,
    q,
    v,
    name=_FORWARD,
    scale=scale,
    interpret=interpret,
    specs=lambda s: ([s.keys, s.keys, s.values, s.column, s.column, s.state], [s.values, s.state]),
    outputs=[
      jax.ShapeDtypeStruct(v.shape, v.dtype),
      jax.ShapeDtypeStruct(state.shape, jnp.float32),
    ],
  )(q, k, v, g, beta, state)


def _backward(q, k, v, g, beta, state, d_out, d_final, scale, interpret):
  """Three programs per head: through the triangular solves (saving U~ and dY), then the
  key-side gradients through the outputs and through the state, A and Y."""
  like = lambda x, dtype=None: jax.ShapeDtypeStruct(x.shape, dtype or x.dtype)
  batch, heads, value_dim = q.shape[0], q.shape[2], v.shape[-1]
  intermediate = jax.ShapeDtypeStruct((batch, heads, _rows(q.shape[1]), value_dim), jnp.float32)
  dv, d_state, corrected, d_right = _call(
    _backward_values_kernel,
    q,
    v,
    name=_VALUES,
    scale=scale,
    interpret=interpret,
    specs=lambda s: (
      [s.keys, s.keys, s.values, s.column, s.column, s.state, s.values, s.state],
      [s.values, s.state, s.chunk_tile, s.chunk_tile],
    ),
    outputs=[like(v), like(state), intermediate, intermediate],
  )(q, k, v, g, beta, state, d_out, d_final)
  dq, dk_out, dg_out = _call(
    _output_keys_kernel,
    q,
    v,
    name=_OUTPUT_KEYS,
    scale=scale,
    interpret=interpret,
    specs=lambda s: (
      [s.keys, s.keys, s.column, s.state, s.values, s.chunk_tile],
      [s.keys, s.keys, s.column],
    ),
    outputs=[like(q), like(k, jnp.float32), like(g)],
  )(q, k, g, state, d_out, corrected)
  dk_state, dg_state, dbeta = _call(
    _state_keys_kernel,
    q,
    v,
    name=_STATE_KEYS,
    scale=scale,
    interpret=interpret,
    specs=lambda s: (
      [s.keys, s.values, s.column, s.column, s.state, s.state, s.chunk_tile, s.chunk_tile],
      [s.keys, s.column, s.column],
    ),
    outputs=[like(k, jnp.float32), like(g), like(beta)],
  )(k, v, g, beta, state, d_final, corrected, d_right)
  dk = (dk_out + dk_state).astype(k.dtype)  # (XLA fuses the sums into their consumers)
  return dq, dk, dv, dg_out + dg_state, dbeta, d_state


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _one_chunk(q, k, v, g, beta, state, scale, interpret):
  return _forward(q, k, v, g, beta, state, scale, interpret)


def _one_chunk_forward(q, k, v, g, beta, state, scale, interpret):
  return _forward(q, k, v, g, beta, state, scale, interpret), (q, k, v, g, beta, state)


def _one_chunk_backward(scale, interpret, residuals, cotangents):
  return _backward(*residuals, *cotangents, scale, interpret)


_one_chunk.defvjp(_one_chunk_forward, _one_chunk_backward)


def gated_delta_rule_pallas_gpu_chunk(
  q, k, v, g, beta, *, scale=None, initial_state=None, interpret=False
):
  """The gated delta rule over one chunk (`fits`); the contract of `gated_delta_rule`.

  Args:
    q, k: [B,T,H,K]; v: [B,T,H,V]; g, beta: [B,T,H] (see `gated_delta_rule`).
    scale: multiplies q; defaults to K**-0.5.
    initial_state: [B,H,K,V] float32, or None for zeros.
    interpret: run the kernels in the Pallas interpreter (CPU tests).

  Returns:
    (o [B,T,H,V] in v's dtype, final_state [B,H,K,V] float32).
  """
  num_tokens, key_dim, value_dim = q.shape[1], q.shape[-1], v.shape[-1]
  if not fits(num_tokens, key_dim, value_dim):
    raise ValueError(
      f"gated_delta_rule_pallas_gpu_chunk: one program takes T <= {MAX_CHUNK} and K, V powers "
      f"of two in [16, {MAX_WIDTH}]; got T={num_tokens}, K={key_dim}, V={value_dim}"
    )
  scale, initial_state = fill_defaults(q, v, scale, initial_state)
  g, beta = g.astype(jnp.float32), beta.astype(jnp.float32)
  return _one_chunk(q, k, v, g, beta, initial_state.astype(jnp.float32), float(scale), interpret)
