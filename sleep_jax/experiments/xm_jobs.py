"""The XManager objects of a sweep: what launch/xm_launch.py submits, and what its dry run prints.

Built with the real xmanager (the `xm` extra, `xmanager>=0.8.3`, imported inside these functions
so that the rest of the package never needs it) from sleep_jax.experiments.placement's plain
work units:
  * one container (`xm.python_container`) of the repository's files, packaged once;
  * per run one work unit: an `xm.Job`, or for several GPU hosts an `xm.JobGroup(coordinator=...,
    workers=...)` whose jobs Vertex AI makes worker pools 0 and 1;
  * on Vertex AI, the machine type of the GPUs: xm_local's Vertex executor has no field for it
    and picks `n1-standard-4` for an H100 (which Vertex refuses), so `vertex_machine_types()`
    wraps `xmanager.cloud.vertex.get_machine_spec` while submitting to set the machine type of
    placement.VERTEX_MACHINE_TYPES. The wrapped function is the one Vertex's launch calls for
    each worker pool, so the dry run prints what it returns.
"""

from __future__ import annotations

import contextlib
import os
import re
from typing import Any

from sleep_jax.experiments import placement as placement_lib
from sleep_jax.experiments.jobs import ENTRYPOINT


def container(placement: placement_lib.Placement, source_dir: str, base_image: str):
  """The packageable of every job: `source_dir` (a copy of the repository's files, named
  sleep_jax) installed in `base_image` with the placement's extra and gcsfs (gs:// run dirs).

  Returns:
    An xm.Packageable for `experiment.package`.
  """
  from xmanager import xm, xm_local

  spec = {"local": xm_local.Local, "vertex": xm_local.Vertex}[placement.executor].Spec()
  name = os.path.basename(os.path.normpath(source_dir))
  return xm.python_container(
    executor_spec=spec,
    path=source_dir,
    base_image=base_image,
    docker_instructions=[
      f"COPY {name}/ {name}",
      f"WORKDIR {name}",
      f'RUN python -m pip install -e ".[{placement.extra}]" gcsfs',
    ],
    entrypoint=xm.CommandList([" ".join(ENTRYPOINT)]),
  )


def job(spec: placement_lib.JobSpec, executable: Any):
  """One xm.Job: the executor with its requirements, the run's flags and environment."""
  from xmanager import xm, xm_local

  requirements = xm.JobRequirements(**spec.requirements)
  if spec.executor == "Local":
    options = xm_local.DockerOptions(volumes=dict(spec.volumes)) if spec.volumes else None
    executor = xm_local.Local(requirements=requirements, docker_options=options)
  else:
    executor = xm_local.Vertex(requirements=requirements)
  return xm.Job(
    executable=executable, executor=executor, name=spec.name, args=spec.args, env_vars=spec.env
  )


def work_unit(unit: placement_lib.WorkUnit, executable: Any):
  """The xm.Job of a one-job work unit, or the xm.JobGroup of several (in their order)."""
  from xmanager import xm

  jobs = {spec.name: job(spec, executable) for spec in unit.jobs}
  if len(jobs) == 1:
    return next(iter(jobs.values()))
  return xm.JobGroup(**jobs)


def jobs_of(unit_object) -> list:
  """The xm.Jobs of a work unit object, in the order Vertex makes worker pools of them."""
  from xmanager import xm

  return list(unit_object.jobs.values()) if isinstance(unit_object, xm.JobGroup) else [unit_object]


def machine_type(xm_job) -> str | None:
  """The Vertex AI machine type of a job's GPUs (placement.VERTEX_MACHINE_TYPES), or None."""
  requirements = xm_job.executor.requirements
  if requirements.accelerator is None:
    return None
  name = requirements.accelerator.name.lower()
  count = int(requirements.task_requirements[requirements.accelerator])
  return placement_lib.VERTEX_MACHINE_TYPES.get(name, {}).get(count)


@contextlib.contextmanager
def vertex_machine_types():
  """While open, Vertex AI worker pools get the machine type of their GPUs (`machine_type`)."""
  from xmanager.cloud import vertex

  original = vertex.get_machine_spec

  def get_machine_spec(xm_job):
    spec = original(xm_job)
    wanted = machine_type(xm_job)
    if wanted:
      spec["machine_type"] = wanted
    return spec

  vertex.get_machine_spec = get_machine_spec
  try:
    yield
  finally:
    vertex.get_machine_spec = original


def check_late_binding_wrapper(units: list[placement_lib.WorkUnit], wrapped: bool) -> None:
  """XManager's `--xm_wrap_late_bindings` entrypoint passes the arguments through
  `tr -d '[],'` and word splitting: refuse arguments it would change, before submitting.

  Raises:
    ValueError: naming the argument (the run's dirs and overrides need no such characters;
      sleep_jax.parallel.distributed resolves the late binding without the wrapper).
  """
  if not wrapped:
    return
  for unit in units:
    for spec in unit.jobs:
      for key, value in spec.args.items():
        if re.search(r"[\[\],\s]", f"{key}{value}"):
          raise ValueError(
            f"run {unit.name}: --{key}={value} would be changed by --xm_wrap_late_bindings "
            "(it deletes [ ] , and splits on spaces); drop that flag: sleep_jax resolves the "
            "coordinator's late binding from CLUSTER_SPEC itself"
          )


def describe(units: list[placement_lib.WorkUnit], packageable: Any, *, vertex: bool) -> list[str]:
  """The dry run's lines: the packageable, then every work unit's xm objects as built.

  Args:
    units: the sweep's work units.
    packageable: `container(...)`.
    vertex: also print each job's Vertex AI machine spec (needs xmanager.cloud.vertex).
  """
  from xmanager.xm import utils as xm_utils

  lines = [f"# container, packaged once: {packageable!r}"]
  for unit in units:
    unit_object = work_unit(unit, executable="<the packaged container>")
    kind = type(unit_object).__name__
    lines.append(f"# work unit {unit.name}: xm.{kind} of {len(unit.jobs)} job(s)")
    for xm_job in jobs_of(unit_object):
      lines.append(f"[{xm_job.name}] executor={xm_job.executor!r}")
      if vertex:
        with vertex_machine_types():
          from xmanager.cloud import vertex as vertex_lib

          spec = vertex_lib.get_machine_spec(xm_job)
        replicas = xm_job.executor.requirements.replicas
        lines.append(f"[{xm_job.name}]   vertex machine_spec={spec} replica_count={replicas}")
      lines.append(f"[{xm_job.name}]   env_vars={xm_job.env_vars}")
      lines.append(f"[{xm_job.name}]   args={xm_job.args.to_list(xm_utils.ARGV_ESCAPER)}")
  return lines


def submit(
  units: list[placement_lib.WorkUnit], packageable: Any, *, title: str, vertex: bool
) -> None:
  """Packages the container once and adds one work unit per run to a new xm_local experiment."""
  from xmanager import xm_local

  with contextlib.ExitStack() as stack:
    if vertex:
      stack.enter_context(vertex_machine_types())  # open until the experiment has launched all
    experiment = stack.enter_context(xm_local.create_experiment(experiment_title=title))
    [executable] = experiment.package([packageable])
    for unit in units:
      experiment.add(work_unit(unit, executable))
