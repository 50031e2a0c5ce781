"""Where the jobs of a sweep run: the processes of each job, their machines and environment.

A job is one `launch/main.py` run (sleep_jax.experiments.jobs.Job). Placed on accelerators it becomes one
or more processes, all running the same command:
  * `local`: one process on this machine (its CPU or its GPUs).
  * `gpu`: `num_hosts` hosts with `gpus_per_host` GPUs each, one process per host; with more
    than one host every process gets JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
    JAX_PROCESS_ID (sleep_jax.parallel.distributed), process 0's host being the coordinator.
  * `tpu`: a Cloud TPU slice named like `v5e-16` (`num_slices` of them): one process per TPU VM
    host. jax reads the hosts from the TPU metadata, so no coordinator is passed; the slice is
    the job's requirement.
Plain data here, so the dry run and the tests need no XManager.
"""

from __future__ import annotations

import dataclasses

from sleep_jax.experiments.jobs import Job
from sleep_jax.parallel import topology as topology_lib

PLATFORMS = ("local", "gpu", "tpu")
COORDINATOR_PORT = 8476


@dataclasses.dataclass(frozen=True)
class Placement:
  platform: str = "local"
  topology: str | None = None  # tpu: a Cloud TPU slice, e.g. "v5e-16"
  num_slices: int = 1  # tpu
  num_hosts: int = 1  # gpu
  gpus_per_host: int = 1  # gpu
  coordinator_host: str = "host-0"  # gpu, multi-host: where process 0 runs

  def __post_init__(self):
    if self.platform not in PLATFORMS:
      raise ValueError(f"unknown platform {self.platform!r}; use one of {PLATFORMS}")
    if self.platform == "tpu":
      if not self.topology:
        raise ValueError("a TPU placement needs a topology, e.g. --topology=v5e-16")
      topology_lib.resolve(self.topology)
    if min(self.num_slices, self.num_hosts, self.gpus_per_host) < 1:
      raise ValueError("num_slices, num_hosts and gpus_per_host must be >= 1")

  @property
  def requirements(self) -> dict[str, object]:
    """The accelerators one job asks for (what XManager's JobRequirements gets)."""
    if self.platform == "tpu":
      return {"tpu_topology": self.topology, "num_slices": self.num_slices}
    if self.platform == "gpu":
      return {"gpu": self.gpus_per_host, "replicas": self.num_hosts}
    return {}

  @property
  def extra(self) -> str:
    """The package extra a job's container installs."""
    return {"tpu": "tpu", "gpu": "gpu"}.get(self.platform, "test")


@dataclasses.dataclass(frozen=True)
class Process:
  host: str  # a name for the machine it runs on ("local", "host-1", "slice-0/worker-*")
  command: list[str]
  env: dict[str, str]


def processes(job: Job, placement: Placement) -> list[Process]:
  """The processes one job runs as under `placement`, each with its command and environment."""
  command = job.command()
  if placement.platform == "tpu":
    # One process per TPU VM host of every slice, started by the TPU runtime on each worker.
    return [Process(f"slice-{s}/all-workers", command, {}) for s in range(placement.num_slices)]
  if placement.platform == "gpu" and placement.num_hosts > 1:
    coordinator = f"{placement.coordinator_host}:{COORDINATOR_PORT}"
    return [
      Process(
        f"host-{i}",
        command,
        {
          "JAX_COORDINATOR_ADDRESS": coordinator,
          "JAX_NUM_PROCESSES": str(placement.num_hosts),
          "JAX_PROCESS_ID": str(i),
        },
      )
      for i in range(placement.num_hosts)
    ]
  return [Process("host-0" if placement.platform == "gpu" else "local", command, {})]


def describe(jobs: list[Job], placement: Placement) -> list[str]:
  """The dry run's lines: per job its requirements, then each process's environment and command."""
  lines = []
  for job in jobs:
    lines.append(f"# job {job.name}  requirements={placement.requirements}")
    for process in processes(job, placement):
      env = " ".join(f"{k}={v}" for k, v in process.env.items())
      lines.append(f"[{process.host}] {env + ' ' if env else ''}{' '.join(process.command)}")
  return lines
