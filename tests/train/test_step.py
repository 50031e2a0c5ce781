"""The train step's numbers: its loss and accuracies, bfloat16 compute, truncated backprop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sleep_jax
from configs import rule110 as rule110_configs
from sleep_jax.data import tasks
from sleep_jax.sleep.consolidate import sleep_forward
from sleep_jax.train import program as program_lib
from sleep_jax.train.metrics import mean_loss
from sleep_jax.train.step import prediction_chunk_sums

BATCH_SIZE = 16


def tiny_config(dtype="float32", passes=1, grad_passes=None):
  config = rule110_configs.get_config("tiny")
  config.model.dtype = dtype
  config.sleep.passes, config.sleep.grad_passes = passes, grad_passes
  return config


def fixed_batch(config):
  return tasks.get_task(config.task).generate(np.random.default_rng(0), BATCH_SIZE)


@pytest.fixture(scope="module")
def model():
  """The public model of the tiny config (the same seed as the train state)."""
  config = tiny_config()
  return sleep_jax.build_model(config.model, seed=config.seed)


@pytest.fixture(scope="module")
def batch_and_logits(model):
  """The fixed batch with some labels and loss positions changed, and the model's logits.

  An untrained model gets no label right (it prefers query tokens), so the accuracies would be
  0 == 0, and Rule 110's mask covers the whole prediction chunk. So: examples 0..5 take the
  model's predictions as their four labels (all right), examples 6..9 two of them (half
  right); examples 10..13 carry loss on their first two labels only, and example 15 on none.
  """
  config = tiny_config()
  batch = fixed_batch(config)
  logits = np.asarray(sleep_jax.apply(model, batch["tokens"], sleep_config=config.sleep))
  predicted, mask = logits.argmax(axis=-1), batch["loss_mask"]
  first_two = (mask > 0) & (np.cumsum(mask, axis=1) <= 2)
  targets = batch["targets"].copy()
  targets[:6] = np.where(mask[:6] > 0, predicted[:6], targets[:6])
  targets[6:10] = np.where(first_two[6:10], predicted[6:10], targets[6:10])
  mask = mask.copy()
  mask[10:14] = first_two[10:14]
  mask[15] = 0
  return {**batch, "targets": targets, "loss_mask": mask}, logits


def run_steps(config, batch, num_steps):
  """(initial params, per-step metrics, final state) of `num_steps` train steps on `batch`."""
  program = program_lib.build_program(config, jax.devices()[:1])
  state = program.init_state()
  initial = jax.device_get(state.params)  # copied out: the step donates the state
  metrics = []
  for _ in range(num_steps):
    state, step_metrics = program.train_step(state, batch)
    metrics.append(jax.device_get(step_metrics))
  return program, initial, metrics, state


@pytest.fixture(scope="module")
def float32_run(batch_and_logits):
  return run_steps(tiny_config(), batch_and_logits[0], num_steps=1)


def log_softmax(logits):
  logits = logits.astype(np.float64)
  shifted = logits - logits.max(axis=-1, keepdims=True)
  return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))


def test_loss_and_accuracies_are_the_masked_cross_entropy_and_argmax_of_the_logits(
  model, batch_and_logits, float32_run
):
  _, initial, (metrics,), _ = float32_run
  # The public model of the same seed is the train state's starting point.
  jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(model)), initial)

  batch, logits = batch_and_logits
  mask = batch["loss_mask"] > 0
  assert mask.sum() == 4 * 11 + 2 * 4  # loss-carrying tokens
  targets = batch["targets"]
  picked = np.take_along_axis(log_softmax(logits), targets[..., None], axis=-1)[..., 0]
  loss = -picked[mask].mean()
  right = logits.argmax(axis=-1) == targets
  accuracy = right[mask].mean()
  # Over the 15 examples that carry loss.
  exact = np.mean([right[i][mask[i]].all() for i in range(BATCH_SIZE) if mask[i].any()])
  assert 0 < exact < accuracy < 1  # neither check is vacuous, and they differ

  assert metrics["loss"] == pytest.approx(loss, rel=1e-5)
  assert metrics["accuracy"] == pytest.approx(accuracy, rel=1e-6)
  assert metrics["exact_accuracy"] == pytest.approx(exact, rel=1e-6)


@pytest.mark.slow
def test_bfloat16_compute_trains_with_float32_parameters_and_fast_state(
  batch_and_logits, float32_run
):
  batch, _ = batch_and_logits
  _, initial32, (metrics32,), _ = float32_run
  program, initial, metrics, state = run_steps(tiny_config(dtype="bfloat16"), batch, num_steps=3)
  jax.tree.map(np.testing.assert_array_equal, initial, initial32)  # same float32 start
  for step_metrics in metrics:
    assert all(np.isfinite(value) for value in step_metrics.values()), step_metrics
  params = jax.device_get(state.params)
  for leaf in jax.tree.leaves(params):
    assert leaf.dtype == np.float32 and np.all(np.isfinite(leaf))
  assert any(
    not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(initial))
  )

  # The same parameters and batch: bf16 rounds at 2**-8 relative per operation, a few
  # rounding steps' worth on a loss of order 1, but it must not reproduce float32 bit for bit.
  assert metrics[0]["loss"] == pytest.approx(metrics32["loss"], rel=2e-2)
  assert metrics[0]["loss"] != metrics32["loss"]

  # The blocks' matmuls run in bfloat16; the residual stream (features), the fast weights and
  # the logits stay float32.
  tokens = jnp.asarray(batch["tokens"])
  graphdef, sleep_cfg = program.graphdef, program.validated.sleep
  features = jax.eval_shape(lambda p, t: nnx.merge(graphdef, p).embed(t), params, tokens)
  assert features.dtype == jnp.float32
  jaxpr = str(jax.make_jaxpr(lambda p, t: sleep_forward(graphdef, p, t, sleep_cfg))(params, tokens))
  assert "bf16" in jaxpr and "dot_general" in jaxpr
  logits, fast_state = jax.eval_shape(
    lambda p, t: sleep_forward(graphdef, p, t, sleep_cfg), params, tokens
  )
  assert logits.dtype == jnp.float32
  assert len(fast_state) == 2 and all(s.dtype == jnp.float32 for s in fast_state)


def loss_and_grads(config, impl="reference"):
  """The train step's objective and its gradient at the initial parameters."""
  # Where the gradient is cut does not depend on the kernel; the reference scan compiles faster.
  config.model.fast_weight_impl = impl
  program = program_lib.build_program(config, jax.devices()[:1])
  graphdef, sleep_cfg = program.graphdef, program.validated.sleep
  objective = lambda params, batch: mean_loss(
    prediction_chunk_sums(graphdef, params, batch, sleep_cfg)
  )
  params = program.init_state().params
  loss, grads = jax.jit(jax.value_and_grad(objective))(params, fixed_batch(config))
  return float(loss), jax.device_get(grads)


