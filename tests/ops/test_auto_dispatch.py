"""What `impl="auto"` lowers to on each platform, read from modules exported for that platform
(no accelerator needed: `jax.export` runs Pallas' Triton and Mosaic lowerings on any host)."""

import functools

import jax
import jax.numpy as jnp
import pytest

from sleep_jax.ops import gated_delta_rule
from sleep_jax.ops.gated_delta.api import resolve_impl

_ALLOW_TRITON = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]


def _exported_module(platform, num_tokens, chunk_size):
  spec = jax.ShapeDtypeStruct
  inputs = [spec((2, num_tokens, 2, 16), jnp.float32)] * 3 + [
    spec((2, num_tokens, 2), jnp.float32)
  ] * 2
  rule = functools.partial(gated_delta_rule, impl="auto", chunk_size=chunk_size)
  # The value too: the one-chunk backward needs no forward residual, so a bare gradient drops
  # the forward kernel.
  step = jax.value_and_grad(lambda *a: rule(*a)[0].sum(), argnums=range(5))
  exported = jax.export.export(jax.jit(step), platforms=[platform], disabled_checks=_ALLOW_TRITON)
  return exported(*inputs).mlir_module()


@pytest.mark.parametrize(
  "num_tokens, chunk_size, present, absent",
  [
    # One chunk (a sleep pass over a 24-token window): the one-chunk kernels, one program per
    # head (one launch forward, three backward).
    (
      24,
      64,
      ["gated_delta_chunk_forward", "gated_delta_chunk_backward_values"],
      ["gated_delta_state_walk"],
    ),
    # Several chunks: the staged form's walk kernels.
    (
      70,
      16,
      ["gated_delta_state_walk", "gated_delta_state_walk_backward"],
      ["gated_delta_forward"],
    ),
  ],
)
def test_auto_on_gpus_is_fused_for_one_chunk_and_staged_for_more(
  num_tokens, chunk_size, present, absent
):
  module = _exported_module("cuda", num_tokens, chunk_size)
  assert all(name in module for name in present) and not any(name in module for name in absent)
  expected = "pallas" if "gated_delta_chunk_forward" in present else "pallas_staged"
  assert resolve_impl("auto", "cuda", num_tokens=num_tokens, chunk_size=chunk_size) == expected


def test_auto_resolves_by_platform():
  assert resolve_impl("auto", "cpu") == "chunked"
  assert resolve_impl("auto", "tpu", num_tokens=24) == "pallas"
  assert resolve_impl("auto", "cuda") == "pallas_staged"  # the shape unknown: many chunks
  assert resolve_impl("chunked", "cuda", num_tokens=24) == "chunked"
