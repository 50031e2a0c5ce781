"""Workdir bookkeeping: orbax checkpoints (train state + grain iterator), config.json guard.

Resume order (big_vision style): check that the workdir's config.json is compatible with the
new config (before anything is compiled or overwritten), then restore the latest checkpoint's
train state into the abstract, sharded target and the data iterator to its saved position.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

CONFIG_FILE = "config.json"
# Settings that change what a checkpoint means: resuming under different ones is an error.
# (Loop settings such as num_steps, eval cadence or remat may change between runs.)
_MUST_MATCH = ("seed", "task", "model", "train.batch_size", "sleep.passes", "sleep.window",
               "sleep.eviction", "sleep.context_len", "sleep.grad_passes")
# Evaluation-only task fields inside the sections above: they may change (e.g. to add depths).
_MAY_DIFFER = ("task.eval_depths", "task.eval_hops")


def _lookup(tree: dict, dotted: str) -> Any:
  for key in dotted.split("."):
    tree = tree.get(key) if isinstance(tree, dict) else None
  return tree


def _without_eval_fields(config_dict: dict) -> dict:
  """A copy of `config_dict` without the `_MAY_DIFFER` fields."""
  config_dict = copy.deepcopy(config_dict)
  for dotted in _MAY_DIFFER:
    *parents, field = dotted.split(".")
    section = _lookup(config_dict, ".".join(parents))
    if isinstance(section, dict):
      section.pop(field, None)
  return config_dict


def check_compatible_config(workdir: str, config_dict: dict) -> None:
  """Raises ValueError if `workdir` holds a run of an incompatible config (nothing is touched)."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return
  with open(path) as f:
    saved = _without_eval_fields(json.load(f))
  config_dict = _without_eval_fields(config_dict)
  differing = [key for key in _MUST_MATCH if _lookup(saved, key) != _lookup(config_dict, key)]
  if differing:
    details = "; ".join(f"{k}: saved {_lookup(saved, k)!r} vs new {_lookup(config_dict, k)!r}"
                        for k in differing)
    raise ValueError(f"workdir {workdir} holds a run with an incompatible config ({details}). "
                     "Use a new --workdir; the existing run was left untouched.")


def write_config(workdir: str, config_dict: dict) -> None:
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
    json.dump(config_dict, f, indent=2, sort_keys=True)


def make_manager(workdir: str, *, max_to_keep: int) -> ocp.CheckpointManager:
  directory = epath.Path(os.path.abspath(workdir)) / "checkpoints"
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
  return ocp.CheckpointManager(directory, options=options, item_names=("state", "data"))


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_iterator) -> None:
  """Saves the train state and the data iterator position at `step` (asynchronously)."""
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                             data=grain.checkpoint.CheckpointSave(data_iterator)))


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any, data_iterator):
  """Restores the newest checkpoint into `abstract_state` (shapes + shardings) and the iterator.

  Returns:
    The restored state, or None when there is no checkpoint. Raises a clear error when the
    checkpoint exists but cannot be read (it is left on disk).
  """
  step = manager.latest_step()
  if step is None:
    return None
  try:
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=grain.checkpoint.CheckpointRestore(data_iterator)))
  except Exception as e:  # orbax raises many types for unreadable or mismatched files
    raise RuntimeError(f"checkpoint at step {step} in {manager.directory} could not be restored "
                       f"({type(e).__name__}: {e}). It was left on disk; move it away to start "
                       "over, or point --workdir elsewhere.") from e
  return restored.state

