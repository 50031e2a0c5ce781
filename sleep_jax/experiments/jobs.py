"""A sweep's runs as `launch/main.py` commands: what launch/xm_launch.py submits."""

from __future__ import annotations

import dataclasses

from ml_collections import config_dict

from sleep_jax import paths
from sleep_jax.experiments.config_files import apply_overrides, flag_value, load_config
from sleep_jax.experiments.sweeps import Run, expand_runs

ENTRYPOINT = ("python", "launch/main.py")  # relative to the repository root


@dataclasses.dataclass(frozen=True)
class Job:
  """One run of a sweep as a `launch/main.py` command (what launch/xm_launch.py submits).

  Attributes:
    name: unique within the sweep: the run's workdir relative to the sweep dir.
    args: flag name -> value, e.g. {"config": "configs/rule110.py:paper", "workdir": ...,
      "config.sleep.passes": "2"}; each becomes `--name=value`.
    num_steps: the run's last step (results.json at this step = finished).
  """

  name: str
  args: dict[str, str]
  num_steps: int

  def command(self) -> list[str]:
    return [*ENTRYPOINT, *(f"--{key}={value}" for key, value in self.args.items())]


def make_jobs(
  sweep_config: config_dict.ConfigDict, sweep_dir: str, only: str | None = None
) -> list[Job]:
  """The sweep's runs as `launch/main.py` jobs, in expand_runs order.

  Args:
    sweep_config: a ConfigDict from configs/sweeps/*.py.
    sweep_dir: the sweep directory; each job gets its run's workdir inside it.
    only: keep only this arm.

  Returns:
    One Job per run: --config=<base> --workdir=<run dir> --config.<key>=<value> per override.
  """
  jobs = []
  for run in expand_runs(sweep_config, sweep_dir, only=only):
    args = {"config": run.base, "workdir": run.workdir}
    args.update(
      {
        f"config.{key}": flag_value(value)
        for key, value in run.overrides.items()
        if value is not None
      }
    )
    jobs.append(Job(paths.relative(run.workdir, sweep_dir), args, run.num_steps))
  return jobs


# The model-FLOP rate measured for the paper's Rule 110 step on one H100 (bench/train_step.py
# --platform gpu --setting paper; docs/results/gpu/train_step.json, N=1: 1,383 GFLOP per step in
# 93.8 ms, 1.5% of the bf16 peak). Estimates divide a run's model FLOPs by it: an accelerator at
# that efficiency. Faster kernels shrink every estimate by the same factor.
MEASURED_FLOP_RATE = 14.75e12
MEASURED_ON = "one H100 running the paper step at N=1 (docs/results/gpu/train_step.json)"


@dataclasses.dataclass(frozen=True)
class JobCost:
  """A run's training cost: model FLOPs (forward + backward, matmuls) and accelerator-hours."""

  name: str
  flops: float
  tokens: float  # training tokens (examples x tokens per example)
  hours: float


def config_step_flops(config: config_dict.ConfigDict) -> float:
  """Model FLOPs of one training step of an experiment config (or a run's saved config.json
  as a ConfigDict): `train_step_flops` at the config's model, schedule, task length and batch."""
  from sleep_jax.data import tasks  # imported here: the dry run alone needs the data modules
  from sleep_jax.model.config import ModelConfig
  from sleep_jax.sleep.config import SleepConfig
  from sleep_jax.sleep.flops import train_step_flops

  return train_step_flops(
    ModelConfig.from_config(config.model),
    SleepConfig.from_config(config.sleep),
    seq_len=tasks.get_task(config.task).seq_len,
    batch_size=config.train.batch_size,
  )


def run_cost(run: Run, sweep_dir: str, flop_rate: float = MEASURED_FLOP_RATE) -> JobCost:
  """The estimated cost of one run: train_step_flops x num_steps at `flop_rate` FLOP/s."""
  from sleep_jax.data import tasks

  config = apply_overrides(load_config(run.base), run.overrides)
  seq_len = tasks.get_task(config.task).seq_len
  batch, steps = config.train.batch_size, config.train.num_steps
  step_flops = config_step_flops(config)
  name = paths.relative(run.workdir, sweep_dir)
  flops = step_flops * steps
  return JobCost(
    name=name, flops=flops, tokens=float(batch * seq_len * steps), hours=flops / flop_rate / 3600
  )


def describe_costs(
  sweep_config: config_dict.ConfigDict, sweep_dir: str, only: str | None = None
) -> list[str]:
  """Lines of a cost table for a sweep's dry run: per job and in total."""
  costs = [run_cost(run, sweep_dir) for run in expand_runs(sweep_config, sweep_dir, only=only)]
  lines = [
    f"# estimated cost at {MEASURED_FLOP_RATE / 1e12:.2f} model TFLOP/s per accelerator, "
    f"as measured on {MEASURED_ON}",
    f"{'job':<40} {'tokens':>10} {'PFLOP':>10} {'accelerator-hours':>18}",
  ]
  for cost in costs:
    lines.append(
      f"{cost.name:<40} {cost.tokens / 1e6:>9.1f}M {cost.flops / 1e15:>10.1f} {cost.hours:>18.2f}"
    )
  total = sum(c.hours for c in costs)
  lines.append(f"{'total':<40} {'':>10} {sum(c.flops for c in costs) / 1e15:>10.1f} {total:>18.2f}")
  return lines
