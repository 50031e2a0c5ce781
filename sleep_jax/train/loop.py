"""The training loop: `train_and_evaluate(config, workdir)`, called by launch/main.py and sweeps.

In order: type and validate the config, build the program (mesh, shardings, jitted steps;
nothing compiled or allocated) -> check the run directory (writable, compatible config) ->
this process's rows of the data -> restore into the abstract sharded state, or init -> the loop
(dispatch step k+1 before reading step k's metrics; stop on NaN/Inf; save and stop on SIGTERM)
-> periodic evaluation and checkpoints -> results.json and a closing table. In a multi-process
job every process runs all of it; only process 0 writes logs, events and results.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from sleep_jax import rundir
from sleep_jax.data import tasks
from sleep_jax.model.config import EXACT_EXECUTION_FIELDS
from sleep_jax.parallel import mesh as mesh_lib
from sleep_jax.train import checkpoint as ckpt
from sleep_jax.train.config import ExperimentConfig
from sleep_jax.train.metrics import add_sums, summarize
from sleep_jax.train.optim import learning_rate_schedule
from sleep_jax.train.program import Program, build_program
from sleep_jax.train.writer import MetricsWriter, config_banner

logger = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
  """A training step produced a NaN or infinite loss or gradient norm."""


class Preempted(BaseException):
  """The run got SIGTERM, saved a checkpoint at its current step and stopped.

  A BaseException (like KeyboardInterrupt): a sweep must stop too, not go on to its next run.
  Entry points catch it and exit 0; rerunning the same command resumes.
  """


class PreemptionWatch:
  """Catches SIGTERM while training; `watch(step)` says whether to save and stop at `step`.

  One process: a signal handler sets a flag. Several processes: JAX's preemption service
  (started by jax.distributed.initialize) agrees on one step for all of them.
  """

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self) -> PreemptionWatch:
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
    return self

  def _on_sigterm(self, signum, frame):
    del signum, frame
    self.requested = True

  def __call__(self, step: int) -> bool:
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      try:
        return multihost_utils.reached_preemption_sync_point(step)
      except RuntimeError:  # the preemption service is off
        return False
    return self.requested

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


@dataclasses.dataclass
class Evaluator:
  """The fixed held-out sets of a run and how to evaluate params on them."""

  program: Program
  batch_size: int
  sets: dict[str, tasks.Batch]  # "" = the main set, then one per evaluation slice
  rows: slice  # this process's rows of every eval batch

  @classmethod
  def create(cls, program: Program, config: ExperimentConfig) -> Evaluator:
    task = program.validated.task
    sets = {"": tasks.heldout_set(task, seed=config.seed, num=config.eval.num_examples)}
    sets.update(tasks.heldout_slices(task, seed=config.seed, num=config.eval.num_slice_examples))
    rows = mesh_lib.process_batch_rows(program.batch_sharding, config.eval.batch_size)
    return cls(program, config.eval.batch_size, sets, rows)

  def _summary(self, params, examples) -> dict[str, float]:
    sums = None
    for batch in tasks.iterate_batches(examples, self.batch_size):
      local = {name: rows[self.rows] for name, rows in batch.items()}
      global_batch = mesh_lib.to_global_batch(local, self.program.batch_sharding, self.batch_size)
      sums = add_sums(sums, self.program.eval_step(params, global_batch))
    return summarize(jax.device_get(sums))

  def __call__(self, params) -> dict[str, float]:
    """The main set's metrics, then flat "<slice>/<metric>" keys per evaluation slice."""
    metrics = self._summary(params, self.sets[""])
    for eval_slice in self.program.validated.task.eval_slices:
      summary = self._summary(params, self.sets[eval_slice.name])
      metrics.update(
        {
          f"{eval_slice.name}/{reported}": summary[source]
          for reported, source in eval_slice.metrics.items()
        }
      )
      # Adaptive halting: how long the model slept on this slice's windows.
      metrics.update(
        {f"{eval_slice.name}/{k}": v for k, v in summary.items() if k.startswith("passes_")}
      )
    return metrics


