"""The training loop: `train_and_evaluate(config, workdir)`, called by launch/main.py and tests.

Sections, in order: build the program (validate, mesh, shardings, jitted steps; nothing
compiled or allocated) -> this process's rows of the data -> restore into the abstract sharded
state, or init -> loop (dispatch step k+1 before reading step k's metrics; stop on NaN/Inf) ->
periodic eval, checkpoints, TensorBoard and console lines -> results.json. In a multi-process
job every process runs all of it; only process 0 writes logs, events and results.
"""

from __future__ import annotations

import json
import math
import os
import time

import jax
from absl import logging
from tensorboardX import SummaryWriter

from sleep_jax.data import tasks
from sleep_jax.eval.metrics import add_sums, summarize
from sleep_jax.parallel import mesh as mesh_lib
from sleep_jax.train import checkpoint as ckpt
from sleep_jax.train.optim import learning_rate_schedule
from sleep_jax.train.program import build_program, num_slice_examples

RESULTS_FILE = "results.json"
TRAIN_LOG_FILE = "train_log.jsonl"  # one JSON line of train metrics per logged step
EVAL_LOG_FILE = "eval_log.jsonl"  # one JSON line of eval metrics per evaluation (learning curves)


class NonFiniteLossError(FloatingPointError):
  """Raised when a training step produced a NaN or infinite loss or gradient norm."""


def keep_only_our_info_logs(is_writer: bool = True) -> None:
  """INFO logging for this project, WARNING and above for everyone (orbax's INFO is chatty).

  Processes other than 0 of a multi-process job log warnings and errors only.
  """
  logging.set_verbosity(logging.INFO if is_writer else logging.WARNING)
  logging.get_absl_handler().addFilter(
      lambda record: record.levelno >= logging.WARNING or "sleep_jax" in record.pathname)


class _NoEvents:
  """The TensorBoard writer of processes other than 0: they write nothing."""

  def add_scalar(self, *args, **kwargs):
    pass

  def close(self):
    pass


def _append_json_line(path: str, record: dict) -> None:
  with open(path, "a") as f:
    f.write(json.dumps(record) + "\n")


def _console_line(step, num_steps, metrics, tokens_per_s, elapsed, start_step):
  done = step - start_step
  eta = (num_steps - step) * elapsed / max(done, 1)
  return (f"step {step}/{num_steps} | loss {metrics['loss']:.4f} | acc {metrics['accuracy']:.3f} | "
          f"exact {metrics['exact_accuracy']:.3f} | {tokens_per_s / 1e3:.1f}k tok/s | "
          f"ETA {int(eta // 60)}m{int(eta % 60):02d}s")


