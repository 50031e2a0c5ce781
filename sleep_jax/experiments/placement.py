"""Where the runs of a sweep go: accelerators, executors and the jobs of each run, as plain data.

One sweep run (`sleep_jax.experiments.jobs.Job`, one `launch/main.py` command) becomes one
XManager work unit, or one Cloud TPU queued resource:
  * `local` platform: this machine's CPU (XManager's Local executor; Vertex AI also takes it).
  * `gpu`: `num_hosts` hosts of `gpus_per_host` GPUs of `gpu_type` (XManager's resource names:
    a100, a100_80gib, h100, h200, b200, ...). The Local executor asks for `local_gpu` (one host).
    On Vertex AI one host is one job; several hosts are one job group: a `coordinator` job (one
    replica, Vertex's workerpool0) and a `workers` job (num_hosts - 1 replicas). Every process
    gets JAX_COORDINATOR_ADDRESS = XManager's late binding of workerpool0's address and
    JAX_NUM_PROCESSES; its rank comes from Vertex's CLUSTER_SPEC (sleep_jax.parallel.distributed
    reads both). Vertex gets the machine type of the GPU count (a3-highgpu-8g for 8 H100s, ...):
    xm_local picks n1-standard-4 for an H100, which Vertex refuses.
  * `tpu`: a Cloud TPU slice (`v5e-16`, `v5p-32`, `v4-32`, `v6e-16`), `num_slices` of them. No
    executor shipped with xm_local launches v4/v5e/v5p/v6e (Vertex knows TPU v2/v3 only and its
    Kubernetes executor drops TPU requirements), so these go to the `tpu_vm` executor:
    `gcloud compute tpus queued-resources create` (sleep_jax.experiments.tpu_vm), one queued
    resource per run, several slices as one multislice request (`--node-count`), whose MEGASCALE_*
    variables jax reads. Its XManager requirements (`tpu_v5e='4x4'`) are shown too, for whoever
    submits through xm_cloud's GKE executor, which takes one slice per job.
Plain data: the dry run and the tests need no XManager (sleep_jax.experiments.xm_jobs builds the
XManager objects from these).
"""

from __future__ import annotations

import dataclasses
import math

from sleep_jax import paths
from sleep_jax.experiments.jobs import Job
from sleep_jax.parallel import topology as topology_lib

PLATFORMS = ("local", "gpu", "tpu")
EXECUTORS = ("local", "vertex", "tpu_vm")

# XManager's GPU resource names (xm.GpuType of xmanager 0.8.5; tests compare with the installed
# xmanager). `local_gpu` is the Local executor's own name, chosen by the executor, not the user.
XM_GPU_TYPES = (
  "p4",
  "t4",
  "l4_24th",
  "p100",
  "v100",
  "a100",
  "a100_80gib",
  "h100",
  "h100_mega",
  "h200",
  "b200",
  "b300",
  "gb200",
  "gb300",
  "vr200",
  "b40_48th",
)
# Vertex AI machine types by GPU and GPUs per machine (Vertex AI custom training's machine
# types). The GPUs that xm_local's Vertex executor names to Vertex, and their machines.
VERTEX_MACHINE_TYPES = {
  "a100": {1: "a2-highgpu-1g", 2: "a2-highgpu-2g", 4: "a2-highgpu-4g", 8: "a2-highgpu-8g"},
  "a100_80gib": {
    1: "a2-ultragpu-1g",
    2: "a2-ultragpu-2g",
    4: "a2-ultragpu-4g",
    8: "a2-ultragpu-8g",
  },
  "h100": {1: "a3-highgpu-1g", 2: "a3-highgpu-2g", 4: "a3-highgpu-4g", 8: "a3-highgpu-8g"},
  "h200": {8: "a3-ultragpu-8g"},
  "b200": {8: "a4-highgpu-8g"},
}
# XManager's late binding of the primary replica's address on Vertex AI
# (= xmanager.cloud.utils.get_workerpool_address("workerpool0"); tests check it).
COORDINATOR_LATE_BINDING = "%objectname(workerpool0)%"


@dataclasses.dataclass(frozen=True)
class TpuSlice:
  """One Cloud TPU slice, in the names of each system that takes it.

  Attributes:
    generation: "v4", "v5e", "v5p", "v6e".
    grid: the chip grid, e.g. "4x4" (XManager's topology value, GKE's tpu-topology).
    chips: chips in the slice.
    xm_resource: XManager's resource name, e.g. "tpu_v5e".
    accelerator_type: the Cloud TPU API's name, e.g. "v5litepod-16" (chips for v5e/v6e,
      TensorCores for v4/v5p).
  """

  generation: str
  grid: str
  chips: int
  xm_resource: str
  accelerator_type: str


# Per generation: (Cloud TPU accelerator-type prefix, TensorCores per chip in its count).
_CLOUD_TPU_NAMES = {"v4": ("v4", 2), "v5e": ("v5litepod", 1), "v5p": ("v5p", 2), "v6e": ("v6e", 1)}
_JAX_PREFIX_TO_GENERATION = {"v4": "v4", "v5e": "v5e", "v5": "v5p", "v6e": "v6e"}


