"""A sweep's runs as `launch/main.py` commands: what launch/xm_launch.py submits."""

from __future__ import annotations

import dataclasses
import os

from ml_collections import config_dict

from sleep_jax.experiments.config_files import flag_value
from sleep_jax.experiments.sweeps import expand_runs

ENTRYPOINT = ("python", "launch/main.py")  # relative to the repository root


@dataclasses.dataclass(frozen=True)
class Job:
  """One run of a sweep as a `launch/main.py` command (what launch/xm_launch.py submits).

  Attributes:
    name: unique within the sweep: the run's workdir relative to the sweep dir.
    args: flag name -> value, e.g. {"config": "configs/rule110.py:paper", "workdir": ...,
      "config.sleep.passes": "2"}; each becomes `--name=value`.
  """

  name: str
  args: dict[str, str]

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
    jobs.append(Job(name=os.path.relpath(run.workdir, sweep_dir).replace(os.sep, "/"), args=args))
  return jobs
