"""Layers and the hybrid stack: shapes, causality, parameter groups, config errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import rule110 as rule110_config
from sleep_jax import build_model
from sleep_jax.data import rule110
from sleep_jax.model.config import ModelConfig
from sleep_jax.model.layers import (
  CausalDepthwiseConv,
  Dense,
  RMSNorm,
  causal_depthwise_conv,
  convolve_together,
  l2_normalize,
  project_together,
  rotary,
)
from sleep_jax.model.lm import zero_fast_state
from sleep_jax.sleep.config import SleepConfig
from sleep_jax.train.optim import make_optimizer, optimizer_labels
from sleep_jax.train.step import TrainState, train_step

# "chunked" is what "auto" lowers to on a CPU; named, tracing skips the GPU and TPU kernels too.
CFG = dict(vocab_size=6, pattern="AGAG", d_model=16, num_heads=2, head_dim=8, mlp_dim=32)
CFG |= dict(fast_weight_impl="chunked")


def test_rotary_preserves_norms_and_depends_only_on_relative_position():
  x = jax.random.normal(jax.random.key(0), (1, 5, 2, 8))
  y = jax.random.normal(jax.random.key(1), (1, 5, 2, 8))
  rx, ry = rotary(x, jnp.arange(5), 100.0), rotary(y, jnp.arange(5), 100.0)
  np.testing.assert_allclose(jnp.linalg.norm(rx, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)
  shifted_x, shifted_y = rotary(x, jnp.arange(5) + 7, 100.0), rotary(y, jnp.arange(5) + 7, 100.0)
  dots = jnp.einsum("bthd,bshd->bhts", rx, ry)
  np.testing.assert_allclose(jnp.einsum("bthd,bshd->bhts", shifted_x, shifted_y), dots, atol=1e-4)


def test_causal_conv_output_at_t_ignores_inputs_after_t():
  conv = CausalDepthwiseConv(3, 4, logical_axis="heads", rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (2, 9, 3))
  jac = jax.jacobian(lambda x: conv(x)[0][0, 4])(x)  # [3, 2, 9, 3]
  assert float(jnp.abs(jac[:, :, 5:]).max()) == 0.0
  # Tap j looks j steps back: compare with an explicit loop.
  w = np.asarray(conv.weight[...])
  xs = np.asarray(x)
  expected = sum(w[j] * xs[:, 4 - j] for j in range(4))
  np.testing.assert_allclose(conv(x)[0][:, 4], expected, rtol=1e-5)


def test_causal_conv_tail_continues_the_sequence_across_calls():
  """Convolving a sequence in two calls, handing the tail over, equals one call; no tail is zeros."""
  conv = CausalDepthwiseConv(3, 4, logical_axis="heads", rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 9, 3))
  whole, whole_tail = conv(x)
  for cut in (1, 2, 5):  # shorter and longer than the tail (width - 1 = 3)
    first, tail = conv(x[:, :cut])
    second, second_tail = conv(x[:, cut:], tail)
    np.testing.assert_allclose(jnp.concatenate([first, second], 1), whole, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(second_tail, whole_tail)
  np.testing.assert_array_equal(whole_tail, x[:, -3:])
  np.testing.assert_array_equal(conv(x, jnp.zeros((2, 3, 3)))[0], whole)


def test_causal_conv_written_backward_equals_autodiff_of_a_plain_loop():
  """The conv's own VJP against autodiff of an explicit loop, on stacked [n, C] channels."""
  padded = jax.random.normal(jax.random.key(2), (2, 9 + 3, 3, 5))
  weight = jax.random.normal(jax.random.key(3), (4, 3, 5))
  cotangent = jax.random.normal(jax.random.key(4), (2, 9, 3, 5))

  def plain(padded, weight):
    return jnp.stack([sum(weight[j] * padded[:, 3 + t - j] for j in range(4)) for t in range(9)], 1)

  fast_out, fast_vjp = jax.vjp(causal_depthwise_conv, padded, weight)
  plain_out, plain_vjp = jax.vjp(plain, padded, weight)
  np.testing.assert_allclose(fast_out, plain_out, rtol=1e-6, atol=1e-6)
  for fast, slow in zip(fast_vjp(cotangent), plain_vjp(cotangent)):
    np.testing.assert_allclose(fast, slow, rtol=1e-5, atol=1e-5)
  # bfloat16 activations: the filter gradient comes back in the weight's dtype.
  bf16 = jax.vjp(causal_depthwise_conv, padded.astype(jnp.bfloat16), weight.astype(jnp.bfloat16))
  d_padded, d_weight = bf16[1](cotangent.astype(jnp.bfloat16))
  assert d_padded.dtype == d_weight.dtype == jnp.bfloat16
  np.testing.assert_allclose(
    d_weight.astype(jnp.float32), plain_vjp(cotangent)[1], rtol=0.05, atol=0.1
  )


