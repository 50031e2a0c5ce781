"""`causal_attention`: causal softmax attention within one call, validated and dispatched by `impl=`.

Shapes: B batch, T tokens, H query heads, G key/value heads (H a multiple of G), D head width.
"""

from __future__ import annotations

import functools

import jax

from sleep_jax.ops import partition
from sleep_jax.ops.attention.pallas_gpu import (
  MAX_TOKENS,
  causal_attention_pallas_gpu,
  padded_tokens,
)
from sleep_jax.ops.attention.reference import causal_attention_reference

IMPLS = ("xla", "reference", "pallas", "auto")


def _xla(q, k, v, *, scale):
  return jax.nn.dot_product_attention(q, k, v.astype(q.dtype), scale=scale, is_causal=True)


def fits_one_program(num_tokens: int, head_dim: int, dtype) -> bool:
  """Whether the fused kernel takes a call: D a power of two of at least 16 (a Triton tile) and
  one head's [T, D] tiles within 16 KiB (the largest that ptxas fits in registers without a
  spill, forward and backward, on sm_90a: tests/gpu_compile)."""
  rows = padded_tokens(num_tokens)
  tile_bytes = rows * head_dim * jax.numpy.dtype(dtype).itemsize
  power_of_two = head_dim & (head_dim - 1) == 0
  return num_tokens <= MAX_TOKENS and head_dim >= 16 and power_of_two and tile_bytes <= 16 * 1024


def _gpu_auto(q, k, v, *, scale):
  if fits_one_program(q.shape[1], q.shape[3], q.dtype):
    return causal_attention_pallas_gpu(q, k, v, scale=scale)
  return _xla(q, k, v, scale=scale)


def _by_platform(default, **per_platform):
  """Picks the branch by the platform being lowered for (see gated_delta.api._by_platform)."""

  def run(q, k, v, *, scale):
    bind = lambda impl: functools.partial(impl, scale=scale)
    return jax.lax.platform_dependent(
      q, k, v, default=bind(default), **{name: bind(impl) for name, impl in per_platform.items()}
    )

  return run


_IMPLEMENTATIONS = {
  "xla": _xla,
  "reference": causal_attention_reference,
  "pallas": _by_platform(
    functools.partial(causal_attention_pallas_gpu, interpret=True),
    cuda=causal_attention_pallas_gpu,
  ),
  "auto": _by_platform(_xla, cuda=_gpu_auto),
}


def resolve_impl(impl: str, platform: str) -> str:
  """The implementation `impl` names for `platform`: "auto" is XLA off CUDA GPUs (on them, the
  fused kernel for windows of up to MAX_TOKENS tokens)."""
  if impl != "auto":
    return impl
  return "auto" if platform in ("cuda", "gpu") else "xla"


def _validate(q, k, v, impl):
  if impl not in _IMPLEMENTATIONS:
    raise ValueError(f"causal_attention: unknown impl {impl!r}; expected one of {IMPLS}.")
  for name, x in (("q", q), ("k", k), ("v", v)):
    if x.ndim != 4:
      raise ValueError(f"causal_attention: {name} must be [B,T,H,D], got shape {x.shape}.")
  if k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
    raise ValueError(
      f"causal_attention: q {q.shape}, k {k.shape}, v {v.shape}: expected q [B,T,H,D] and "
      "k, v [B,T,G,D]."
    )
  if q.shape[2] % k.shape[2]:
    raise ValueError(
      f"causal_attention: {q.shape[2]} query heads are not a multiple of {k.shape[2]} key heads."
    )
  if impl == "pallas" and not fits_one_program(q.shape[1], q.shape[3], q.dtype):
    raise ValueError(
      f'causal_attention: impl="pallas" takes windows of at most {MAX_TOKENS} tokens, a '
      "power-of-two head width of at least 16 and [T, D] tiles of at most 16 KiB; got "
      f'T={q.shape[1]}, D={q.shape[3]}, {q.dtype}. Use impl="auto" (XLA for the rest).'
    )


def causal_attention(q, k, v, *, scale=None, impl="auto", batch_axes=None, head_axes=None):
  """softmax(scale q k^T) v where every query sees the keys at or before its position.

  Args:
    q: queries [B,T,H,D].
    k, v: keys and values [B,T,G,D]; H a multiple of G (grouped-query attention).
    scale: multiplies the scores; defaults to D**-0.5.
    impl: "xla" (`jax.nn.dot_product_attention`), "reference" (explicit float32 einsums),
      "pallas" (the fused Triton kernels: T <= MAX_TOKENS; interpreted off a GPU), or "auto"
      (on CUDA GPUs "pallas" where it fits, else "xla"). Chosen for the platform being lowered
      for, not the host's default backend.
    batch_axes, head_axes: under a mesh, the mesh axes the batch and (key) head dimensions are
      split over; each device attends over its own block, with no collective. None: the split
      in context, the inputs' Explicit sharding, else the project's convention
      (sleep_jax.ops.partition).

  Returns:
    [B,T,H,D] in q's dtype. Differentiable in q, k and v.
  """
  _validate(q, k, v, impl)
  scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
  attend = functools.partial(_IMPLEMENTATIONS[impl], scale=scale)
  run = lambda q, k, v: (attend(q, k, v),)  # one output, as a tuple for the sharding wrapper
  # Under a mesh each device attends over its own examples and heads (k's heads: a split of the
  # key heads splits the query heads with them).
  batch_axes, head_axes = partition.batch_and_head_axes(
    k, batch_axes=batch_axes, head_axes=head_axes
  )
  run = partition.shard_over_batch_and_heads(
    run,
    in_layouts=("bthd", "bthd", "bthd"),
    out_layouts=("bthd",),
    batch_axes=batch_axes,
    head_axes=head_axes,
  )
  with jax.named_scope(f"causal_attention_{impl}"):
    return run(q, k, v)[0]


__all__ = ["causal_attention", "fits_one_program", "padded_tokens", "resolve_impl"]