def tpu_slice(topology: str) -> TpuSlice:
  """A topology name (`v5e-16`, `v5p-32`, or jax's `v5e:4x4`) -> the slice in every system's names.

  Raises:
    ValueError: an unknown topology (sleep_jax.parallel.topology's message).
  """
  jax_name = topology_lib.resolve(topology).jax_name  # "v5e:4x4", "v5:2x2x4"
  prefix, grid = jax_name.split(":")
  generation = _JAX_PREFIX_TO_GENERATION[prefix]
  chips = math.prod(int(d) for d in grid.split("x"))
  name, cores_per_chip = _CLOUD_TPU_NAMES[generation]
  return TpuSlice(generation, grid, chips, f"tpu_{generation}", f"{name}-{chips * cores_per_chip}")


@dataclasses.dataclass(frozen=True)
class Placement:
  """The accelerators and the executor of every run of a sweep. Checked when built.

  Attributes:
    platform: "local", "gpu" or "tpu".
    executor: "local" (XManager's Local executor), "vertex" (XManager's Vertex AI executor) or
      "tpu_vm" (Cloud TPU queued resources through gcloud).
    topology: tpu: the slice of each run, e.g. "v5e-16".
    num_slices: tpu: slices per run (multislice; the data axis spans them).
    num_hosts: gpu: hosts per run, one process each.
    gpus_per_host: gpu: GPUs per host.
    gpu_type: gpu: XManager's name of the GPU, e.g. "h100".
  """

  platform: str = "local"
  executor: str = "local"
  topology: str | None = None
  num_slices: int = 1
  num_hosts: int = 1
  gpus_per_host: int = 1
  gpu_type: str = "h100"

  def __post_init__(self):
    if self.platform not in PLATFORMS:
      raise ValueError(f"unknown platform {self.platform!r}; use one of {PLATFORMS}")
    if self.executor not in EXECUTORS:
      raise ValueError(f"unknown executor {self.executor!r}; use one of {EXECUTORS}")
    if min(self.num_slices, self.num_hosts, self.gpus_per_host) < 1:
      raise ValueError("num_slices, num_hosts and gpus_per_host must be >= 1")
    if self.platform != "tpu" and (self.topology or self.num_slices != 1):
      raise ValueError("--topology and --num_slices place TPU runs: add --platform=tpu")
    if self.platform != "gpu" and (self.num_hosts != 1 or self.gpus_per_host != 1):
      raise ValueError("--num_hosts and --gpus_per_host place GPU runs: add --platform=gpu")
    if self.platform == "tpu":
      self._check_tpu()
    elif self.executor == "tpu_vm":
      raise ValueError("--executor=tpu_vm starts Cloud TPU VMs: use it with --platform=tpu")
    if self.platform == "gpu":
      self._check_gpu()

  def _check_tpu(self) -> None:
    if not self.topology:
      raise ValueError("a TPU placement needs a topology, e.g. --topology=v5e-16")
    tpu_slice(self.topology)  # an unknown topology raises here, naming the accepted forms
    if self.executor != "tpu_vm":
      raise ValueError(
        f"--executor={self.executor} cannot start Cloud TPU {self.topology}: xm_local's Vertex "
        "executor knows TPU v2/v3 only and its Kubernetes executor drops TPU requirements. Use "
        "--executor=tpu_vm (Cloud TPU queued resources through gcloud)"
      )

  def _check_gpu(self) -> None:
    if self.gpu_type not in XM_GPU_TYPES:
      raise ValueError(
        f"--gpu_type={self.gpu_type!r} is not an XManager GPU; use one of {XM_GPU_TYPES}"
      )
    if self.executor == "tpu_vm":
      raise ValueError("--executor=tpu_vm starts Cloud TPU VMs: use it with --platform=tpu")
    if self.executor == "local" and self.num_hosts > 1:
      raise ValueError(
        f"--executor=local runs on this machine: one host, not --num_hosts={self.num_hosts}; "
        "use --executor=vertex for several hosts"
      )
    if self.executor == "vertex":
      counts = VERTEX_MACHINE_TYPES.get(self.gpu_type)
      if counts is None:
        raise ValueError(
          f"--gpu_type={self.gpu_type} has no Vertex AI machine type here; use one of "
          f"{sorted(VERTEX_MACHINE_TYPES)}"
        )
      if self.gpus_per_host not in counts:
        raise ValueError(
          f"Vertex AI machines hold {sorted(counts)} x {self.gpu_type}, not "
          f"--gpus_per_host={self.gpus_per_host}"
        )

  @property
  def tpu(self) -> TpuSlice:
    return tpu_slice(self.topology)

  @property
  def machine_type(self) -> str | None:
    """Vertex AI: the machine type of one GPU host (None elsewhere)."""
    if self.executor == "vertex" and self.platform == "gpu":
      return VERTEX_MACHINE_TYPES[self.gpu_type][self.gpus_per_host]
    return None

  @property
  def extra(self) -> str:
    """The package extra a job's container or TPU VM installs."""
    return {"tpu": "tpu", "gpu": "gpu"}.get(self.platform, "test")

  def requirements(self, replicas: int = 1) -> dict[str, object]:
    """The keyword arguments of XManager's JobRequirements for one job of `replicas` hosts.

    TPU: the slice's grid under the generation's name (`tpu_v5e='4x4'`: XManager parses the
    grid, not jax's `v5e:4x4`). GPU: the count under the GPU's name, or `local_gpu` for the
    Local executor.
    """
    if self.platform == "tpu":
      return {self.tpu.xm_resource: self.tpu.grid}
    extra = {"replicas": replicas} if replicas > 1 else {}
    if self.platform == "gpu":
      name = "local_gpu" if self.executor == "local" else self.gpu_type
      return {name: self.gpus_per_host, **extra}
    return extra

  def check_sweep_dir(self, sweep_dir: str) -> None:
    """Runs on remote machines must write to cloud storage: their disks go when they end."""
    if self.executor != "local" and not paths.is_remote(sweep_dir):
      raise ValueError(
        f"--executor={self.executor} runs on machines whose disks are gone when a run ends: "
        f"give --sweep_dir=gs://BUCKET/... (not {sweep_dir!r})"
      )