def train_and_evaluate(config, workdir: str, *, stop_after_step: int | None = None,
                       devices=None) -> dict:
  """Trains per `config`, writing checkpoints, TensorBoard events and results.json to `workdir`.

  Args:
    config: a ConfigDict as from configs/*.py (see configs/rule110.py for every field).
    workdir: the run directory; a rerun with the same workdir resumes from its checkpoint.
    stop_after_step: stop right after this step without a final save, as a preempted job
      would (tests use it to check that resuming reproduces an uninterrupted run).
    devices: the devices the mesh covers (default: every device of every process).

  Returns:
    The results dict also written to `workdir/results.json`.
  """
  # --- Validate, and refuse an incompatible workdir before touching it. ---------------------
  program = build_program(config, devices)  # validates first; compiles nothing yet
  task, model_cfg, sleep_cfg = (program.validated.task, program.validated.model,
                                program.validated.sleep)
  is_writer = jax.process_index() == 0  # one process writes logs, events and results
  config_dict = config.to_dict()
  ckpt.check_compatible_config(workdir, config_dict)
  if is_writer:
    ckpt.write_config(workdir, config_dict)

  # --- Data: every process makes and feeds only its own rows of each batch. ------------------
  train_rows = mesh_lib.process_batch_rows(program.batch_sharding, config.train.batch_size)
  eval_rows = mesh_lib.process_batch_rows(program.batch_sharding, config.eval.batch_size)
  data_iter = iter(tasks.train_dataset(task, seed=config.seed, batch_size=config.train.batch_size,
                                       rows=train_rows))

  # --- Restore into the abstract, sharded state, or init. --------------------------------------
  manager = ckpt.make_manager(workdir, max_to_keep=config.checkpoint.max_to_keep)
  state = ckpt.restore_latest(manager, program.abstract_state, data_iter)
  restored = state is not None
  if restored:
    logging.info("resumed from step %d in %s", int(state.step), workdir)
  else:
    state = program.init_state()
  train_step, eval_step = program.train_step, program.eval_step

  heldout = tasks.heldout_set(task, seed=config.seed, num=config.eval.num_examples)
  # Per-depth / per-hop sets (config.task.eval_depths / eval_hops), fixed like `heldout`.
  slice_sets = tasks.heldout_slices(task, seed=config.seed, num=num_slice_examples(config))
  lr_schedules = {f"lr/{g}": learning_rate_schedule(config.train, config.train[f"{g}_lr"])
                  for g in ("muon", "adamw")}

  def evaluate_set(params, examples) -> dict[str, float]:
    sums = None
    for batch in tasks.iterate_batches(examples, config.eval.batch_size):
      local = {name: rows[eval_rows] for name, rows in batch.items()}
      global_batch = mesh_lib.to_global_batch(local, program.batch_sharding, config.eval.batch_size)
      sums = add_sums(sums, eval_step(params, global_batch))
    return summarize(jax.device_get(sums))

  def evaluate(params) -> dict[str, float]:
    """The main held-out metrics, then flat "<slice>/<metric>" keys per evaluation slice."""
    metrics = evaluate_set(params, heldout)
    for eval_slice in task.eval_slices:
      summary = evaluate_set(params, slice_sets[eval_slice.name])
      metrics.update({f"{eval_slice.name}/{reported}": summary[source]
                      for reported, source in eval_slice.metrics.items()})
    return metrics

  # --- Loop. ------------------------------------------------------------------------------------
  writer = SummaryWriter(workdir) if is_writer else _NoEvents()
  results_path = os.path.join(workdir, RESULTS_FILE)
  prior_wall_s = 0.0
  if restored and os.path.exists(results_path):
    with open(results_path) as f:
      prior_wall_s = json.load(f).get("wall_s", 0.0)
  tokens_per_step = config.train.batch_size * task.seq_len
  start_step = step = int(state.step)
  num_steps = config.train.num_steps
  results = {"task": task.name, "passes": sleep_cfg.passes, "window": sleep_cfg.window,
             "step": step, "tokens_seen": step * tokens_per_step, "wall_s": prior_wall_s, "eval": {}}
  results.update(eviction=sleep_cfg.eviction, pattern=model_cfg.pattern)  # baselines differ here
  if task.name == "rule110":
    results["depth"] = config.task.depth
  start_time = last_log_time = time.time()
  last_log_step = step
  pending = None  # (step, metrics) dispatched but not yet read

  def check_finite(at_step, metrics):
    host = jax.device_get(metrics)
    if not all(math.isfinite(float(v)) for v in host.values()):
      raise NonFiniteLossError(f"non-finite metrics at step {at_step}: {host}. "
                               "The last good checkpoint is kept in the workdir.")
    return host

  def finish_step(at_step, metrics):
    nonlocal last_log_time, last_log_step
    host = check_finite(at_step, metrics)
    if at_step % config.log_every_steps == 0 or at_step == num_steps:
      now = time.time()
      tokens_per_s = (at_step - last_log_step) * tokens_per_step / max(now - last_log_time, 1e-9)
      last_log_time, last_log_step = now, at_step
      if is_writer:
        _append_json_line(os.path.join(workdir, TRAIN_LOG_FILE),
                          {"step": at_step, **{name: float(v) for name, v in host.items()}})
      for name, value in host.items():
        writer.add_scalar(f"train/{name}", float(value), at_step)
      for name, schedule in lr_schedules.items():
        writer.add_scalar(f"train/{name}", float(schedule(at_step - 1)), at_step)
      writer.add_scalar("train/tokens_per_s", tokens_per_s, at_step)
      logging.info(_console_line(at_step, num_steps, host, tokens_per_s, now - start_time, start_step))

  def evaluate_and_record(at_step):
    results["eval"] = evaluate(state.params)
    for name, value in results["eval"].items():
      writer.add_scalar(f"eval/{name}", value, at_step)
    logging.info("eval at step %d: %s", at_step,
                 " | ".join(f"{k} {v:.4f}" for k, v in results["eval"].items()))
    results.update(step=at_step, tokens_seen=at_step * tokens_per_step,
                   wall_s=prior_wall_s + time.time() - start_time)
    if is_writer:
      _append_json_line(os.path.join(workdir, EVAL_LOG_FILE), {"step": at_step, **results["eval"]})
      with open(results_path, "w") as f:
        json.dump(results, f, indent=2)

  while step < num_steps:
    batch = mesh_lib.to_global_batch(next(data_iter), program.batch_sharding,
                                     config.train.batch_size)
    state, metrics = train_step(state, batch)
    step += 1
    if pending is not None:  # read step k-1's metrics only after step k is dispatched
      finish_step(*pending)
    pending = (step, metrics)
    is_eval = step % config.eval.every_steps == 0 or step == num_steps
    is_save = step % config.checkpoint.every_steps == 0 or step == num_steps
    stopping = stop_after_step is not None and step >= stop_after_step
    if is_eval or is_save or stopping:  # never evaluate or save a state we have not checked
      finish_step(*pending)
      pending = None
    if is_eval:
      evaluate_and_record(step)
    if is_save:
      ckpt.save(manager, step, state, data_iter)
    if stopping:
      break
  if not results["eval"]:  # resumed a finished run: report it again
    evaluate_and_record(step)

  manager.wait_until_finished()
  manager.close()
  writer.close()
  return results
