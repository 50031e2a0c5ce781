"""Submit a sweep (configs/sweeps/*.py) with XManager: one job per run of the grid.

  python launch/xm_launch.py --config=configs/sweeps/rule110_paper.py --dry_run
  python launch/xm_launch.py --config=configs/sweeps/rule110_paper.py --executor=vertex \
      --sweep_dir=gs://BUCKET/sweeps/rule110_paper --accelerator=a100 --accelerator_count=1

Each job runs `python launch/main.py --config=<base> --workdir=<run dir> --config.<key>=<value>...`
for one run of `sleep_jax.sweeps.expand_runs`, the same grid `launch/sweep.py` runs in one process.
`--dry_run` prints the job command lines and needs no xmanager; xmanager (the `xm` extra) is
imported only to submit. Report a finished sweep with `python -m sleep_jax.eval.report <sweep_dir>`.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/ imports

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from sleep_jax import sweeps  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Sweep config, e.g. configs/sweeps/rule110_paper.py.")
_SWEEP_DIR = flags.DEFINE_string("sweep_dir", None, "Sweep directory (default runs/sweeps/<name>).")
_ONLY = flags.DEFINE_string("only", None, "Submit only the arm with this name.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the job command lines; import no xmanager.")
_EXECUTOR = flags.DEFINE_enum("executor", "local", ["local", "vertex"], "Where the jobs run.")
_ACCELERATOR = flags.DEFINE_string("accelerator", None, "xm.JobRequirements key, e.g. a100, h100, tpu_v4.")
_ACCELERATOR_COUNT = flags.DEFINE_integer("accelerator_count", 1, "Accelerators per job.")
_BASE_IMAGE = flags.DEFINE_string("base_image", "python:3.11", "Docker base image of the job container.")
flags.mark_flags_as_required(["config"])


def submit(jobs: list[sweeps.Job], title: str) -> None:
  """Packages the repository once and adds one work unit per job (needs xmanager)."""
  from xmanager import xm, xm_local  # the optional `xm` extra, needed only to submit

  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  requirements = {}
  if _ACCELERATOR.value:
    requirements[_ACCELERATOR.value] = _ACCELERATOR_COUNT.value
  if _EXECUTOR.value == "vertex":
    executor = xm_local.Vertex(requirements=xm.JobRequirements(**requirements))
  else:
    executor = xm_local.Local()
  extra = "gpu" if _ACCELERATOR.value and not _ACCELERATOR.value.startswith("tpu") else (
      "tpu" if _ACCELERATOR.value else "test")
  with xm_local.create_experiment(experiment_title=title) as experiment:
    [executable] = experiment.package([
        xm.python_container(
            executor_spec=executor.Spec(), path=repo, base_image=_BASE_IMAGE.value,
            docker_instructions=[f"COPY {os.path.basename(repo)}/ sleep_jax",
                                 "WORKDIR sleep_jax",
                                 f'RUN python -m pip install -e ".[{extra}]"'],
            entrypoint=xm.CommandList([" ".join(sweeps.ENTRYPOINT)]))
    ])
    for job in jobs:
      experiment.add(xm.Job(executable=executable, executor=executor, args=job.args))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  sweep_config = _CONFIG.value
  sweep_dir = _SWEEP_DIR.value or os.path.join("runs", "sweeps", sweep_config.name)
  jobs = sweeps.make_jobs(sweep_config, sweep_dir, only=_ONLY.value)
  if _DRY_RUN.value:
    for job in jobs:
      print(" ".join(job.command()))
    print(f"{len(jobs)} jobs")
    return
  submit(jobs, title=sweep_config.name)


if __name__ == "__main__":
  app.run(main)
