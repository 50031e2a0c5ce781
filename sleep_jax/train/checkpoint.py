"""Orbax checkpoints of a run: the train state and the grain iterator position, per step.

Orbax writes each checkpoint into a temporary directory and renames it when complete, and a
new manager deletes leftover temporary directories, so a process killed at any moment (even
during an asynchronous save) never leaves a half-written checkpoint that could be restored.
Old checkpoints are deleted only after a newer one is complete.

Restore order (big_vision style): the run directory's config guard runs first (sleep_jax.rundir),
then the latest checkpoint is restored straight into the abstract, sharded train state (no
initial state is built) and the data iterator to its saved position.
"""

from __future__ import annotations

from typing import Any

import grain
import orbax.checkpoint as ocp
from etils import epath

from sleep_jax import rundir


def make_manager(run: rundir.RunDir, *, max_to_keep: int) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
  return ocp.CheckpointManager(
    epath.Path(run.checkpoints), options=options, item_names=("state", "data")
  )


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_iterator) -> None:
  """Saves the train state and the data iterator position at `step` (asynchronously)."""
  manager.save(
    step,
    args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iterator)
    ),
  )


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
    restored = manager.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=grain.checkpoint.CheckpointRestore(data_iterator),
      ),
    )
  except Exception as e:  # orbax raises many types for unreadable or mismatched files
    raise RuntimeError(
      f"checkpoint at step {step} in {manager.directory} could not be restored "
      f"({type(e).__name__}: {e}). It was left on disk; move it away to start "
      "over, or point --workdir elsewhere."
    ) from e
  return restored.state
