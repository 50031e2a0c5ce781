"""The optimizer: warmup + cosine learning rates, global-norm clipping first, Muon vs AdamW."""

import dataclasses
import math

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from configs import rule110 as rule110_configs
from sleep_jax.model.lm import build_model
from sleep_jax.train import optim
from sleep_jax.train import program as program_lib
from sleep_jax.train.config import TrainConfig

PEAK = 2e-3


def learning_rate(train: TrainConfig, peak: float, step: int) -> float:
  return float(optim.learning_rate_schedule(dataclasses.asdict(train), peak)(step))


def schedule(**train_fields):
  """The learning rate at a step for a typed, validated `train` section and peak PEAK."""
  train = TrainConfig(**train_fields)
  return lambda step: learning_rate(train, PEAK, step)


def test_learning_rate_warms_up_linearly_then_decays_on_a_cosine_and_stays_flat():
  lr = schedule(num_steps=110, warmup_steps=10, min_lr_ratio=0.1)
  low = 0.1 * PEAK
  assert lr(0) == 0.0
  assert lr(5) == pytest.approx(PEAK / 2, rel=1e-6)  # linear warmup
  assert lr(10) == pytest.approx(PEAK, rel=1e-6)
  # Cosine over the 100 steps after warmup: a quarter, half and all of the way down.
  cosine = lambda fraction: low + (PEAK - low) * 0.5 * (1 + math.cos(math.pi * fraction))
  assert lr(35) == pytest.approx(cosine(0.25), rel=1e-6)
  assert lr(60) == pytest.approx(cosine(0.5), rel=1e-6)
  assert lr(110) == pytest.approx(low, rel=1e-6)
  assert [lr(step) for step in (111, 150, 10_000)] == pytest.approx([low] * 3, rel=1e-6)
  steps = [lr(step) for step in range(10, 111)]
  assert all(a >= b for a, b in zip(steps, steps[1:]))  # monotone decay, no restart


def test_warmup_longer_than_the_run_is_a_ramp_that_never_overshoots():
  lr = schedule(num_steps=10, warmup_steps=50, min_lr_ratio=0.1)
  run = [lr(step) for step in range(10)]  # the steps the run takes
  assert run[0] == 0.0 and run[-1] > 0.0
  assert all(a < b for a, b in zip(run, run[1:]))  # still warming up when the run ends
  assert all(np.isfinite(run)) and max(run) <= PEAK


def test_no_warmup_starts_at_the_peak():
  lr = schedule(num_steps=100, warmup_steps=0, min_lr_ratio=0.1)
  assert lr(0) == pytest.approx(PEAK, rel=1e-6)
  assert lr(100) == pytest.approx(0.1 * PEAK, rel=1e-6)


# --- the optimizer of the tiny Rule 110 program (clip 1.0, one warmup step) --------------------


def tiny_program(**train_overrides):
  config = rule110_configs.get_config("tiny")
  config.train.update(train_overrides)
  return program_lib.build_program(config, jax.devices()[:1])


@pytest.fixture(scope="module")
def programs():
  """The tiny program, and the same with clipping effectively off."""
  return tiny_program(), tiny_program(grad_clip=1e9)


def param_shapes(program):
  return jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), program.abstract_state.params)


def random_tree(shapes, seed: int, norm: float):
  """Gaussian leaves like `shapes`, scaled to global norm `norm`."""
  rng = np.random.default_rng(seed)
  tree = jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32), shapes)
  return scale_to(tree, norm)


def scale_to(tree, norm: float):
  current = math.sqrt(
    sum(float(np.sum(np.square(x, dtype=np.float64))) for x in jax.tree.leaves(tree))
  )
  return jax.tree.map(lambda x: (x * (norm / current)).astype(np.float32), tree)


def second_update(program, first_grads, second_grads):
  """The update of step 1 after `first_grads` at step 0 (whose learning rate is 0).

  Both Muon (normalised momentum) and Adam (m / sqrt(v)) are invariant to the scale of a single
  gradient, so clipping shows only in how the second gradient weighs against the first.
  """
  update = jax.jit(program.optimizer.update)
  params = param_shapes(program)
  state = program.optimizer.init(params)
  first, state = update(first_grads, state, params)
  assert all(not np.any(u) for u in jax.tree.leaves(first))  # warmup starts at lr 0
  second, _ = update(second_grads, state, params)
  return jax.device_get(second)


def assert_trees_close(a, b, **tolerance):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, **tolerance), a, b)


def max_relative_difference(a, b):
  return max(
    float(np.max(np.abs(x - y)) / np.max(np.abs(y)))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  )


def test_a_gradient_above_the_clip_is_rescaled_to_the_clip_norm_before_muon_and_adamw(programs):
  clipped, unclipped = programs
  clip = clipped.config.train.grad_clip
  shapes = param_shapes(clipped)
  first = random_tree(shapes, seed=0, norm=0.5 * clip)
  huge = random_tree(shapes, seed=1, norm=1000.0 * clip)
  update = second_update(clipped, first, huge)
  assert all(np.any(u) for u in jax.tree.leaves(update))
  # Exactly what the unclipped optimizer does with the gradient rescaled to norm grad_clip...
  assert_trees_close(
    update, second_update(unclipped, first, scale_to(huge, clip)), rtol=1e-4, atol=1e-9
  )
  # ...and far from what it does with the raw gradient, which swamps the first one's momentum.
  assert max_relative_difference(second_update(unclipped, first, huge), update) > 0.1


