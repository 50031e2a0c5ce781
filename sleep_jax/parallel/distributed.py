"""Multi-host start-up: every process runs the same command; this joins them into one job.

`jax.distributed.initialize` runs when the job is multi-process, which is known from (first
found wins) the launcher's flags, the environment (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
JAX_PROCESS_ID), or a Cloud TPU VM of a multi-host slice (jax reads the TPU metadata itself).
A single process needs nothing. On CPU hosts (tests, local multi-process runs) the
collectives go through gloo.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import jax

logger = logging.getLogger(__name__)

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"


@dataclasses.dataclass(frozen=True)
class ProcessGroup:
  coordinator_address: str | None = None  # host:port of process 0
  num_processes: int | None = None
  process_id: int | None = None

  @property
  def given(self) -> bool:
    return any(v is not None for v in dataclasses.astuple(self))


def from_environment(environ=os.environ) -> ProcessGroup:
  as_int = lambda key: int(environ[key]) if environ.get(key) else None
  return ProcessGroup(
    environ.get(ENV_COORDINATOR) or None, as_int(ENV_NUM_PROCESSES), as_int(ENV_PROCESS_ID)
  )


def _on_multi_host_cloud_tpu(environ=os.environ) -> bool:
  """A Cloud TPU VM that is one of several hosts of a slice (or of several slices)."""
  hosts = environ.get("TPU_WORKER_HOSTNAMES", "")
  return "," in hosts or bool(environ.get("MEGASCALE_COORDINATOR_ADDRESS"))


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
  elif _on_multi_host_cloud_tpu(environ):
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
