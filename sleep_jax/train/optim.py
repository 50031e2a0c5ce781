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

The optimizer runs on the parameters stacked in groups (`by_groups`): all leaves of one label,
dtype and shape become one array, so that Muon's Newton-Schulz iterations are one batched matmul
per group (45 instead of 225 in the paper's Rule 110 step) and AdamW's elementwise work one
kernel per group rather than per leaf. Every transformation here acts on each matrix or element
on its own, so the updates are those of the leaves one by one; the state stays per leaf, laid
out as the plain optimizer's (checkpoints restore either way).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
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


GROUP_SEPARATOR = "|"  # a group's key: "<label>|<dtype>|<shape>"


class _Groups(NamedTuple):
  """How a params-shaped tree is stacked into groups."""

  treedef: Any  # of the params (masked leaves count as leaves)
  members: dict[str, list[int]]  # group key -> the leaf indices stacked in it, in order


def _is_leaf(x) -> bool:
  return x is None or isinstance(x, optax.MaskedNode)


def _groups(labels: Any, tree: Any) -> _Groups:
  leaves, treedef = jax.tree.flatten(tree, is_leaf=_is_leaf)
  members: dict[str, list[int]] = {}
  for index, (label, leaf) in enumerate(zip(jax.tree.leaves(labels), leaves)):
    shape = "x".join(str(n) for n in leaf.shape)
    members.setdefault(GROUP_SEPARATOR.join((label, str(leaf.dtype), shape)), []).append(index)
  return _Groups(treedef, members)


def _stack(groups: _Groups, tree: Any) -> dict[str, Any]:
  """A params-shaped tree -> {group key: its leaves stacked}; a masked group stays masked."""
  leaves = jax.tree.leaves(tree, is_leaf=_is_leaf)
  stacked = {}
  for key, indices in groups.members.items():
    parts = [leaves[i] for i in indices]
    masked = any(isinstance(x, optax.MaskedNode) for x in parts)
    stacked[key] = optax.MaskedNode() if masked else jnp.stack(parts)
  return stacked


def _unstack(groups: _Groups, stacked: dict[str, Any]) -> Any:
  """The inverse of `_stack`."""
  leaves: list[Any] = [None] * groups.treedef.num_leaves
  for key, indices in groups.members.items():
    for position, index in enumerate(indices):
      group = stacked[key]
      leaves[index] = group if isinstance(group, optax.MaskedNode) else group[position]
  return jax.tree.unflatten(groups.treedef, leaves)


def _map_like(state: Any, treedef: Any, fn) -> Any:
  """`fn` on every subtree of an optimizer state structured like `treedef` (the parameter-
  shaped moments), the rest (counters, coefficients) as it is."""
  like = lambda x: jax.tree.structure(x, is_leaf=_is_leaf) == treedef
  return jax.tree.map(lambda x: fn(x) if like(x) else x, state, is_leaf=like)


def by_groups(inner: optax.GradientTransformation, labels: Any) -> optax.GradientTransformation:
  """`inner` run on the parameters stacked by (label, dtype, shape), its state kept per leaf.

  Args:
    inner: a transformation of `{group key: stacked leaves}` trees whose every step acts on
      each matrix (Muon: its last two axes) or element on its own; its labels come from the keys
      (`group_label`).
    labels: the optimizer label of every parameter, a tree shaped like the parameters.
  """
  stacked_treedef = lambda groups: jax.tree.structure(
    {key: 0 for key in groups.members}, is_leaf=_is_leaf
  )

  def init(params):
    groups = _groups(labels, params)
    state = inner.init(_stack(groups, params))
    return _map_like(state, stacked_treedef(groups), functools.partial(_unstack, groups))

  def update(updates, state, params=None):
    groups = _groups(labels, updates)
    # The barrier materialises the stacked state before the update reads it: otherwise XLA may
    # fuse a read of an old moment into the kernel that overwrites it in place (the state is
    # donated), and copies every moment first to keep the other readers right.
    stacked_state = jax.lax.optimization_barrier(
      _map_like(state, groups.treedef, functools.partial(_stack, groups))
    )
    stacked_params = None if params is None else _stack(groups, params)
    stacked_updates, stacked_state = inner.update(
      _stack(groups, updates), stacked_state, stacked_params
    )
    state = _map_like(stacked_state, stacked_treedef(groups), functools.partial(_unstack, groups))
    return _unstack(groups, stacked_updates), state

  return optax.GradientTransformation(init, update)


def global_norm(grads: Any, labels: Any) -> jax.Array:
  """The gradients' global norm, computed as `make_optimizer`'s clipping computes it: on the
  stacked groups. A metric computed this way costs nothing (XLA computes the same operations on
  the same values once); leaf by leaf it was 27 more kernels in the paper's GPU step."""
  return optax.tree.norm(_stack(_groups(labels, grads), grads))


def group_label(stacked: dict[str, Any]) -> dict[str, str]:
  """The optimizer label of every group of a stacked tree (`by_groups`)."""
  return {key: key.split(GROUP_SEPARATOR)[0] for key in stacked}


def per_leaf_optimizer(
  train_config: Mapping[str, Any], labels: Any, *, with_frozen: bool | None = None
) -> optax.GradientTransformation:
  """clip(global norm) -> {Muon | AdamW} by label, leaf by leaf: `make_optimizer`'s reference.

  Args:
    train_config: the `train` section as a mapping.
    labels: the label of every parameter: a tree like the parameters, or a function of them.
    with_frozen: whether some label is "frozen" (default: read off a `labels` tree). Frozen
      parameters get zero gradients before the clipping and no update.
  """
  if with_frozen is None:
    with_frozen = FROZEN in jax.tree.leaves(labels)
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
  if not with_frozen:  # (the state layout of every earlier checkpoint)
    return optax.chain(clip, optax.multi_transform({MUON: muon, ADAMW: adamw}, labels))
  label_of = labels if callable(labels) else lambda _: labels
  frozen = lambda params: jax.tree.map(lambda label: label == FROZEN, label_of(params))
  return optax.chain(
    optax.masked(optax.set_to_zero(), frozen),
    clip,
    optax.multi_transform({MUON: muon, ADAMW: adamw, FROZEN: optax.set_to_zero()}, labels),
  )


def make_optimizer(train_config: Mapping[str, Any], labels: Any) -> optax.GradientTransformation:
  """`per_leaf_optimizer` run on the parameters stacked in groups (`by_groups`)."""
  with_frozen = FROZEN in jax.tree.leaves(labels)
  inner = per_leaf_optimizer(train_config, group_label, with_frozen=with_frozen)
  return by_groups(inner, labels)