def test_a_gradient_below_the_clip_is_left_alone(programs):
  clipped, unclipped = programs
  clip = clipped.config.train.grad_clip
  shapes = param_shapes(clipped)
  # Different norms, so that rescaling either one would change their relative weight.
  first = random_tree(shapes, seed=0, norm=0.5 * clip)
  second = random_tree(shapes, seed=1, norm=0.1 * clip)
  assert_trees_close(
    second_update(clipped, first, second),
    second_update(unclipped, first, second),
    rtol=1e-6,
    atol=0,
  )


def matrix_with_spectrum(rng, rows: int, cols: int, singular_values):
  u, _ = np.linalg.qr(rng.standard_normal((rows, len(singular_values))))
  v, _ = np.linalg.qr(rng.standard_normal((cols, len(singular_values))))
  return (u * singular_values) @ v.T, u, v


def test_muon_orthogonalises_each_hidden_matrix_and_adamw_works_elementwise(programs):
  program, _ = programs
  abstract_model = nnx.eval_shape(lambda: build_model(program.config.model, seed=0))
  labels = optim.optimizer_labels(nnx.state(abstract_model))
  assert labels["blocks"][1]["mlp"]["down"]["kernel"] == "muon"  # [R=2, 64, 32]
  assert labels["blocks"][0]["mixer"]["q"]["kernel"] == "muon"
  assert labels["head"]["kernel"] == labels["embedding"] == "adamw"
  assert labels["blocks"][1]["mixer"]["decay_proj"]["kernel"] == "adamw"

  rng = np.random.default_rng(0)
  grads = random_tree(param_shapes(program), seed=2, norm=0.1)
  # Two stacked layers with singular values spread 20x, the second layer 100x larger overall.
  spectrum = np.geomspace(1.0, 0.05, 32)
  layers = [matrix_with_spectrum(rng, 64, 32, scale * spectrum) for scale in (1e-3, 1e-1)]
  stacked = np.stack([g for g, _, _ in layers]).astype(np.float32)
  grads["blocks"][1]["mlp"]["down"]["kernel"] = stacked
  grads = scale_to(grads, 0.5)  # below the clip: the same gradient at both steps
  # A constant gradient makes Muon's momentum the gradient itself and Adam's m / sqrt(v) its sign.
  update = second_update(program, grads, grads)
  train = program.config.train
  lr_muon, lr_adamw = (learning_rate(train, peak, 1) for peak in (train.muon_lr, train.adamw_lr))
  assert lr_muon > 0 and lr_adamw > 0

  muon_update = update["blocks"][1]["mlp"]["down"]["kernel"]
  for layer, (_, u, v) in zip(muon_update, layers):
    singular_values = np.linalg.svd(layer, compute_uv=False)
    assert singular_values.max() / singular_values.min() < 3.0  # the gradient's spread is 20
    # In the gradient's own singular basis, the update is diagonal and points downhill; each
    # layer on its own (a joint orthogonalisation would shrink the small layer 100x).
    projected = u.T @ layer @ v
    off_diagonal = projected - np.diag(np.diag(projected))
    assert np.abs(off_diagonal).max() < 1e-3 * lr_muon
    assert np.all(-np.diag(projected) > 0.3 * lr_muon)
    assert np.all(-np.diag(projected) < 1.7 * lr_muon)

  for path in (("head", "kernel"), ("embedding",), ("blocks", 1, "mixer", "A_log")):
    grad, leaf = grads, update
    for key in path:
      grad, leaf = grad[key], leaf[key]
    np.testing.assert_allclose(leaf, -lr_adamw * grad / (np.abs(grad) + 1e-8), rtol=1e-4)


@pytest.mark.parametrize("trainable", ["", "blocks/1/"])  # all parameters, or some frozen
def test_stacked_groups_update_as_the_leaves_one_by_one_with_the_same_state_layout(trainable):
  program = tiny_program(trainable=trainable)
  abstract_model = nnx.eval_shape(lambda: build_model(program.config.model, seed=0))
  labels = optim.optimizer_labels(nnx.state(abstract_model), trainable)
  train = dataclasses.asdict(program.config.train)
  stacked, per_leaf = optim.make_optimizer(train, labels), optim.per_leaf_optimizer(train, labels)
  params = random_tree(param_shapes(program), seed=3, norm=10.0)
  states = [stacked.init(params), per_leaf.init(params)]
  # Checkpoints of either restore into the other: the same tree of the same arrays.
  assert jax.tree.structure(states[0]) == jax.tree.structure(states[1])
  assert jax.tree.map(np.shape, states[0]) == jax.tree.map(np.shape, states[1])
  for step in range(3):
    grads = random_tree(param_shapes(program), seed=10 + step, norm=2.0)  # clipped: norm > 1
    (a, states[0]), (b, states[1]) = (
      jax.jit(opt.update)(grads, state, params) for opt, state in zip((stacked, per_leaf), states)
    )
    # Batched matmuls sum in another order: equal to float32 rounding, leaf by leaf.
    for x, y in zip(jax.tree.leaves((a, states[0])), jax.tree.leaves((b, states[1]))):
      assert np.max(np.abs(x - y)) <= 1e-5 * np.max(np.abs(y))
  # The metric's norm, computed on the same stacked groups as the clipping, is the leaves' norm.
  np.testing.assert_allclose(optim.global_norm(grads, labels), optax.tree.norm(grads), rtol=1e-6)
  if trainable:
    frozen = a["blocks"][0]["mixer"]["q"]["kernel"]
    assert not np.any(frozen) and np.any(a["blocks"][1]["mixer"]["q"]["kernel"])
  # One Newton-Schulz matmul per group and step instead of per leaf.
  count = lambda opt: str(jax.make_jaxpr(opt.update)(grads, states[0], params)).count("dot_general")
  assert count(stacked) < count(per_leaf) / 2
