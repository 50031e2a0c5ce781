"""One object for every output of a run: JSON-lines logs, TensorBoard, results.json, console.

Only process 0 of a job writes files; every process holds a `MetricsWriter`, so the loop never
asks who it is. The console lines go through the "sleep_jax" logger (sleep_jax.console).

TensorBoard events in a cloud run directory (`gs://...`): tensorboardX writes event files into a
local staging directory (sleep_jax.paths.StagedDir) that is copied into the workdir after every
evaluation and at close. tensorboardX writes through a background thread that its flush() does
not wait for, so each copy closes the writer first (which drains it) and the next scalars start a
new event file (`.1`, `.2`, ... suffixes); TensorBoard reads all the files of a directory as one
run. Between evaluations the bucket's events lag; the JSON-lines logs, written at every logged
step, hold every value. (tensorboardX's own gs:// writer would bypass the path library and
upload its whole file again at every flush.) A local workdir is written in place, as before.
"""

from __future__ import annotations

import logging
from typing import Any

from sleep_jax import console, paths, rundir

logger = logging.getLogger(__name__)


class MetricsWriter:
  """Writes train and eval metrics, results and the console lines of one run."""

  def __init__(self, run: rundir.RunDir, *, is_writer: bool):
    self.run = run
    self.is_writer = is_writer
    self._events = None
    self._staged = paths.StagedDir(run.path) if is_writer else None
    self._event_files = 0

  def _event_writer(self):
    """tensorboardX's writer, opened on first use (again after each copy to a remote workdir)."""
    if self._events is None and self._staged is not None:
      from tensorboardX import SummaryWriter  # heavy; only the writing process needs it

      suffix = f".{self._event_files}" if self._event_files else ""
      self._events = SummaryWriter(self._staged.local, filename_suffix=suffix)
      self._event_files += 1
    return self._events

  def _sync_events(self) -> None:
    """Copies the event files into a remote workdir (nothing to do for a local one)."""
    if self._staged is None or not self._staged.remote or self._events is None:
      return
    events, self._events = self._events, None
    events.close()  # drains tensorboardX's writing thread into the file
    self._staged.sync()

  def _scalars(self, prefix: str, step: int, values: dict[str, float]) -> None:
    events = self._event_writer()
    if events is not None:
      for name, value in values.items():
        events.add_scalar(f"{prefix}/{name}", value, step)

  def banner(self, lines: list[str]) -> None:
    for line in lines:
      logger.info(line)

  def train(
    self,
    step: int,
    num_steps: int,
    metrics: dict[str, float],
    *,
    learning_rates: dict[str, float],
    tokens_per_s: float,
    eta_s: float,
  ) -> None:
    """One logged training step: a JSON line, TensorBoard scalars and a progress line."""
    if self.is_writer:
      rundir.append_jsonl(self.run.file(rundir.TRAIN_LOG_FILE), {"step": step, **metrics})
    self._scalars("train", step, {**metrics, **learning_rates, "tokens_per_s": tokens_per_s})
    # Adaptive halting: the mean passes the batch's windows took.
    passes = f" | passes {metrics['passes_mean']:.2f}" if "passes_mean" in metrics else ""
    logger.info(
      "step %d/%d (%d%%) | loss %.4f | acc %.3f | exact %.3f%s | %.1fk tok/s | ETA %s",
      step,
      num_steps,
      100 * step // num_steps,
      metrics["loss"],
      metrics["accuracy"],
      metrics["exact_accuracy"],
      passes,
      tokens_per_s / 1e3,
      console.format_duration(eta_s),
    )

  def eval(self, step: int, metrics: dict[str, float]) -> None:
    if self.is_writer:
      rundir.append_jsonl(self.run.file(rundir.EVAL_LOG_FILE), {"step": step, **metrics})
    self._scalars("eval", step, metrics)
    self._sync_events()
    main = {k: v for k, v in metrics.items() if "/" not in k}  # slices go to the final table
    logger.info("eval at step %d | %s", step, " | ".join(f"{k} {v:.4f}" for k, v in main.items()))

  def results(self, results: rundir.Results) -> None:
    if self.is_writer:
      self.run.write_results(results)

  def summary(self, results: rundir.Results) -> None:
    """The closing table: every evaluation metric of the run."""
    rows = [[name, f"{value:.4f}"] for name, value in sorted(results.eval.items())]
    logger.info(
      "finished %s at step %d/%d in %s (%s):\n%s",
      results.task,
      results.step,
      results.num_steps,
      console.format_duration(results.wall_s),
      self.run.path,
      console.format_table(["metric", "value"], rows),
    )

  def close(self) -> None:
    events, self._events = self._events, None
    staged, self._staged = self._staged, None
    try:
      if events is not None:
        events.close()
    except Exception:
      # tensorboardX retries the same close at exit and prints a traceback there; the error is
      # raised (and reported) here once, so mark its file writers closed.
      for file_writer in (events.all_writers or {}).values():
        file_writer.event_writer._closed = True
      raise
    finally:
      if staged is not None:
        staged.close()  # the last copy of the event files into a remote workdir


def config_banner(
  config: Any,
  *,
  devices: list,
  mesh_shape: dict[str, int],
  workdir: str,
  resumed_from: int | None,
  num_params: int,
) -> list[str]:
  """The start banner's lines: what runs, on what, and where it writes."""
  model, sleep, train = config.model, config.sleep, config.train
  task_settings = ", ".join(f"{k}={v}" for k, v in config.task.training_settings.items())
  kinds = sorted({d.device_kind for d in devices})
  start = f"resuming from step {resumed_from}" if resumed_from is not None else "starting fresh"
  return [
    f"sleep_jax: {config.task.name} ({task_settings}) -> {workdir} ({start})",
    f"  model    {model.pattern} d_model={model.d_model} heads={model.num_heads}x"
    f"{model.head_dim} mlp={model.mlp_dim} dtype={model.dtype} kernel={model.fast_weight_impl}"
    f" | {num_params / 1e6:.2f}M params",
    f"  sleep    N={sleep.passes} passes, window L={sleep.window}, eviction={sleep.eviction}, "
    f"context={sleep.context_len}",
    f"  train    {train.num_steps} steps x batch {train.batch_size}, seed {config.seed}",
    f"  devices  {len(devices)} x {'/'.join(kinds)}, mesh "
    + " x ".join(f"{axis}={size}" for axis, size in mesh_shape.items()),
  ]
