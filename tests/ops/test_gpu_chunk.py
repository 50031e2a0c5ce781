"""The one-chunk GPU kernels (sleep_jax/ops/gated_delta/pallas_gpu_chunk.py) in the Pallas
interpreter on the CPU: the values and all six gradients equal the reference recurrence's, from
an initial state, for chunks of 1 to 64 tokens (the rows past T of the 64-row tiles masked);
bfloat16 inputs stay close to float32; shapes that one program does not take raise.

That every kernel of the path fits Hopper's registers without a spill is checked where ptxas
runs: tests/gpu_compile/test_chunk_kernel.py.
"""

import jax
import jax.numpy as jnp
import pytest

from sleep_jax.ops.gated_delta.pallas_gpu_chunk import fits, gated_delta_rule_pallas_gpu_chunk
from sleep_jax.ops.gated_delta.reference import gated_delta_rule_reference
from tests.ops.test_gated_delta import INPUT_NAMES, assert_close, make_inputs, random_cotangents


def _chunk_rule(q, k, v, g, beta, initial_state):
  return gated_delta_rule_pallas_gpu_chunk(
    q, k, v, g, beta, initial_state=initial_state, interpret=True
  )


def _reference_rule(q, k, v, g, beta, initial_state):
  return gated_delta_rule_reference(q, k, v, g, beta, initial_state=initial_state)


def _values_and_grads(rule, inputs, cotangents):
  """((o, final state), gradients of <o, d_o> + <final, d_final> in INPUT_NAMES' order)."""
  d_out, d_final = cotangents
  args = tuple(inputs[name] for name in INPUT_NAMES)

  def loss(*args):
    out, final = rule(*args)
    return jnp.sum(out.astype(jnp.float32) * d_out) + jnp.sum(final * d_final)

  return jax.jit(rule)(*args), jax.jit(jax.grad(loss, argnums=range(6)))(*args)


@pytest.mark.parametrize("key_dim, value_dim", [(16, 16), (16, 32)], ids=["K=V=16", "K=16,V=32"])
@pytest.mark.parametrize("tokens", [1, 5, 24, 64])
def test_values_and_gradients_match_the_reference(tokens, key_dim, value_dim):
  inputs = make_inputs(
    tokens, batch=2, tokens=tokens, heads=2, key_dim=key_dim, value_dim=value_dim
  )
  cotangents = random_cotangents(inputs)
  (out, final), grads = _values_and_grads(_chunk_rule, inputs, cotangents)
  (ref_out, ref_final), ref_grads = _values_and_grads(_reference_rule, inputs, cotangents)
  assert_close(out, ref_out, 1e-5, "o")
  assert_close(final, ref_final, 1e-5, "final state")
  for name, grad, ref_grad in zip(INPUT_NAMES, grads, ref_grads, strict=True):
    assert grad.shape == inputs[name].shape, name
    assert_close(grad, ref_grad, 1e-5, f"d{name}")


def test_bfloat16_inputs_stay_close_to_float32():
  inputs = make_inputs(7, batch=1, tokens=24, heads=2, key_dim=16, value_dim=32)
  low = {
    name: x.astype(jnp.bfloat16) if name in ("q", "k", "v") else x for name, x in inputs.items()
  }
  # The same numbers in both: the float32 run reads the bfloat16-rounded inputs.
  high = {name: x.astype(jnp.float32) for name, x in low.items()}
  cotangents = random_cotangents(inputs)
  (out, final), grads = _values_and_grads(_chunk_rule, low, cotangents)
  (out32, final32), grads32 = _values_and_grads(_chunk_rule, high, cotangents)
  assert out.dtype == jnp.bfloat16 and final.dtype == jnp.float32
  assert_close(out, out32, 1e-2, "o")
  assert_close(final, final32, 1e-2, "final state")
  for name, grad, grad32 in zip(INPUT_NAMES, grads, grads32, strict=True):
    assert grad.dtype == low[name].dtype, name
    assert_close(grad, grad32, 1e-2, f"d{name}")


@pytest.mark.parametrize(
  "tokens, key_dim, value_dim",
  [(65, 16, 16), (128, 16, 16), (8, 8, 16), (8, 16, 128), (8, 48, 16), (8, 16, 24)],
  ids=["T=65", "T=128", "K=8", "V=128", "K=48", "V=24"],
)
def test_shapes_that_one_program_does_not_take_raise(tokens, key_dim, value_dim):
  assert not fits(tokens, key_dim, value_dim)
  inputs = make_inputs(0, tokens=tokens, key_dim=key_dim, value_dim=value_dim)
  with pytest.raises(ValueError, match="one program takes"):
    _chunk_rule(*(inputs[name] for name in INPUT_NAMES))


@pytest.mark.parametrize("tokens", [1, 24, 32, 64])
@pytest.mark.parametrize("width", [16, 32, 64])
def test_every_chunk_up_to_64_tokens_and_width_up_to_64_fits(tokens, width):
  assert fits(tokens, width, width) and fits(tokens, 16, width) and fits(tokens, width, 16)


# Triton kernels are compiled for one GPU: the exported module is not meant to be portable.
_ALLOW_TRITON = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_the_kernels_lower_for_gpus_one_launch_forward_and_three_backward(dtype):
  """Pallas' Triton lowering (run by `jax.export` on any host) takes every kernel of the path,
  at the paper's shape but two batch rows."""
  spec = jax.ShapeDtypeStruct
  batch, tokens, heads, width = 2, 24, 4, 64
  args = (
    [spec((batch, tokens, heads, width), dtype)] * 3
    + [spec((batch, tokens, heads), jnp.float32)] * 2
    + [spec((batch, heads, width, width), jnp.float32)]
  )

  def loss(q, k, v, g, beta, state):
    out, final = gated_delta_rule_pallas_gpu_chunk(q, k, v, g, beta, initial_state=state)
    return jnp.sum(out.astype(jnp.float32)) + jnp.sum(final)

  grad = jax.jit(jax.value_and_grad(loss, argnums=range(6)))
  exported = jax.export.export(grad, platforms=["cuda"], disabled_checks=_ALLOW_TRITON)
  module = exported(*args).mlir_module()
  assert module.count("__gpu$xla.gpu.triton") == 4
  for name in ("forward", "backward_values", "backward_output_keys", "backward_state_keys"):
    assert f"gated_delta_chunk_{name}" in module, name
