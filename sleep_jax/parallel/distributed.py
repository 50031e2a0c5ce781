"""Multi-host start-up: every process runs the same command; this joins them into one job.

`jax.distributed.initialize` runs when the job is multi-process, which is known from (first
found wins) the launcher's flags, the environment (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
JAX_PROCESS_ID), or a Cloud TPU VM of a multi-host slice (jax reads the TPU metadata itself).
A single process needs nothing. On CPU hosts (tests, local multi-process runs) the
collectives go through gloo, whose context over all devices is created while joining
(`_connect_cpu_collectives`: the processes of a loaded host reach their first training step
tens of seconds apart, longer than gloo's set-up waits).

Two launchers leave parts of that description to the machines the job lands on:
  * Vertex AI (launch/xm_launch.py, GPU hosts): JAX_COORDINATOR_ADDRESS may be XManager's late
    binding `%objectname(workerpool0)%` (`xmanager.cloud.utils.get_workerpool_address`), and
    JAX_PROCESS_ID is left out. Both are read here from the CLUSTER_SPEC variable Vertex sets
    on every replica: the first address of the named worker pool, and this replica's rank
    (the replicas of the pools before its own, in pool order, plus its index in its pool).
    XManager's own `--xm_wrap_late_bindings` wrapper resolves the address before Python
    starts; without it this module does, so the job works either way.
  * Cloud TPU VMs started by sleep_jax.experiments.tpu_vm: SLEEP_JAX_DISTRIBUTED=cluster asks
    for `jax.distributed.initialize()` with no arguments; jax then reads the slice's workers
    from the TPU metadata, and a multislice job's MEGASCALE_* values from the TPU environment.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re

import jax

logger = logging.getLogger(__name__)

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
ENV_CLUSTER_SPEC = "CLUSTER_SPEC"  # set by Vertex AI on every replica of a custom job
ENV_FROM_CLUSTER = "SLEEP_JAX_DISTRIBUTED"  # "cluster": let jax find the cluster itself
_LATE_BINDING = re.compile(r"%objectname\((?P<pool>[^)]+)\)%")  # XManager's late binding


@dataclasses.dataclass(frozen=True)
class ProcessGroup:
  coordinator_address: str | None = None  # host:port of process 0
  num_processes: int | None = None
  process_id: int | None = None

  @property
  def given(self) -> bool:
    return any(v is not None for v in dataclasses.astuple(self))


def from_environment(environ=os.environ) -> ProcessGroup:
  """The process group the environment describes, CLUSTER_SPEC filling what it leaves out.

  Raises:
    ValueError: a late-bound coordinator without CLUSTER_SPEC, a CLUSTER_SPEC that does not
      name the pool, or a process count that disagrees with CLUSTER_SPEC's replicas.
  """
  as_int = lambda key: int(environ[key]) if environ.get(key) else None
  group = ProcessGroup(
    environ.get(ENV_COORDINATOR) or None, as_int(ENV_NUM_PROCESSES), as_int(ENV_PROCESS_ID)
  )
  spec = environ.get(ENV_CLUSTER_SPEC)
  if group.coordinator_address is None:
    return group  # CLUSTER_SPEC alone (every Vertex job has one) does not make a job multi-host
  late = _LATE_BINDING.fullmatch(group.coordinator_address)
  if spec is None:
    if late:
      raise ValueError(
        f"{ENV_COORDINATOR}={group.coordinator_address} is XManager's late-bound address of "
        f"worker pool {late.group('pool')!r}, which only Vertex AI's {ENV_CLUSTER_SPEC} "
        "resolves, and this process has no CLUSTER_SPEC: start it through Vertex AI, or set "
        f"{ENV_COORDINATOR} to host:port"
      )
    return group
  cluster = cluster_spec_group(spec)
  coordinator = group.coordinator_address
  if late:
    pools = json.loads(spec)["cluster"]
    if late.group("pool") not in pools:
      raise ValueError(
        f"{ENV_COORDINATOR}={coordinator}: {ENV_CLUSTER_SPEC} has no worker pool "
        f"{late.group('pool')!r} (it has {sorted(pools)})"
      )
    coordinator = pools[late.group("pool")][0]
  if group.num_processes is not None and group.num_processes != cluster.num_processes:
    raise ValueError(
      f"{ENV_NUM_PROCESSES}={group.num_processes} but {ENV_CLUSTER_SPEC} lists "
      f"{cluster.num_processes} replicas: the job was submitted for another number of hosts"
    )
  process_id = group.process_id if group.process_id is not None else cluster.process_id
  return ProcessGroup(coordinator, cluster.num_processes, process_id)


def cluster_spec_group(spec: str) -> ProcessGroup:
  """Vertex AI's CLUSTER_SPEC -> (the primary replica's address, replicas, this one's rank).

  Args:
    spec: the JSON text, e.g. {"cluster": {"workerpool0": ["h0:2222"], "workerpool1": ["h1:2222",
      "h2:2222"]}, "task": {"type": "workerpool1", "index": 1}}.

  Returns:
    The group: workerpool0's first address, the replica count, and the rank (the replicas of
    the pools before this one, in pool order, plus the index in its pool: 2 above).
  """
  try:
    value = json.loads(spec)
    pools, task = value["cluster"], value["task"]
    order = sorted(pools, key=lambda name: int(re.sub(r"\D", "", name) or 0))
    before = order[: order.index(task["type"])]
    rank = sum(len(pools[name]) for name in before) + int(task["index"])
    first = pools[order[0]][0]
  except (ValueError, KeyError, TypeError, IndexError) as e:
    raise ValueError(f"{ENV_CLUSTER_SPEC} is not Vertex AI's cluster description: {spec!r}") from e
  return ProcessGroup(first, sum(len(hosts) for hosts in pools.values()), rank)


def _on_multi_host_cloud_tpu(environ=os.environ) -> bool:
  """A Cloud TPU VM that is one of several hosts of a slice (or of several slices)."""
  hosts = environ.get("TPU_WORKER_HOSTNAMES", "")
  return "," in hosts or bool(environ.get("MEGASCALE_COORDINATOR_ADDRESS"))


def _connect_cpu_collectives() -> None:
  """One sum over every device of the job, right after the processes joined (CPU only).

  XLA's CPU collectives build a gloo context for a group of devices at the group's first
  collective, and every process must get there within 30 s (a fixed wait inside XLA; past it:
  "Gloo context initialization failed: DEADLINE_EXCEEDED: GetKeyValue() timed out"). On a
  loaded host one process can finish compiling the training step more than 30 s after the
  other, and the first step failed there in the early one. Just after
  `jax.distributed.initialize` (which returns in every process together) the context of all
  devices is built here; later collectives over all devices reuse it and wait as long as
  their peers need. Collectives over a subset of the devices (a mesh axis that spans
  processes but not the whole job) still build their own context at their first use.

  Raises:
    RuntimeError: the sum is wrong (the processes do not see the same devices).
  """
  import jax.numpy as jnp
  import numpy as np

  mesh = jax.make_mesh((jax.device_count(),), ("all",))
  ones = jax.make_array_from_process_local_data(
    jax.NamedSharding(mesh, jax.P("all")), np.ones((jax.local_device_count(),), np.int32)
  )
  total = jax.jit(jnp.sum, out_shardings=jax.NamedSharding(mesh, jax.P()))(ones)
  if int(total) != jax.device_count():
    raise RuntimeError(f"a sum over the job's {jax.device_count()} devices gave {int(total)}")


def initialize(group: ProcessGroup | None = None, *, environ=os.environ) -> bool:
  """Joins this process to its multi-process job, if it is one. Call before any jax work.

  Args:
    group: what the launcher's flags say (any field None: taken from the environment).

  Returns:
    Whether `jax.distributed.initialize` ran.

  Raises:
    ValueError: a partial description (e.g. a coordinator but no process id), naming the
      missing flag or variable.
  """
  flags = group or ProcessGroup()
  env = from_environment(environ)
  merged = ProcessGroup(
    *(
      f if f is not None else e
      for f, e in zip(dataclasses.astuple(flags), dataclasses.astuple(env))
    )
  )
  if merged.given:
    missing = [name for name, value in dataclasses.asdict(merged).items() if value is None]
    if missing:
      raise ValueError(
        f"a multi-process run needs coordinator_address, num_processes and "
        f"process_id; missing {missing} (flags --{missing[0]} or the "
        f"{ENV_COORDINATOR} / {ENV_NUM_PROCESSES} / {ENV_PROCESS_ID} variables)"
      )
    if not 0 <= merged.process_id < merged.num_processes:
      raise ValueError(f"process_id={merged.process_id} is not in [0, {merged.num_processes})")
    if merged.num_processes == 1:
      return False
    # Collectives between CPU devices of different processes (harmless on accelerators).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
      coordinator_address=merged.coordinator_address,
      num_processes=merged.num_processes,
      process_id=merged.process_id,
    )
    if jax.devices()[0].platform == "cpu":
      _connect_cpu_collectives()
  elif environ.get(ENV_FROM_CLUSTER) == "cluster" or _on_multi_host_cloud_tpu(environ):
    jax.distributed.initialize()  # jax reads the slice's hosts from the TPU metadata
  else:
    return False
  logger.info(
    "process %d of %d, %d local of %d devices",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )
  return True
