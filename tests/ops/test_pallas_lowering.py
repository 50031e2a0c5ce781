"""The Pallas kernels lower for their real targets, and (on a GPU or TPU) run there correctly.

No accelerator is needed to check the lowering: `jax.export` for the "cuda" and "tpu" platforms
runs Pallas' Triton and Mosaic lowerings on any host, which rejects primitives, block shapes and
layouts those backends do not support. What it cannot check (register pressure, Mosaic's own
compilation, speed) needs the hardware: the `gpu` and `tpu` tests below.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sleep_jax.ops import gated_delta_rule
from sleep_jax.ops.gated_delta.pallas_gpu import gated_delta_rule_pallas_gpu
from sleep_jax.ops.gated_delta.pallas_tpu import gated_delta_rule_pallas_tpu

# Triton kernels are compiled for one GPU: the exported module is not meant to be portable.
_ALLOW_TRITON = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]


def _forward_and_backward(rule):
  def run(q, k, v, g, beta, initial_state):
    outputs, vjp = jax.vjp(
      lambda *args: rule(*args[:5], initial_state=args[5]), q, k, v, g, beta, initial_state
    )
    return outputs, vjp(outputs)

  return run


def _abstract_inputs(batch, tokens, heads, key_dim, value_dim, dtype):
  spec = jax.ShapeDtypeStruct
  return (
    spec((batch, tokens, heads, key_dim), dtype),
    spec((batch, tokens, heads, key_dim), dtype),
    spec((batch, tokens, heads, value_dim), dtype),
    spec((batch, tokens, heads), jnp.float32),
    spec((batch, tokens, heads), jnp.float32),
    spec((batch, heads, key_dim, value_dim), jnp.float32),
  )


# The benchmark's GPU shape (K = V = 128, bf16) at a T that is not a multiple of the chunk, and
# a small float32 shape whose K and V need padding.
SHAPES = {
  "bf16 K=V=128 T=200": (2, 200, 2, 128, 128, jnp.bfloat16),
  "f32 K=8 V=24 T=37": (1, 37, 3, 8, 24, jnp.float32),
}


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize(
  "platform,rule,custom_call",
  [
    ("cuda", gated_delta_rule_pallas_gpu, "__gpu$xla.gpu.triton"),
    ("tpu", gated_delta_rule_pallas_tpu, "tpu_custom_call"),
  ],
)
def test_forward_and_backward_kernels_lower_for_their_platform(platform, rule, custom_call, shape):
  exported = jax.export.export(
    jax.jit(_forward_and_backward(rule)), platforms=[platform], disabled_checks=_ALLOW_TRITON
  )(*_abstract_inputs(*SHAPES[shape]))
  module = exported.mlir_module()
  assert module.count(custom_call) >= 2, "expected a forward and a backward kernel"


def _random_inputs(batch, tokens, heads, key_dim, value_dim, dtype):
  rng = np.random.default_rng(0)
  k = rng.normal(size=(batch, tokens, heads, key_dim))
  k /= np.linalg.norm(k, axis=-1, keepdims=True)
  return (
    jnp.asarray(rng.normal(size=(batch, tokens, heads, key_dim)), dtype),
    jnp.asarray(k, dtype),
    jnp.asarray(rng.normal(size=(batch, tokens, heads, value_dim)), dtype),
    jnp.asarray(-rng.uniform(0.01, 1.0, size=(batch, tokens, heads)), jnp.float32),
    jnp.asarray(rng.uniform(0.05, 0.95, size=(batch, tokens, heads)), jnp.float32),
    jnp.asarray(rng.normal(size=(batch, heads, key_dim, value_dim)), jnp.float32),
  )


def _check_on_device(platform):
  if jax.default_backend() != platform:
    pytest.skip(f"needs a {platform.upper()}")
  inputs = _random_inputs(2, 1000, 4, 128, 128, jnp.float32)
  fused = jax.jit(_forward_and_backward(functools.partial(gated_delta_rule, impl="pallas")))
  chunked = jax.jit(_forward_and_backward(functools.partial(gated_delta_rule, impl="chunked")))
  for got, want in zip(jax.tree.leaves(fused(*inputs)), jax.tree.leaves(chunked(*inputs))):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert np.abs(got - want).max() <= 1e-3 * np.abs(want).max()


@pytest.mark.gpu
def test_gpu_kernels_match_the_chunked_form_on_a_gpu():
  _check_on_device("gpu")


@pytest.mark.tpu
def test_tpu_kernels_match_the_chunked_form_on_a_tpu():
  _check_on_device("tpu")
