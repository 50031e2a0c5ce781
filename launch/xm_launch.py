"""Submit a sweep (configs/sweeps/*.py) with XManager: one job per run of the grid.

  python launch/xm_launch.py --config=configs/sweeps/rule110_paper.py --dry_run
  # Cloud TPU: every job on a v5e-16 slice (4 hosts, one process each; jax finds its peers)
  python launch/xm_launch.py --config=configs/sweeps/rule110_paper.py --platform=tpu \
      --topology=v5e-16 --sweep_dir=gs://BUCKET/sweeps/rule110_paper --dry_run
  # GPU hosts: 2 hosts x 8 GPUs per job, joined through JAX_COORDINATOR_ADDRESS & co.
  python launch/xm_launch.py --config=configs/sweeps/rule110_paper.py --platform=gpu \
      --num_hosts=2 --gpus_per_host=8 --executor=vertex --dry_run

Each job runs `python launch/main.py --config=<base> --workdir=<run dir> --config.<key>=<value>...`
for one run of `sleep_jax.experiments.sweeps.expand_runs`, the same grid `launch/sweep.py` runs in one process.
`--dry_run` prints every job's requirements and each of its processes (environment and
command; sleep_jax/experiments/placement.py) and needs no xmanager; xmanager (the `xm` extra) is
imported only to submit. Submission itself is untested here (it needs cloud credentials).
Report a finished sweep with `python -m sleep_jax.experiments.report <sweep_dir>`.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/ imports

from absl import app, flags
from ml_collections import config_flags

from sleep_jax.experiments import jobs as jobs_lib
from sleep_jax.experiments import placement as placement_lib
from sleep_jax.parallel import topology as topology_lib

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Sweep config, e.g. configs/sweeps/rule110_paper.py."
)
_SWEEP_DIR = flags.DEFINE_string("sweep_dir", None, "Sweep directory (default runs/sweeps/<name>).")
_ONLY = flags.DEFINE_string("only", None, "Submit only the arm with this name.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the job command lines; import no xmanager.")
_EXECUTOR = flags.DEFINE_enum("executor", "local", ["local", "vertex"], "Where the jobs run.")
_PLATFORM = flags.DEFINE_enum(
  "platform",
  "local",
  list(placement_lib.PLATFORMS),
  "local (this machine), gpu (GPU hosts) or tpu (Cloud TPU slices).",
)
_TOPOLOGY = flags.DEFINE_string(
  "topology", None, "tpu: the slice of each job, e.g. v5e-16, v5p-32."
)
_NUM_SLICES = flags.DEFINE_integer(
  "num_slices", 1, "tpu: slices per job (the data axis spans them)."
)
_NUM_HOSTS = flags.DEFINE_integer("num_hosts", 1, "gpu: hosts per job, one process each.")
_GPUS_PER_HOST = flags.DEFINE_integer("gpus_per_host", 1, "gpu: GPUs per host.")
_GPU_TYPE = flags.DEFINE_string("gpu_type", "h100", "gpu: xm.JobRequirements key, e.g. a100, h100.")
_BASE_IMAGE = flags.DEFINE_string(
  "base_image", "python:3.11", "Docker base image of the job container."
)
flags.mark_flags_as_required(["config"])


def _requirements(xm, placement: placement_lib.Placement):
  """XManager's JobRequirements for one process of a job (untested: needs a cloud account)."""
  if placement.platform == "tpu":
    resolved = topology_lib.resolve(placement.topology)
    return xm.JobRequirements(**{f"tpu_{resolved.jax_name.split(':')[0]}": resolved.jax_name})
  if placement.platform == "gpu":
    return xm.JobRequirements(**{_GPU_TYPE.value: placement.gpus_per_host})
  return xm.JobRequirements()


def submit(jobs: list[jobs_lib.Job], title: str, placement: placement_lib.Placement) -> None:
  """Packages the repository once and adds one work unit per job (needs xmanager)."""
  from xmanager import xm, xm_local  # the optional `xm` extra, needed only to submit

  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  requirements = _requirements(xm, placement)
  if _EXECUTOR.value == "vertex":
    executor = xm_local.Vertex(requirements=requirements)
  else:
    executor = xm_local.Local()
  with xm_local.create_experiment(experiment_title=title) as experiment:
    [executable] = experiment.package(
      [
        xm.python_container(
          executor_spec=executor.Spec(),
          path=repo,
          base_image=_BASE_IMAGE.value,
          docker_instructions=[
            f"COPY {os.path.basename(repo)}/ sleep_jax",
            "WORKDIR sleep_jax",
            f'RUN python -m pip install -e ".[{placement.extra}]"',
          ],
          entrypoint=xm.CommandList([" ".join(jobs_lib.ENTRYPOINT)]),
        )
      ]
    )
    for job in jobs:
      # One work unit per process; the processes of a job differ only in their environment.
      for process in placement_lib.processes(job, placement):
        experiment.add(
          xm.Job(executable=executable, executor=executor, args=job.args, env_vars=process.env)
        )


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  sweep_config = _CONFIG.value
  sweep_dir = _SWEEP_DIR.value or os.path.join("runs", "sweeps", sweep_config.name)
  try:
    placement = placement_lib.Placement(
      platform=_PLATFORM.value,
      topology=_TOPOLOGY.value,
      num_slices=_NUM_SLICES.value,
      num_hosts=_NUM_HOSTS.value,
      gpus_per_host=_GPUS_PER_HOST.value,
    )
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  jobs = jobs_lib.make_jobs(sweep_config, sweep_dir, only=_ONLY.value)
  if _DRY_RUN.value:
    print("\n".join(placement_lib.describe(jobs, placement)))
    print(f"{len(jobs)} jobs on {_PLATFORM.value}")
    print("\n".join(jobs_lib.describe_costs(sweep_config, sweep_dir, only=_ONLY.value)))
    return
  submit(jobs, title=sweep_config.name, placement=placement)


if __name__ == "__main__":
  app.run(main)
