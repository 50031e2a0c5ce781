"""Optimizer: Muon for hidden weight matrices, AdamW for the rest (PAPER.md section 3).

Which parameter goes where is decided where it is created (`optimizer=` metadata in
sleep_jax/model): Muon takes the 2-D hidden matrices (attention q/k/v/o, MLP gate/up/down,
gated-delta q/k/v, output gate and output projection); AdamW takes the token embedding, the
output head, RMSNorm scales, conv filters, the decay/beta gate projections, A_log and dt_bias.
Both follow linear warmup then cosine decay, and the global gradient norm is clipped first.
With `train.trainable` (a regular expression on parameter paths) the parameters it does not
match are "frozen": their gradients are zeroed before the clipping (they do not count in the
norm) and they are never updated (the warm-up of new layers in a pretrained model).

Muon weights may be stacked: the repeated blocks of the model keep one [R, in, out] array per
weight (R repetitions along the "layers" axis). Muon orthogonalises the last two axes and treats
every leading axis as a batch of independent matrices, so each layer's update is exactly that of
its own [in, out] matrix.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import optax
from flax import nnx

from sleep_jax.model.layers import ADAMW, MUON
from sleep_jax.model.lm import param_path

FROZEN = "frozen"


def optimizer_labels(abstract_state: nnx.State, trainable: str = "") -> Any:
  """ "muon" / "adamw" per parameter ("frozen" where `trainable` is set and does not match its
  path), as a nested dict like `nnx.to_pure_dict`."""
  labels = nnx.to_pure_dict(
    jax.tree.map(
      lambda v: v.get_metadata().get("optimizer", ADAMW),
      abstract_state,
      is_leaf=lambda x: isinstance(x, nnx.Variable),
    )
  )
  if not trainable:
    return labels
  pattern = re.compile(trainable)
  labels = jax.tree_util.tree_map_with_path(
    lambda keys, label: label if pattern.search(param_path(keys)) else FROZEN, labels
  )
  if all(label == FROZEN for label in jax.tree.leaves(labels)):
    raise ValueError(f"train.trainable={trainable!r} matches no parameter path")
  return labels


def learning_rate_schedule(train_config: Mapping[str, Any], peak: float) -> optax.Schedule:
  """Linear warmup from 0 to `peak`, then cosine decay to `peak * min_lr_ratio`."""
  num_steps = train_config["num_steps"]
  warmup = min(train_config["warmup_steps"], num_steps)
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=peak,
    warmup_steps=warmup,
    decay_steps=max(num_steps, warmup + 1),
    end_value=peak * train_config["min_lr_ratio"],
  )


# Newton-Schulz runs on [..., in, out]: reduction (input) axis -2, output axis -1; the leading
# axes, if any, are batch axes (optax vmaps over them).
MATRIX_AXES = optax.contrib.MuonDimensionNumbers(reduction_axis=-2, output_axis=-1)


def make_optimizer(train_config: Mapping[str, Any], labels: Any) -> optax.GradientTransformation:
  """clip(global norm) -> {Muon | AdamW} by label."""
  # Without dimension numbers optax.contrib.muon sends every non-2-D array to its internal
  # Adam: stacked [R, in, out] weights would silently skip orthogonalisation.
  muon = optax.contrib.muon(
    learning_rate_schedule(train_config, train_config["muon_lr"]),
    weight_decay=train_config["weight_decay"],
    muon_weight_dimension_numbers=MATRIX_AXES,
  )
  adamw = optax.adamw(
    learning_rate_schedule(train_config, train_config["adamw_lr"]),
    weight_decay=train_config["weight_decay"],
  )
  clip = optax.clip_by_global_norm(train_config["grad_clip"])
  if FROZEN not in jax.tree.leaves(labels):  # (the state layout of every earlier checkpoint)
    return optax.chain(clip, optax.multi_transform({MUON: muon, ADAMW: adamw}, labels))
  frozen = jax.tree.map(lambda label: label == FROZEN, labels)
  return optax.chain(
    optax.masked(optax.set_to_zero(), frozen),
    clip,
    optax.multi_transform({MUON: muon, ADAMW: adamw, FROZEN: optax.set_to_zero()}, labels),
  )