def test_projections_together_equal_the_layers_one_by_one_in_values_and_gradients():
  # Widths 6, 6, 4, 6, 4 with a bias: three matmuls of the same width, two of another.
  rngs = nnx.Rngs(0)
  dense = lambda width, axes=("embed", "heads"), bias=False: Dense(
    5, width, logical_axes=axes, optimizer="muon", rngs=rngs, use_bias=bias
  )
  layers = [dense(6), dense(6, bias=True), dense(4), dense(6), dense(4, ("embed", "mlp"))]
  for layer in layers[1:2]:
    layer.bias[...] = jax.random.normal(jax.random.key(1), (6,))
  x = jax.random.normal(jax.random.key(2), (2, 3, 5))
  graphdef, params = nnx.split(layers)

  def together(params, x):
    return project_together(x, *nnx.merge(graphdef, params))

  def one_by_one(params, x):
    return tuple(layer(x) for layer in nnx.merge(graphdef, params))

  fast, fast_vjp = jax.vjp(together, params, x)
  slow, slow_vjp = jax.vjp(one_by_one, params, x)
  assert [y.shape for y in fast] == [(2, 3, 6), (2, 3, 6), (2, 3, 4), (2, 3, 6), (2, 3, 4)]
  np.testing.assert_allclose(jnp.concatenate(fast, -1), jnp.concatenate(slow, -1), rtol=1e-6)
  cotangents = tuple(jax.random.normal(jax.random.key(3 + i), y.shape) for i, y in enumerate(slow))
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  jax.tree.map(close, fast_vjp(cotangents), slow_vjp(cotangents))
  # Only same-width layers with the same logical axes share a matmul: 6, 6, 6 | 4 | 4.
  dots = str(jax.make_jaxpr(together)(params, x)).count("dot_general")
  assert dots == 3


def test_convolutions_together_equal_them_one_by_one_with_and_without_tails():
  rngs = nnx.Rngs(0)
  convs = [CausalDepthwiseConv(c, 4, logical_axis="heads", rngs=rngs) for c in (3, 5, 3)]
  xs = [jax.random.normal(jax.random.key(i), (2, 7, c)) for i, c in enumerate((3, 5, 3))]
  tails = [jax.random.normal(jax.random.key(9 + i), (2, 3, c)) for i, c in enumerate((3, 5, 3))]
  graphdef, params = nnx.split(convs)
  for given_tails in (None, tails):
    together = lambda params, xs, tails=given_tails: convolve_together(
      xs, nnx.merge(graphdef, params), tails
    )

    def one_by_one(params, xs, tails=given_tails):
      convs = nnx.merge(graphdef, params)
      return [conv(x, tails and tails[i]) for i, (conv, x) in enumerate(zip(convs, xs))]

    fast, fast_vjp = jax.vjp(together, params, xs)
    slow, slow_vjp = jax.vjp(one_by_one, params, xs)
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    jax.tree.map(close, fast, slow)
    cotangents = jax.tree.map(lambda y: jax.random.normal(jax.random.key(7), y.shape), slow)
    jax.tree.map(close, fast_vjp(cotangents), slow_vjp(cotangents))


def test_norms():
  x = 3.0 * jax.random.normal(jax.random.key(0), (4, 16))
  np.testing.assert_allclose(jnp.mean(RMSNorm(16)(x) ** 2, axis=-1), 1.0, rtol=1e-4)
  np.testing.assert_allclose(jnp.linalg.norm(l2_normalize(x), axis=-1), 1.0, rtol=1e-5)


def test_stack_pass_is_causal_by_gradient():
  model = build_model(CFG, seed=0)
  tokens = jnp.arange(10).reshape(1, 10) % 6
  h = model.embed(tokens)
  state = zero_fast_state(model.cfg, 1)
  jac = jax.jit(jax.jacobian(lambda h: model.stack_pass(h, state)[0][0, 6]))(h)  # [D, 1, T, D]
  assert float(jnp.abs(jac[:, :, 7:]).max()) == 0.0
  assert float(jnp.abs(jac[:, :, :7]).max()) > 0.0


def test_fast_state_has_one_matrix_per_gated_delta_block_and_is_updated():
  model = build_model(CFG | dict(pattern="AGGA"), seed=0)
  state = zero_fast_state(model.cfg, 3)
  assert [s.shape for s in state] == [(3, 2, 8, 8)] * 2
  _, new_state = jax.jit(model.stack_pass)(model.embed(jnp.ones((3, 5), jnp.int32)), state)
  assert all(s.dtype == jnp.float32 and float(jnp.abs(s).max()) > 0 for s in new_state)


