"""`gated_delta_rule`: the one public entry point, validating inputs and dispatching by `impl=`.

Shapes: B batch, T tokens, H heads, K key/query width, V value width. Semantics and layouts
are those of flash-linear-attention's `chunk_gated_delta_rule`, so results are comparable.
"""

from __future__ import annotations

import functools
import numbers

import jax

from sleep_jax.ops import partition
from sleep_jax.ops.gated_delta import pallas_gpu_chunk
from sleep_jax.ops.gated_delta.chunked import gated_delta_rule_chunked
from sleep_jax.ops.gated_delta.pallas_gpu import gated_delta_rule_pallas_gpu
from sleep_jax.ops.gated_delta.pallas_gpu_staged import gated_delta_rule_pallas_gpu_staged
from sleep_jax.ops.gated_delta.pallas_tpu import gated_delta_rule_pallas_tpu
from sleep_jax.ops.gated_delta.reference import fill_defaults, gated_delta_rule_reference


# Each implementation: (q, k, v, g, beta, initial_state, *, scale, chunk_size) -> (o, final_state),
# with the contract's defaults already filled in (scale a float, initial_state an array).
def _reference(q, k, v, g, beta, initial_state, *, scale, chunk_size):
  del chunk_size  # the oracle goes token by token
  return gated_delta_rule_reference(q, k, v, g, beta, scale=scale, initial_state=initial_state)


def _keyword_contract(rule, **fixed):
  """`rule(q, k, v, g, beta, *, scale, initial_state, chunk_size, **fixed)` as an implementation
  of the signature above (the public rules of chunked.py and the Pallas modules)."""

  def run(q, k, v, g, beta, initial_state, *, scale, chunk_size):
    return rule(
      q, k, v, g, beta, scale=scale, initial_state=initial_state, chunk_size=chunk_size, **fixed
    )

  return run