def _prepare_run_dir(run: rundir.RunDir, config: ExperimentConfig, is_writer: bool) -> None:
  """Refuses an unusable or incompatible run directory before anything is compiled."""
  run.ensure_writable()
  run.check_compatible_config(
    config.to_dict(),
    defaults=config.field_defaults(),
    may_differ=tuple(f"model.{field}" for field in EXACT_EXECUTION_FIELDS),
  )
  if is_writer:
    run.write_config(config.to_dict())


def _close(manager, writer: MetricsWriter) -> None:
  """Closes the checkpoint manager and the writer; on the way out of an error, their own
  errors (e.g. a save failing on the same full disk) are logged, not raised over it."""
  for close in (manager.wait_until_finished, manager.close, writer.close):
    try:
      close()
    except Exception as e:
      logger.warning("while closing the run: %s: %s", type(e).__name__, e)


def _host_metrics(step: int, metrics: dict) -> dict[str, float]:
  host = {name: float(value) for name, value in jax.device_get(metrics).items()}
  if not all(math.isfinite(v) for v in host.values()):
    raise NonFiniteLossError(
      f"non-finite metrics at step {step}: {host}. Nothing from this step was saved; the last "
      "good checkpoint is in the workdir. Rerun the same command with a smaller learning rate "
      "(e.g. --config.train.muon_lr=... --config.train.adamw_lr=...) to resume from it."
    )
  return host


class _Progress:
  """Throughput between log lines and the ETA from the steps run in this process."""

  def __init__(self, step: int, tokens_per_step: int):
    self.tokens_per_step = tokens_per_step
    self.first_step, self.first_time = step, None
    self.last_step, self.last_time = step, time.time()

  def tick(self, step: int, num_steps: int) -> tuple[float, float]:
    now = time.time()
    if self.first_time is None:  # the first step includes compilation: time from its end
      self.first_step, self.first_time = step, now
    tokens_per_s = (step - self.last_step) * self.tokens_per_step / max(now - self.last_time, 1e-9)
    self.last_step, self.last_time = step, now
    done = step - self.first_step
    eta = (num_steps - step) * (now - self.first_time) / done if done else float("nan")
    return tokens_per_s, eta


def train_and_evaluate(
  config, workdir: str, *, stop_after_step: int | None = None, devices=None
) -> dict[str, Any]:
  """Trains per `config`, writing checkpoints, logs, TensorBoard events and results.json.

  Args:
    config: a ConfigDict as from configs/*.py (or an ExperimentConfig).
    workdir: the run directory; a rerun with the same workdir resumes from its checkpoint.
    stop_after_step: stop right after this step without a final save, as a killed job
      would (tests use it to check that resuming reproduces an uninterrupted run).
    devices: the devices the mesh covers (default: every device of every process).

  Returns:
    The results record (what results.json holds) as a dict.

  Raises:
    NonFiniteLossError: a step's loss or gradient norm was NaN/Inf (nothing of it is saved).
    Preempted: SIGTERM arrived; a checkpoint at the current step was saved first.
    rundir.WorkdirError: the workdir is unwritable or full, or holds an incompatible run.
  """
  config = ExperimentConfig.from_config(config)
  program = build_program(config, devices)  # validates first; compiles nothing yet
  run = rundir.RunDir(workdir)
  is_writer = jax.process_index() == 0
  _prepare_run_dir(run, config, is_writer)

  train_rows = mesh_lib.process_batch_rows(program.batch_sharding, config.train.batch_size)
  data_iter = iter(
    tasks.train_dataset(
      program.validated.task, seed=config.seed, batch_size=config.train.batch_size, rows=train_rows
    )
  )
  manager = ckpt.make_manager(run, max_to_keep=config.checkpoint.max_to_keep)
  writer = MetricsWriter(run, is_writer=is_writer)
  try:
    state = ckpt.restore_latest(manager, program.abstract_state, data_iter)
    resumed_from = None if state is None else int(state.step)
    writer.banner(
      config_banner(
        config,
        devices=list(program.mesh.devices.flat),
        mesh_shape=dict(program.mesh.shape),
        workdir=workdir,
        resumed_from=resumed_from,
        num_params=sum(
          int(np.prod(x.shape)) for x in jax.tree.leaves(program.abstract_state.params)
        ),
      )
    )
    if state is None:
      state = program.init_state()
    with PreemptionWatch() as preemption:
      results = _train(
        config, program, run, writer, manager, state, data_iter, preemption, stop_after_step
      )
    manager.wait_until_finished()  # the last asynchronous save is complete before we return
  except OSError as e:
    raise rundir.WorkdirError(
      f"writing to workdir {workdir} failed ({e}). Free space or fix permissions, then rerun "
      "the same command: it resumes from the last complete checkpoint."
    ) from e
  finally:
    _close(manager, writer)
  return results.to_json()