@pytest.mark.slow
def test_grad_passes_truncates_the_gradient_but_not_the_forward_pass():
  loss_all, grads_all = loss_and_grads(tiny_config(passes=2))
  loss_last, grads_last = loss_and_grads(tiny_config(passes=2, grad_passes=1))
  assert loss_last == pytest.approx(loss_all, rel=1e-6)
  # Context tokens are the cells 0 and 1; the prediction chunk holds only the queries (2..5).
  # With the first of two passes frozen, a context token's embedding reaches the loss only
  # through that pass, so its gradient is exactly zero; with every pass it is not.
  tokens, context_len = fixed_batch(tiny_config())["tokens"], tiny_config().sleep.context_len
  assert set(np.unique(tokens[:, :context_len])) == {0, 1}
  assert set(np.unique(tokens[:, context_len:])) == {2, 3, 4, 5}
  context_rows = slice(0, 2)
  assert not np.any(grads_last["embedding"][context_rows])
  assert np.all(np.abs(grads_all["embedding"][context_rows]).sum(axis=-1) > 0)
  for grads in (grads_all, grads_last):  # queries are embedded in the prediction chunk
    assert np.all(np.abs(grads["embedding"][2:]).sum(axis=-1) > 0)
  # The cut reaches the stack's weights too, not just the embedding.
  block_all, block_last = grads_all["blocks"][1]["mixer"], grads_last["blocks"][1]["mixer"]
  assert not np.allclose(block_all["k"]["kernel"], block_last["k"]["kernel"], rtol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["pallas", "pallas_staged"])
def test_the_train_steps_gradient_with_gpu_kernels_matches_the_chunked_form(impl):
  if jax.default_backend() != "gpu":
    pytest.skip("needs a GPU")
  # Two passes, so the kernels' state gradient flows from one pass into the next. The model's
  # own float32 matmuls would run TF32 on the GPU (a 1e-3 rounding that a 1e-7 difference from
  # the kernel can flip): full float32 here, so that only the kernels differ.
  with jax.default_matmul_precision("float32"):
    loss, grads = loss_and_grads(tiny_config(passes=2), impl=impl)
    expected_loss, expected_grads = loss_and_grads(tiny_config(passes=2), impl="chunked")
  assert loss == pytest.approx(expected_loss, rel=1e-5)
  flat_expected = dict(jax.tree_util.tree_leaves_with_path(expected_grads))
  for path, grad in jax.tree_util.tree_leaves_with_path(grads):
    want = np.asarray(flat_expected[path], np.float64)
    error = np.abs(np.asarray(grad, np.float64) - want).max()
    assert error <= 1e-4 * max(np.abs(want).max(), 1e-12), jax.tree_util.keystr(path)