def _triton_fused(*, interpret):
  """The fused GPU kernels: a call of one chunk that one program per head holds runs as one
  (pallas_gpu_chunk.py: one launch forward, three backward), any other as the chunk-parallel
  kernels of pallas_gpu.py."""

  def run(q, k, v, g, beta, initial_state, *, scale, chunk_size):
    num_tokens, key_dim, value_dim = q.shape[1], q.shape[-1], v.shape[-1]
    if num_tokens <= chunk_size and pallas_gpu_chunk.fits(num_tokens, key_dim, value_dim):
      return pallas_gpu_chunk.gated_delta_rule_pallas_gpu_chunk(
        q, k, v, g, beta, scale=scale, initial_state=initial_state, interpret=interpret
      )
    return gated_delta_rule_pallas_gpu(
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

  return run


_chunked = _keyword_contract(gated_delta_rule_chunked)
_triton = _triton_fused(interpret=False)
_triton_staged = _keyword_contract(gated_delta_rule_pallas_gpu_staged)
_mosaic = _keyword_contract(gated_delta_rule_pallas_tpu, interpret=False)
# The GPU kernels in the Pallas interpreter: what "pallas" and "pallas_staged" run off a GPU.
_triton_interpreted = _triton_fused(interpret=True)
_triton_staged_interpreted = _keyword_contract(gated_delta_rule_pallas_gpu_staged, interpret=True)


def _by_platform(default, **per_platform):
  """An implementation that picks its branch by the platform being lowered for.

  `jax.lax.platform_dependent` traces every branch but lowers only the target platform's, so
  one jitted function compiles to Mosaic kernels for a TPU, Triton kernels for a GPU and XLA
  for a CPU, whatever the host's default backend (compiling for a TPU topology from a CPU host
  gets the Mosaic kernels).
  """

  def run(*args, scale, chunk_size):
    bind = lambda impl: functools.partial(impl, scale=scale, chunk_size=chunk_size)
    return jax.lax.platform_dependent(
      *args, default=bind(default), **{name: bind(impl) for name, impl in per_platform.items()}
    )

  return run


def _gpu_choice(num_tokens: int, chunk_size: int) -> str:
  """What "auto" runs on a GPU for a call of `num_tokens` tokens.

  One chunk: the fused kernel, one launch each way; the staged form would run that chunk's
  local terms as tens of small XLA kernels (the sleep passes over short windows are all such
  calls). Several chunks: the staged form, whose chunk-parallel stages use the whole GPU where
  the fused kernel walks every chunk of a sequence in one program. Which is faster per shape is
  for the GPU measurements to settle (docs/results/gpu/).
  """
  return "pallas" if num_tokens <= chunk_size else "pallas_staged"


def _gpu_auto(*args, scale, chunk_size):
  impl = {"pallas": _triton, "pallas_staged": _triton_staged}[
    _gpu_choice(args[0].shape[1], chunk_size)
  ]
  return impl(*args, scale=scale, chunk_size=chunk_size)


# Name -> implementation. "pallas" off a GPU or TPU interprets the GPU kernels (slow: for tests);
# "pallas_staged" (GPU only) interprets its walk kernels anywhere else.
_IMPLEMENTATIONS = {
  "reference": _reference,
  "chunked": _chunked,
  "pallas": _by_platform(_triton_interpreted, cuda=_triton, tpu=_mosaic),
  "pallas_staged": _by_platform(_triton_staged_interpreted, cuda=_triton_staged),
  "auto": _by_platform(_chunked, cuda=_gpu_auto, tpu=_mosaic),
}


def resolve_impl(
  impl: str, platform: str, *, num_tokens: int | None = None, chunk_size: int = 64
) -> str:
  """The implementation `impl` runs when lowered for `platform` ("cpu", "cuda", "tpu", ...).

  "auto" is the fused Mosaic kernels on TPUs and the chunked XLA form on CPUs (where Pallas
  only interprets). On CUDA GPUs it is the fused Triton kernel for a call of one chunk
  (`num_tokens` <= `chunk_size`) and the staged kernels otherwise (and when `num_tokens` is not
  given). The choice is made when a function is lowered, not by the host's default backend:
  see `_by_platform`.
  """
  if impl != "auto":
    return impl
  if platform in ("cuda", "gpu"):
    return "pallas_staged" if num_tokens is None else _gpu_choice(num_tokens, chunk_size)
  return {"tpu": "pallas"}.get(platform, "chunked")


def _check_shape(name, actual, expected):
  if tuple(actual) != tuple(expected):
    raise ValueError(
      f"gated_delta_rule: {name} has shape {tuple(actual)}, expected {tuple(expected)} "
      "(q, k [B,T,H,K]; v [B,T,H,V]; g, beta [B,T,H]; initial_state [B,H,K,V])."
    )


def _validate(q, k, v, g, beta, initial_state, impl, chunk_size):
  """Raises ValueError on any inconsistency, before anything is computed."""
  if impl not in _IMPLEMENTATIONS:
    known = ", ".join(sorted(_IMPLEMENTATIONS))
    raise ValueError(f"gated_delta_rule: unknown impl {impl!r}; expected one of {known}.")
  is_int = isinstance(chunk_size, numbers.Integral) and not isinstance(chunk_size, bool)
  if not is_int or chunk_size < 1:
    raise ValueError(f"gated_delta_rule: chunk_size must be a positive int, got {chunk_size!r}.")
  for name, x, ndim in (("q", q, 4), ("k", k, 4), ("v", v, 4), ("g", g, 3), ("beta", beta, 3)):
    if x.ndim != ndim:
      raise ValueError(f"gated_delta_rule: {name} must have {ndim} dims, got shape {x.shape}.")
  batch, num_tokens, heads, key_dim = q.shape
  value_dim = v.shape[-1]
  if num_tokens == 0:
    raise ValueError("gated_delta_rule: the sequence is empty (T == 0); need T >= 1.")
  _check_shape("k", k.shape, q.shape)
  _check_shape("v", v.shape, (batch, num_tokens, heads, value_dim))
  _check_shape("g", g.shape, (batch, num_tokens, heads))
  _check_shape("beta", beta.shape, (batch, num_tokens, heads))
  if initial_state is not None:
    _check_shape("initial_state", initial_state.shape, (batch, heads, key_dim, value_dim))


def gated_delta_rule(
  q,
  k,
  v,
  g,
  beta,
  *,
  scale=None,
  initial_state=None,
  impl="auto",
  chunk_size=64,
  batch_axes=None,
  head_axes=None,
):
  """Gated delta rule over a sequence, from an optional initial fast-weight state.

  Per head, with state S [K,V] float32 and for each token t:
      S <- S * exp(g_t); u_t = beta_t (v_t - S^T k_t); S <- S + k_t u_t^T; o_t = S^T (scale q_t).

  Shape legend: B batch, T tokens (any T >= 1), H heads, K key/query width, V value width.

  Args:
    q: queries [B,T,H,K]. Normalising q and k is the caller's job.
    k: keys [B,T,H,K].
    v: values [B,T,H,V].
    g: log decay [B,T,H], <= 0.
    beta: delta-rule step size [B,T,H], in (0, 1).
    scale: multiplies q; defaults to K**-0.5.
    initial_state: [B,H,K,V] float32, or None for zeros.
    impl: "reference" (per-token scan), "chunked" (WY form in XLA with a memory-lean
      custom VJP), "pallas" (fused kernels: Triton on GPUs, Mosaic on TPUs, the GPU kernel
      interpreted elsewhere), "pallas_staged" (GPUs: the chunks' parallel work in XLA and
      a thin Triton kernel for the state hand-off, see pallas_gpu_staged.py; interpreted
      elsewhere), or "auto" (on GPUs pallas for one chunk, pallas_staged for more; pallas
      on TPUs; chunked elsewhere: `resolve_impl`).
      Static.
      The platform is the one being lowered for, not the host's default backend.
    chunk_size: tokens per chunk for the chunked form. Static under jit.
    batch_axes, head_axes: under a mesh (`with jax.set_mesh(mesh)`), the mesh axes the batch
      and head dimensions are split over; each device then runs the op on its own block, with
      no collective (sleep_jax.ops.partition). None: the inputs' Explicit sharding, else the
      project's convention (heads over "tensor", the batch over the other axes).

  Returns:
    (o, final_state): o [B,T,H,V] in v's dtype and final_state [B,H,K,V] float32.
    Differentiable in q, k, v, g, beta and initial_state.

  Raises:
    ValueError: inconsistent shapes, T == 0, unknown impl or bad chunk_size.
  """
  _validate(q, k, v, g, beta, initial_state, impl, chunk_size)
  scale, initial_state = fill_defaults(q, v, scale, initial_state)
  run = functools.partial(_IMPLEMENTATIONS[impl], scale=float(scale), chunk_size=chunk_size)
  batch_axes, head_axes = partition.batch_and_head_axes(
    q, batch_axes=batch_axes, head_axes=head_axes
  )
  run = partition.shard_over_batch_and_heads(
    run,
    in_layouts=("bthk", "bthk", "bthv", "bth", "bth", "bhkv"),
    out_layouts=("bthv", "bhkv"),
    batch_axes=batch_axes,
    head_axes=head_axes,
  )
  with jax.named_scope(f"gated_delta_rule_{impl}"):
    return run(q, k, v, g, beta, initial_state)