@dataclasses.dataclass(frozen=True)
class JobSpec:
  """One XManager job, as plain data (sleep_jax.experiments.xm_jobs builds the xm.Job).

  Attributes:
    name: the job's name in its work unit ("train", or "coordinator" / "workers").
    executor: "Local" or "Vertex" (xm_local's executor class).
    requirements: the keyword arguments of xm.JobRequirements.
    args: the `launch/main.py` flags, name -> value.
    env: environment variables.
    machine_type: Vertex AI: the machine type submit asks for (None: Vertex's default).
    volumes: the Local executor: host directory -> container directory (a local sweep dir is
      mounted at its own path, so the runs' files land on this machine).
  """

  name: str
  executor: str
  requirements: dict[str, object]
  args: dict[str, str]
  env: dict[str, str]
  machine_type: str | None = None
  volumes: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class WorkUnit:
  """One sweep run as an XManager work unit: one job, or a job group of several."""

  name: str  # the run's workdir relative to the sweep dir
  jobs: tuple[JobSpec, ...]


def work_unit(job: Job, placement: Placement, volumes: dict[str, str] | None = None) -> WorkUnit:
  """The XManager work unit of one run (not for the tpu_vm executor: sleep_jax.experiments.tpu_vm).

  Args:
    job: the run.
    placement: where it runs.
    volumes: the Local executor's mounts (host dir -> container dir).

  Raises:
    ValueError: a tpu placement (its runs are queued resources, not work units).
  """
  if placement.executor == "tpu_vm":
    raise ValueError(
      "--executor=tpu_vm runs become queued resources (sleep_jax.experiments.tpu_vm)"
    )
  executor = {"local": "Local", "vertex": "Vertex"}[placement.executor]
  spec = lambda name, replicas, env: JobSpec(
    name,
    executor,
    placement.requirements(replicas),
    dict(job.args),
    env,
    placement.machine_type,
    dict(volumes or {}),
  )
  if placement.num_hosts == 1:
    return WorkUnit(job.name, (spec("train", 1, {}),))
  # One job group: Vertex makes its first job workerpool0 (one replica: the coordinator, JAX
  # process 0) and the second workerpool1 (the other hosts, ranks 1.. from CLUSTER_SPEC).
  env = {
    "JAX_COORDINATOR_ADDRESS": COORDINATOR_LATE_BINDING,
    "JAX_NUM_PROCESSES": str(placement.num_hosts),
  }
  return WorkUnit(
    job.name,
    (spec("coordinator", 1, env), spec("workers", placement.num_hosts - 1, env)),
  )


def describe(units: list[WorkUnit]) -> list[str]:
  """The dry run's lines without xmanager: each work unit's jobs, with the exact arguments of
  xm.JobRequirements and xm.Job that submit passes."""
  lines = []
  for unit in units:
    lines.append(f"# work unit {unit.name}: {len(unit.jobs)} job{'s' * (len(unit.jobs) > 1)}")
    for spec in unit.jobs:
      requirements = ", ".join(f"{k}={v!r}" for k, v in spec.requirements.items())
      extra = f", docker_options=DockerOptions(volumes={spec.volumes})" if spec.volumes else ""
      machine = f" machine_type={spec.machine_type!r}" if spec.machine_type else ""
      lines.append(
        f"[{spec.name}] xm_local.{spec.executor}(requirements=xm.JobRequirements({requirements})"
        f"{extra}){machine} env_vars={spec.env} args={spec.args}"
      )
  return lines
