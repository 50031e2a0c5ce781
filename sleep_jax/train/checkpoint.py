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

import dataclasses
import json
import logging
from typing import Any

import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from sleep_jax import paths, rundir
from sleep_jax.model.config import EXECUTION_FIELDS, ModelConfig
from sleep_jax.model.lm import HybridLM, build_model
from sleep_jax.train.config import ExperimentConfig

# A starting point for `config.init_from` (launch/convert.py): the model's config and its
# parameters. The model fields that only choose how it runs (EXECUTION_FIELDS) may differ.
INITIAL_MODEL_FILE = "model.json"
INITIAL_PARAMS_DIR = "params"


def make_manager(run: rundir.RunDir, *, max_to_keep: int) -> ocp.CheckpointManager:
  """The run's checkpoint manager; orbax writes gs:// directories itself (through tensorstore)."""
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


def restore_model(workdir: str) -> tuple[HybridLM, ExperimentConfig, int]:
  """The model of a run directory with its newest checkpoint's parameters, on one device.

  Reads config.json and only the parameters of the newest checkpoint (not the optimizer
  state or the data position), read-only, whatever mesh the run trained on.

  Returns:
    (model, the run's typed config, the checkpoint's step).
  """
  run = rundir.RunDir(workdir)
  saved = run.config()
  if saved is None:
    raise rundir.WorkdirError(f"{workdir} holds no run (no {rundir.CONFIG_FILE})")
  config = ExperimentConfig.from_config(saved)
  abstract = nnx.eval_shape(lambda: build_model(config.model, seed=config.seed))
  graphdef, abstract_params = nnx.split(abstract)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = {
    "params": jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
      nnx.to_pure_dict(abstract_params),
    )
  }
  options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
  absl_logger = logging.getLogger("absl")
  level = absl_logger.level
  absl_logger.setLevel(logging.ERROR)  # orbax warns that a read-only directory is read-only
  try:
    manager = ocp.CheckpointManager(
      epath.Path(run.checkpoints), item_names=("state",), options=options
    )
  finally:
    absl_logger.setLevel(level)
  step = manager.latest_step()
  if step is None:
    raise rundir.WorkdirError(f"{workdir} has no checkpoint yet")
  restore_args = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=device), target)
  restored = manager.restore(
    step,
    args=ocp.args.Composite(
      state=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True)
    ),
  )
  nnx.replace_by_pure_dict(abstract_params, restored.state["params"])
  return nnx.merge(graphdef, abstract_params), config, int(step)


def save_initial(directory: str, params: Any, model_config: ModelConfig) -> None:
  """Writes parameters (a pure dict) and their model config for `config.init_from` (a local
  directory or a gs:// one)."""
  directory = paths.absolute(directory)
  paths.makedirs(directory)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(epath.Path(paths.join(directory, INITIAL_PARAMS_DIR)), params, force=True)
  checkpointer.wait_until_finished()
  paths.write_text(
    paths.join(directory, INITIAL_MODEL_FILE),
    json.dumps(dataclasses.asdict(model_config), indent=2),
  )


def _check_same_model(saved: ModelConfig, model_config: ModelConfig, source: str) -> None:
  saved_fields, wanted = dataclasses.asdict(saved), dataclasses.asdict(model_config)
  # A model without a halting unit may start a run that adds one (`_add_fresh_halting_unit`).
  saved_fields["halting_unit"] |= wanted["halting_unit"]
  differing = [
    f"{k}: saved {saved_fields[k]!r} vs config {wanted[k]!r}"
    for k in wanted
    if k not in EXECUTION_FIELDS and saved_fields[k] != wanted[k]
  ]
  if differing:
    raise ValueError(
      f"init_from={source} holds another model ({'; '.join(differing)}). Set config.model to "
      f"the saved model (its {INITIAL_MODEL_FILE} or config.json), or convert again."
    )


def _without_halting_unit(target: dict, params: dict | None = None) -> dict:
  """`target` less its halting unit (unless `params` has one)."""
  if params is not None and "halting" in params:
    return target
  return {k: v for k, v in target.items() if k != "halting"}


def _add_fresh_halting_unit(params: dict, target: dict) -> dict:
  """A halting unit the saved model lacked starts fresh: zeros, as `HybridLM` initialises it
  (halt="learned" then weighs every pass equally at first)."""
  if "halting" not in target or "halting" in params:
    return params
  zeros = lambda t: jax.device_put(jnp.zeros(t.shape, t.dtype), t.sharding)
  return {**params, "halting": jax.tree.map(zeros, target["halting"])}


def load_initial(directory: str, model_config: ModelConfig, target: Any) -> Any:
  """The parameters to start a run from, placed like `target` (ShapeDtypeStructs with
  shardings): a launch/convert.py directory, or an earlier run's newest checkpoint (local or
  gs://)."""
  model_file = paths.join(directory, INITIAL_MODEL_FILE)
  if paths.exists(model_file):
    saved = ModelConfig(**json.loads(paths.read_text(model_file)))
    _check_same_model(saved, model_config, directory)
    path = paths.join(paths.absolute(directory), INITIAL_PARAMS_DIR)
    saved_target = target if saved.halting_unit else _without_halting_unit(target)
    params = ocp.StandardCheckpointer().restore(epath.Path(path), saved_target)
    return _add_fresh_halting_unit(params, target)
  if rundir.RunDir(directory).config() is not None:
    model, config, _ = restore_model(directory)
    _check_same_model(config.model, model_config, directory)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    params = jax.tree.map(
      lambda x, t: jax.device_put(x, t.sharding), params, _without_halting_unit(target, params)
    )
    return _add_fresh_halting_unit(params, target)
  raise FileNotFoundError(
    f"init_from={directory} is neither a converted checkpoint ({INITIAL_MODEL_FILE} and "
    f"{INITIAL_PARAMS_DIR}/, from launch/convert.py) nor a run directory"
  )