def _train(
  config: ExperimentConfig,
  program: Program,
  run: rundir.RunDir,
  writer: MetricsWriter,
  manager,
  state,
  data_iter,
  preemption: Callable[[int], bool],
  stop_after_step: int | None,
) -> rundir.Results:
  """The loop itself, from `state` to the last step (or a stop); returns the final results."""
  task = program.validated.task
  evaluate = Evaluator.create(program, config)
  train_fields = dataclasses.asdict(config.train)
  learning_rates = {
    f"lr/{group}": learning_rate_schedule(train_fields, train_fields[f"{group}_lr"])
    for group in ("muon", "adamw")
  }
  tokens_per_step = config.train.batch_size * task.seq_len
  num_steps = config.train.num_steps
  previous = run.results()
  prior_wall_s = previous.wall_s if previous is not None and int(state.step) > 0 else 0.0
  start_time = time.time()
  step = int(state.step)
  progress = _Progress(step, tokens_per_step)
  results = rundir.Results(
    task=task.name,
    task_settings=config.task.training_settings,
    passes=config.sleep.passes,
    window=config.sleep.window,
    eviction=config.sleep.eviction,
    pattern=config.model.pattern,
    seed=config.seed,
    step=step,
    num_steps=num_steps,
    tokens_seen=step * tokens_per_step,
    wall_s=prior_wall_s,
    eval={},
  )

  def finish_step(at_step: int, metrics) -> None:
    host = _host_metrics(at_step, metrics)
    if at_step % config.log_every_steps == 0 or at_step == num_steps:
      tokens_per_s, eta = progress.tick(at_step, num_steps)
      writer.train(
        at_step,
        num_steps,
        host,
        tokens_per_s=tokens_per_s,
        eta_s=eta,
        learning_rates={k: float(f(at_step - 1)) for k, f in learning_rates.items()},
      )

  def evaluate_and_record(at_step: int) -> None:
    results.eval = evaluate(state.params)
    results.step, results.tokens_seen = at_step, at_step * tokens_per_step
    results.wall_s = prior_wall_s + time.time() - start_time
    writer.eval(at_step, results.eval)
    writer.results(results)

  pending = None  # (step, metrics) dispatched but not yet read
  while step < num_steps:
    batch = mesh_lib.to_global_batch(
      next(data_iter), program.batch_sharding, config.train.batch_size
    )
    state, metrics = program.train_step(state, batch)
    step += 1
    if pending is not None:  # read step k-1's metrics only after step k is dispatched
      finish_step(*pending)
    pending = (step, metrics)
    is_eval = step % config.eval.every_steps == 0 or step == num_steps
    is_save = step % config.checkpoint.every_steps == 0 or step == num_steps
    stopping = stop_after_step is not None and step >= stop_after_step
    preempted = preemption(step)
    if is_eval or is_save or stopping or preempted:  # never save a state we have not checked
      finish_step(*pending)
      pending = None
    if is_eval:
      evaluate_and_record(step)
    if is_save or preempted:
      ckpt.save(manager, step, state, data_iter)
    if preempted:
      manager.wait_until_finished()
      logger.warning(
        "SIGTERM: saved a checkpoint at step %d in %s; rerun the same command to resume",
        step,
        run.path,
      )
      raise Preempted(f"preempted at step {step}")
    if stopping:
      return results
  if not results.eval:  # resumed a finished run: report it again
    evaluate_and_record(step)
  writer.summary(results)
  return results
