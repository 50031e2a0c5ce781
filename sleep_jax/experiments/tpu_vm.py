"""Cloud TPU runs through queued resources: one `gcloud compute tpus queued-resources create` per run.

The route for TPU v4, v5e, v5p and v6e (no xm_local executor starts those, see
sleep_jax.experiments.placement). For each run of a sweep, `launch/xm_launch.py
--executor=tpu_vm` (a) uploads the code once (a tarball of the repository's files) next to the
sweep, (b) creates one queued resource holding the run's slice, or its `num_slices` slices as one
multislice request (`--node-count`), with a startup script, and returns. The TPU service starts
the VMs when capacity frees up; every worker of every slice then runs the startup script:
  1. first boot only: fetch the code, install Python 3.11 and the package (`.[tpu]` and gcsfs)
     with uv (the TPU images carry Python 3.10);
  2. run `launch/main.py` with the run's flags and SLEEP_JAX_DISTRIBUTED=cluster, so that
     `jax.distributed.initialize()` reads the workers from the TPU metadata and, across slices,
     the MEGASCALE_* values the queued resource sets (sleep_jax.parallel.distributed);
  3. copy its console log into the run's workdir (`tpu_logs/<node>-<worker>.log`);
  4. delete the queued resource (unless --keep_tpu) when the run finished or failed; a run that
     exits 0 unfinished was stopped by SIGTERM (a maintenance event): the VM restarts, the script
     runs again and the run resumes from its checkpoint.
Runs write to the gs:// sweep dir only: a TPU VM's disk goes with it. The VMs' service account
needs write access to the bucket (and roles/tpu.admin to delete its queued resource).
Plain data and argv lists: the dry run prints exactly the commands and scripts submit uses.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shlex
import subprocess
import tempfile

from sleep_jax import paths
from sleep_jax.experiments.jobs import Job
from sleep_jax.experiments.placement import Placement

# The TPU VM image of each generation (Cloud TPU runtime versions for JAX).
RUNTIME_VERSIONS = {
  "v4": "tpu-ubuntu2204-base",
  "v5e": "v2-alpha-tpuv5-lite",
  "v5p": "v2-alpha-tpuv5",
  "v6e": "v2-alpha-tpuv6e",
}
PROVISIONING = ("on-demand", "spot", "reserved")
SCOPES = "https://www.googleapis.com/auth/cloud-platform"  # the VMs read the code, write the runs
WORKDIR_ON_VM = "/opt/sleep_jax"


@dataclasses.dataclass(frozen=True)
class CloudTpu:
  """Where and how the queued resources are created.

  Attributes:
    zone: e.g. "us-west4-a" (TPU types are zonal).
    project: the Google Cloud project (None: gcloud's configured project).
    runtime_version: the TPU VM image (None: RUNTIME_VERSIONS of the generation).
    provisioning: "on-demand", "spot" or "reserved".
    service_account: the VMs' service account (None: the project's default).
    keep: keep the TPU VMs when the run ends (default: the run's worker 0 deletes them).
  """

  zone: str
  project: str | None = None
  runtime_version: str | None = None
  provisioning: str = "on-demand"
  service_account: str | None = None
  keep: bool = False

  def __post_init__(self):
    if not self.zone:
      raise ValueError("--executor=tpu_vm needs --gcp_zone (a zone with the TPU type)")
    if self.provisioning not in PROVISIONING:
      raise ValueError(f"--tpu_provisioning={self.provisioning!r}: use one of {PROVISIONING}")

  def location_flags(self) -> list[str]:
    return [f"--zone={self.zone}", *([f"--project={self.project}"] if self.project else [])]


@dataclasses.dataclass(frozen=True)
class QueuedResource:
  """One run as a Cloud TPU queued resource.

  Attributes:
    name: the queued resource's id (and its node id, or node prefix for several slices).
    run: the run's workdir relative to the sweep dir.
    startup_script: what every worker of every slice runs at boot.
    create: the gcloud argv that creates it; `STARTUP_SCRIPT_FILE` stands for the file holding
      the startup script (submit writes the script there first).
  """

  name: str
  run: str
  startup_script: str
  create: list[str]


STARTUP_SCRIPT_FILE = "{startup_script_file}"


def resource_name(sweep: str, run: str) -> str:
  """A queued-resource id for a run: lowercase letters, digits and hyphens, starting with a
  letter, at most 50 characters; a hash of the full name keeps truncated names apart."""
  full = f"{sweep}/{run}"
  slug = re.sub(r"[^a-z0-9]+", "-", full.lower()).strip("-")
  digest = hashlib.sha1(full.encode()).hexdigest()[:6]
  return f"sj-{slug[:38].rstrip('-')}-{digest}"


def code_uri(sweep_dir: str, revision: str) -> str:
  """Where the code tarball goes: beside the runs, named by the snapshot's content hash."""
  return paths.join(sweep_dir, "code", f"sleep_jax-{revision}.tar.gz")


def startup_script(
  job: Job, *, name: str, code: str, cloud: CloudTpu, num_steps: int, extra: str = "tpu"
) -> str:
  """The bash script every TPU VM worker of the run executes at boot (as root).

  Args:
    job: the run (its launch/main.py flags).
    name: the queued resource's id (deleted by worker 0 of each slice when the run ends).
    code: the gs:// URI of the code tarball.
    cloud: zone, project and whether to keep the VMs.
    num_steps: the run's last step (a run that reached it is finished).
    extra: the package extra to install.
  """
  workdir = job.args["workdir"]
  command = shlex.join([".venv/bin/python", *job.command()[1:]])
  finished_check = shlex.join(
    [
      ".venv/bin/python",
      "-c",
      "import sys; from sleep_jax import rundir; "
      f"sys.exit(0 if rundir.RunDir({workdir!r}).is_finished({num_steps}) else 1)",
    ]
  )
  delete = shlex.join(
    [
      "gcloud",
      "compute",
      "tpus",
      "queued-resources",
      "delete",
      name,
      *cloud.location_flags(),
      "--force",
      "--async",
      "--quiet",
    ]
  )
  metadata = "http://metadata.google.internal/computeMetadata/v1/instance"
  keep = "true" if cloud.keep else "false"
  return f"""#!/bin/bash
# sleep_jax run {job.name}: every worker of queued resource {name} runs this at boot.
set -uo pipefail
export HOME=/root PATH="/root/.local/bin:$PATH"
mkdir -p {WORKDIR_ON_VM} && cd {WORKDIR_ON_VM}
if [ ! -x .venv/bin/python ]; then  # first boot: the code, Python 3.11 and the package
  gcloud storage cp {shlex.quote(code)} code.tar.gz && tar xzf code.tar.gz || exit 1
  curl -LsSf https://astral.sh/uv/install.sh | sh || exit 1
  uv venv --python 3.11 .venv && uv pip install --python .venv/bin/python -e ".[{extra}]" gcsfs \\
    || exit 1
fi
meta() {{ curl -s -H Metadata-Flavor:Google "{metadata}/$1"; }}
WORKER=$(meta attributes/agent-worker-number)
NODE=$(meta name)
SLEEP_JAX_DISTRIBUTED=cluster {command} 2>&1 | tee /var/log/sleep_jax_run.log
STATUS=${{PIPESTATUS[0]}}
gcloud storage cp /var/log/sleep_jax_run.log \\
  {shlex.quote(paths.join(workdir, "tpu_logs"))}/"$NODE-$WORKER.log" || true
{finished_check}
FINISHED=$?
# Exit 0 unfinished = SIGTERM (a maintenance event): the VM restarts and this script resumes.
if [ "{keep}" = false ] && [ "$WORKER" = 0 ] && {{ [ "$FINISHED" = 0 ] || [ "$STATUS" != 0 ]; }}; then
  {delete} || true
fi
exit "$STATUS"
"""


def create_command(placement: Placement, cloud: CloudTpu, name: str) -> list[str]:
  """The gcloud argv that queues the run's slice (or slices) with the startup script."""
  tpu = placement.tpu
  nodes = (
    [f"--node-id={name}"]
    if placement.num_slices == 1
    else [f"--node-count={placement.num_slices}", f"--node-prefix={name}"]
  )
  provisioning = {"on-demand": [], "spot": ["--spot"], "reserved": ["--reserved"]}
  account = [f"--service-account={cloud.service_account}"] if cloud.service_account else []
  return [
    "gcloud",
    "compute",
    "tpus",
    "queued-resources",
    "create",
    name,
    *cloud.location_flags(),
    f"--accelerator-type={tpu.accelerator_type}",
    f"--runtime-version={cloud.runtime_version or RUNTIME_VERSIONS[tpu.generation]}",
    *nodes,
    *provisioning[cloud.provisioning],
    f"--scopes={SCOPES}",
    *account,
    f"--metadata-from-file=startup-script={STARTUP_SCRIPT_FILE}",
  ]


def queued_resources(
  jobs: list[Job], placement: Placement, cloud: CloudTpu, *, sweep: str, code: str
) -> list[QueuedResource]:
  """One queued resource per run.

  Args:
    jobs: the sweep's runs (sleep_jax.experiments.jobs.make_jobs).
    placement: a tpu placement with the tpu_vm executor.
    cloud: zone, project, image, provisioning.
    sweep: the sweep's name (part of every resource id).
    code: the gs:// URI of the code tarball (`code_uri`).
  """
  if placement.executor != "tpu_vm":
    raise ValueError("queued resources are the tpu_vm executor's runs")
  resources = []
  for job in jobs:
    name = resource_name(sweep, job.name)
    script = startup_script(
      job, name=name, code=code, cloud=cloud, num_steps=job.num_steps, extra=placement.extra
    )
    resources.append(QueuedResource(name, job.name, script, create_command(placement, cloud, name)))
  return resources


def describe(resources: list[QueuedResource]) -> list[str]:
  """The dry run's lines: per run the gcloud command and the startup script it installs."""
  lines = []
  for resource in resources:
    lines.append(f"# queued resource {resource.name} for run {resource.run}")
    lines.append(shlex.join(resource.create))
    lines.append(f"# {STARTUP_SCRIPT_FILE} holds:")
    lines.extend(f"#   {line}" for line in resource.startup_script.splitlines())
  return lines


def submit(resources: list[QueuedResource], *, code: bytes, code_uri: str, run=subprocess.run):
  """Uploads the code (unless a run of the same code did) and creates every queued resource.

  Args:
    resources: `queued_resources(...)`.
    code: the tarball's bytes (sleep_jax.experiments.snapshot.tarball).
    code_uri: where it goes (`code_uri`).
    run: runs one argv, raising on failure (subprocess.run; tests pass a recorder).
  """
  if not paths.exists(code_uri):
    paths.write_bytes(code_uri, code)
  with tempfile.TemporaryDirectory(prefix="sleep_jax_tpu_") as scripts:
    for resource in resources:
      script = os.path.join(scripts, f"{resource.name}.sh")
      with open(script, "w") as f:
        f.write(resource.startup_script)
      print(f"queueing {resource.name} for run {resource.run}", flush=True)
      run([arg.replace(STARTUP_SCRIPT_FILE, script) for arg in resource.create], check=True)
