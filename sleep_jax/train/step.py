"""TrainState and the pure train / eval steps.

`train_step(state, batch) -> (state, metrics)` is one function of arrays; `make_train_step`
binds the static pieces (model structure, sleep schedule, optimizer) and jits it once with
explicit input/output shardings (what pjit was) and the old state donated.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from sleep_jax.sleep.config import SleepConfig
from sleep_jax.sleep.consolidate import sleep_forward
from sleep_jax.train.metrics import mean_loss, prediction_sums, window_sums


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training (checkpointed as one pytree)."""

  step: jax.Array  # int32 scalar: optimizer updates applied so far
  params: Any  # nested dict of arrays (nnx.to_pure_dict of the model's parameters)
  opt_state: optax.OptState


def prediction_chunk_sums(
  graphdef: nnx.GraphDef, params, batch: dict, sleep_cfg: SleepConfig
) -> dict:
  """Runs the sleep schedule on a batch and returns the masked sums over the predicted chunks.

  Under an adaptive halt (`sleep.halt` != "never") also the sums of how the slept windows were
  slept on (`window_sums`)."""
  logits, _, stats = sleep_forward(graphdef, params, batch["tokens"], sleep_cfg, with_stats=True)
  spans = sleep_cfg.predicted_spans(batch["tokens"].shape[1])
  predicted = lambda x: jnp.concatenate([x[:, start:stop] for start, stop in spans], axis=1)
  answer_ids = predicted(batch["answer_id"]) if "answer_id" in batch else None
  sums = prediction_sums(
    logits, predicted(batch["targets"]), predicted(batch["loss_mask"]), answer_ids
  )
  if sleep_cfg.halt != "never" and stats is not None:
    sums.update(window_sums(stats.passes, stats.expected, sleep_cfg.passes))
  return sums


def train_step(
  state: TrainState,
  batch: dict,
  *,
  graphdef: nnx.GraphDef,
  sleep_cfg: SleepConfig,
  optimizer: optax.GradientTransformation,
  grad_norm: Callable = optax.tree.norm,
) -> tuple[TrainState, dict]:
  """One optimizer update on the masked answer cross-entropy.

  Gradients flow through every pass of every window, or through the last `sleep.grad_passes`
  passes of each window only (sleep_jax.sleep.consolidate). Under halt="learned" the loss adds
  `sleep.ponder_cost` times the expected passes per slept window. `grad_norm` computes the
  metric of that name (the program passes `optim.global_norm`, the clipping's own computation).
  """

  def loss_fn(params):
    sums = prediction_chunk_sums(graphdef, params, batch, sleep_cfg)
    loss = mean_loss(sums)
    if sleep_cfg.halt == "learned":
      loss = loss + sleep_cfg.ponder_cost * sums["expected_passes"] / sums["windows"]
    return loss, sums

  (objective, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  with jax.named_scope("optimizer"):
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
  metrics = {
    "loss": mean_loss(sums),  # the cross-entropy alone, comparable across halting rules
    "accuracy": sums["correct"] / jnp.maximum(sums["tokens"], 1.0),
    "exact_accuracy": sums["exact"] / jnp.maximum(sums["examples"], 1.0),
    "grad_norm": grad_norm(grads),
  }
  if "windows" in sums:
    metrics["passes_mean"] = sums["window_passes"] / sums["windows"]
  if sleep_cfg.halt == "learned":
    metrics["objective"] = objective
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def make_train_step(
  *,
  graphdef,
  sleep_cfg,
  optimizer,
  state_shardings,
  batch_sharding,
  replicated,
  grad_norm=optax.tree.norm,
):
  """`train_step` jitted once with explicit shardings; the incoming state is donated."""
  step = functools.partial(
    train_step, graphdef=graphdef, sleep_cfg=sleep_cfg, optimizer=optimizer, grad_norm=grad_norm
  )
  return jax.jit(
    step,
    in_shardings=(state_shardings, batch_sharding),
    out_shardings=(state_shardings, replicated),
    donate_argnums=0,
  )


def make_eval_step(*, graphdef, sleep_cfg, param_shardings, batch_sharding, replicated):
  """(params, batch) -> prediction sums, jitted with explicit shardings."""
  step = functools.partial(prediction_chunk_sums, graphdef, sleep_cfg=sleep_cfg)
  return jax.jit(
    lambda params, batch: step(params, batch),
    in_shardings=(param_shardings, batch_sharding),
    out_shardings=replicated,
  )
