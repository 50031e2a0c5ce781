"""The training loop: `train_and_evaluate(config, workdir)`, called by launch/main.py and tests.

Sections, in order: validate (before compiling) -> mesh, model, optimizer, shardings ->
restore or init -> loop (dispatch step k+1 before reading step k's metrics; stop on NaN/Inf)
-> periodic eval, checkpoints, TensorBoard and console lines -> results.json.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time

import jax
import jax.numpy as jnp
from absl import logging
from flax import nnx
from tensorboardX import SummaryWriter

from sleep_jax.data import tasks
from sleep_jax.eval.metrics import add_sums, summarize
from sleep_jax.model.config import ModelConfig
from sleep_jax.model.lm import build_model
from sleep_jax.parallel import mesh as mesh_lib
from sleep_jax.sleep.config import SleepConfig
from sleep_jax.train import checkpoint as ckpt
from sleep_jax.train.optim import learning_rate_schedule, make_optimizer, optimizer_labels
from sleep_jax.train.step import TrainState, make_eval_step, make_train_step

RESULTS_FILE = "results.json"
TRAIN_LOG_FILE = "train_log.jsonl"  # one JSON line of train metrics per logged step
EVAL_LOG_FILE = "eval_log.jsonl"  # one JSON line of eval metrics per evaluation (learning curves)


class NonFiniteLossError(FloatingPointError):
  """Raised when a training step produced a NaN or infinite loss or gradient norm."""


def keep_only_our_info_logs() -> None:
  """INFO logging for this project, WARNING and above for everyone (orbax's INFO is chatty)."""
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(
      lambda record: record.levelno >= logging.WARNING or "sleep_jax" in record.pathname)


def validate(config) -> tuple[tasks.Task, ModelConfig, SleepConfig, int]:
  """Every static check, before anything is compiled. Returns typed pieces of the config."""
  task = tasks.get_task(config.task)
  model_cfg = ModelConfig.from_config(config.model)
  sleep_cfg = SleepConfig.from_config(config.sleep)
  if model_cfg.vocab_size < task.vocab_size:
    raise ValueError(f"model.vocab_size={model_cfg.vocab_size} < {task.name}'s {task.vocab_size} tokens")
  if sleep_cfg.context_len != task.context_len:
    raise ValueError(f"sleep.context_len={sleep_cfg.context_len} but {task.name} sleeps on "
                     f"{task.context_len} tokens before its prediction chunk")
  sleep_cfg.check_sequence(task.seq_len)
  dp = mesh_lib.data_parallel_size(config.parallel)
  for name in ("train.batch_size", "eval.batch_size"):
    size = config[name.split(".")[0]]["batch_size"]
    if size < 1 or size % dp:
      raise ValueError(f"{name}={size} is not divisible by the data-parallel size {dp}")
  # Whole batches only: a smaller last batch would compile the eval step a second time.
  for name, num in (("num_examples", config.eval.num_examples),
                    ("num_slice_examples", _num_slice_examples(config))):
    if num < 1 or num % config.eval.batch_size:
      raise ValueError(f"eval.{name}={num} is not a positive multiple of "
                       f"eval.batch_size={config.eval.batch_size}")
  if config.train.num_steps < 1:
    raise ValueError(f"train.num_steps must be >= 1, got {config.train.num_steps}")
  return task, model_cfg, sleep_cfg, dp


def _num_slice_examples(config) -> int:
  """Examples per evaluation slice (configs without the field use the main set's size)."""
  return config.eval.get("num_slice_examples", config.eval.num_examples)


def _init_params(model_cfg: ModelConfig, seed: int):
  return nnx.to_pure_dict(nnx.state(build_model(model_cfg, seed=seed)))


def _append_json_line(path: str, record: dict) -> None:
  with open(path, "a") as f:
    f.write(json.dumps(record) + "\n")


def _console_line(step, num_steps, metrics, tokens_per_s, elapsed, start_step):
  done = step - start_step
  eta = (num_steps - step) * elapsed / max(done, 1)
  return (f"step {step}/{num_steps} | loss {metrics['loss']:.4f} | acc {metrics['accuracy']:.3f} | "
          f"exact {metrics['exact_accuracy']:.3f} | {tokens_per_s / 1e3:.1f}k tok/s | "
          f"ETA {int(eta // 60)}m{int(eta % 60):02d}s")


def train_and_evaluate(config, workdir: str, *, stop_after_step: int | None = None) -> dict:
  """Trains per `config`, writing checkpoints, TensorBoard events and results.json to `workdir`.

  Args:
    config: a ConfigDict as from configs/*.py (see configs/rule110.py for every field).
    workdir: the run directory; a rerun with the same workdir resumes from its checkpoint.
    stop_after_step: stop right after this step without a final save, as a preempted job
      would (tests use it to check that resuming reproduces an uninterrupted run).

  Returns:
    The results dict also written to `workdir/results.json`.
  """
  # --- Validate, and refuse an incompatible workdir before touching it. ---------------------
  task, model_cfg, sleep_cfg, _ = validate(config)
  config_dict = config.to_dict()
  ckpt.check_compatible_config(workdir, config_dict)
  ckpt.write_config(workdir, config_dict)

  # --- Mesh, model structure, optimizer, shardings (shapes first: nothing allocated yet). ----
  mesh = mesh_lib.make_mesh(config.parallel)
  rules = config.parallel.rules
  abstract_model = nnx.eval_shape(lambda: build_model(model_cfg, seed=config.seed))
  graphdef, abstract_params = nnx.split(abstract_model)
  param_shardings = mesh_lib.param_shardings(abstract_params, mesh, rules)
  optimizer = make_optimizer(config.train, optimizer_labels(abstract_params))
  batch_sharding = mesh_lib.batch_sharding(mesh)
  replicated = mesh_lib.replicated(mesh)

  def init_state():
    params = jax.jit(functools.partial(_init_params, model_cfg, config.seed),
                     out_shardings=param_shardings)()
    # Optimizer moments are sharded like the parameters they mirror; counters are replicated.
    opt_shardings = mesh_lib.shardings_by_param_path(jax.eval_shape(optimizer.init, params),
                                                     param_shardings, default=replicated)
    opt_state = jax.jit(optimizer.init, out_shardings=opt_shardings)(params)
    return TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), replicated), params=params,
                      opt_state=opt_state)

  # --- Restore or init. -----------------------------------------------------------------------
  manager = ckpt.make_manager(workdir, max_to_keep=config.checkpoint.max_to_keep)
  data_iter = iter(tasks.train_dataset(task, seed=config.seed, batch_size=config.train.batch_size))
  state = init_state()
  state_shardings = jax.tree.map(lambda x: x.sharding, state)
  restored = ckpt.restore_latest(manager, ckpt.abstract_like(state), data_iter)
  if restored is not None:
    state = restored
    logging.info("resumed from step %d in %s", int(state.step), workdir)

  train_step = make_train_step(graphdef=graphdef, sleep_cfg=sleep_cfg, optimizer=optimizer,
                               state_shardings=state_shardings, batch_sharding=batch_sharding,
                               replicated=replicated)
  eval_step = make_eval_step(graphdef=graphdef, sleep_cfg=sleep_cfg, param_shardings=param_shardings,
                             batch_sharding=batch_sharding, replicated=replicated)
  heldout = tasks.heldout_set(task, seed=config.seed, num=config.eval.num_examples)
  # Per-depth / per-hop sets (config.task.eval_depths / eval_hops), fixed like `heldout`.
  slice_sets = tasks.heldout_slices(task, seed=config.seed, num=_num_slice_examples(config))
  lr_schedules = {f"lr/{g}": learning_rate_schedule(config.train, config.train[f"{g}_lr"])
                  for g in ("muon", "adamw")}

  def evaluate_set(params, examples) -> dict[str, float]:
    sums = None
    for batch in tasks.iterate_batches(examples, config.eval.batch_size):
      sums = add_sums(sums, eval_step(params, batch))
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
  writer = SummaryWriter(workdir)
  results_path = os.path.join(workdir, RESULTS_FILE)
  prior_wall_s = 0.0
  if restored is not None and os.path.exists(results_path):
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
      _append_json_line(os.path.join(workdir, TRAIN_LOG_FILE),
                        {"step": at_step, **{name: float(value) for name, value in host.items()}})
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
    _append_json_line(os.path.join(workdir, EVAL_LOG_FILE), {"step": at_step, **results["eval"]})
    with open(results_path, "w") as f:
      json.dump(results, f, indent=2)

  while step < num_steps:
    batch = jax.device_put(next(data_iter), batch_sharding)
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