def test_muon_takes_hidden_matrices_and_adamw_the_rest():
  labels = optimizer_labels(nnx.state(build_model(CFG, seed=0)))
  flat = {
    "/".join(map(str, path)): leaf
    for path, leaf in jax.tree_util.tree_flatten_with_path(labels)[0]
    for path in [tuple(k.key for k in path)]
  }
  assert flat["embedding"] == "adamw" and flat["head/kernel"] == "adamw"
  assert flat["blocks/0/mixer/q/kernel"] == "muon" and flat["blocks/0/mlp/down/kernel"] == "muon"
  assert flat["blocks/1/mixer/o/kernel"] == "muon"
  assert flat["blocks/1/mixer/out_gate/kernel"] == "muon"
  for name in (
    "decay_proj/kernel",
    "beta_proj/kernel",
    "A_log",
    "dt_bias",
    "conv_q/weight",
    "out_norm/scale",
  ):
    assert flat[f"blocks/1/mixer/{name}"] == "adamw", name
  assert flat["blocks/0/mixer_norm/scale"] == "adamw"


def test_same_seed_same_parameters():
  a = nnx.to_pure_dict(nnx.state(build_model(CFG, seed=3)))
  b = nnx.to_pure_dict(nnx.state(build_model(CFG, seed=3)))
  jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.parametrize(
  "overrides, message",
  [
    (dict(pattern="AGXG"), "unknown"),
    (dict(pattern=""), "pattern"),
    (dict(head_dim=7), "even"),
    (dict(d_model=0), "d_model"),
    (dict(fast_weight_impl="cuda"), "fast_weight_impl"),
    (dict(dropout=0.1), "unknown model config fields"),
  ],
)
def test_bad_model_config_is_a_clear_error(overrides, message):
  with pytest.raises(ValueError, match=message):
    ModelConfig.from_config(CFG | overrides)


def train_tiny(fast_weight_impl="chunked", num_batches=3, **train_overrides):
  """Losses, initial and final parameters of a few steps of `train_step` on Rule 110 batches."""
  config = rule110_config.get_config("tiny")
  config.train.update(train_overrides)
  sleep_cfg = SleepConfig.from_config(config.sleep)
  batches = [rule110.generate(np.random.default_rng(i), 8, 1) for i in range(num_batches)]
  model = build_model(CFG | dict(fast_weight_impl=fast_weight_impl), seed=0)
  graphdef, state = nnx.split(model)
  initial = nnx.to_pure_dict(state)
  optimizer = make_optimizer(config.train, optimizer_labels(state))
  step = jax.jit(
    lambda s, b: train_step(s, b, graphdef=graphdef, sleep_cfg=sleep_cfg, optimizer=optimizer)
  )
  train_state = TrainState(
    step=jnp.zeros((), jnp.int32), params=initial, opt_state=optimizer.init(initial)
  )
  losses = []
  for batch in batches:
    train_state, metrics = step(train_state, batch)
    losses.append(float(metrics["loss"]))
  return losses, initial, train_state.params


@pytest.mark.integration  # two optimizer programs over the whole model
@pytest.mark.parametrize("impl", ["chunked", pytest.param("pallas", marks=pytest.mark.slow)])
def test_a_few_training_steps_match_the_reference_fast_weight_impl(impl):
  # Same seed, data and optimizer; only `model.fast_weight_impl` differs. "pallas" interprets the
  # GPU kernel on the CPU.
  losses, _, params = train_tiny(impl)
  expected_losses, _, expected_params = train_tiny("reference")
  np.testing.assert_allclose(losses, expected_losses, rtol=1e-5)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5), params, expected_params
  )


@pytest.mark.integration  # two optimizer programs over the whole model
def test_training_moves_every_parameter_and_a_zero_learning_rate_moves_none():
  # The tiny schedule warms up from 0 over one step, so the second step is the first that moves.
  _, initial, params = train_tiny(num_batches=2)
  for (path, before), after in zip(
    jax.tree_util.tree_flatten_with_path(initial)[0], jax.tree.leaves(params)
  ):
    # Stacked block parameters: every repetition (leading axis) moves on its own.
    slices = range(before.shape[0]) if path[0].key == "blocks" else [Ellipsis]
    for r in slices:
      assert not np.array_equal(before[r], after[r]), (jax.tree_util.keystr(path), r)
  # Both optimizer groups at learning rate 0: a bitwise no-op (a NaN update would show here).
  _, initial, params = train_tiny(num_batches=2, muon_lr=0.0, adamw_lr=0.0)
  jax.tree.map(np.testing.assert_array_equal, params, initial)
