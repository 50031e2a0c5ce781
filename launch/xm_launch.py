"""Submit a sweep (configs/sweeps/*.py): one XManager work unit, or one Cloud TPU queued resource,
per run of the grid.

  python launch/xm_launch.py --config=configs/sweeps/rule110_paper.py --dry_run
  # GPU hosts on Vertex AI: per run one job group, a coordinator and 1 worker, 8 H100s each
  python launch/xm_launch.py --config=configs/sweeps/rule110_paper.py --platform=gpu \
      --executor=vertex --num_hosts=2 --gpus_per_host=8 --gpu_type=h100 \
      --sweep_dir=gs://BUCKET/sweeps/rule110_paper --dry_run
  # One GPU host through XManager's Local executor (Docker on this machine)
  python launch/xm_launch.py --config=configs/sweeps/rule110_gpu.py --platform=gpu \
      --gpus_per_host=8
  # Cloud TPU: per run a queued resource of one v5e-16 slice (or --num_slices=2: multislice)
  python launch/xm_launch.py --config=configs/sweeps/rule110_paper.py --platform=tpu \
      --topology=v5e-16 --gcp_zone=us-west4-a --sweep_dir=gs://BUCKET/sweeps/rule110_paper --dry_run

Each run is `python launch/main.py --config=<base> --workdir=<run dir> --config.<key>=<value>...`
of `sleep_jax.experiments.sweeps.expand_runs`, the grid `launch/sweep.py` runs in one process.
Executors: `local` and `vertex` are XManager's (xm_local; sleep_jax.experiments.xm_jobs builds
the objects), `tpu_vm` is Cloud TPU queued resources through gcloud (sleep_jax.experiments.tpu_vm:
no xm_local executor starts TPU v4/v5e/v5p/v6e). XManager's own flags (--xm_*) pass through.
`--dry_run` prints what submit would send, for every run: the XManager objects themselves when
xmanager is installed (else the exact arguments they are built from), or the gcloud commands and
startup scripts; then the runs' estimated cost. Submitting writes sweep.json and each run's
sweep_run.json to the sweep dir first, so `python -m sleep_jax.experiments.report <sweep_dir>`
names the arms.
"""

from __future__ import annotations

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/ imports

from absl import app, flags
from ml_collections import config_flags

try:  # XManager's flags (--xm_*), parsed with ours so they reach xmanager when it submits
  from xmanager import xm_flags as _xm_flags
except ImportError:  # the dry run needs no xmanager
  _xm_flags = None

from sleep_jax import console, paths
from sleep_jax.experiments import jobs as jobs_lib
from sleep_jax.experiments import placement as placement_lib
from sleep_jax.experiments import snapshot, sweeps, tpu_vm
from sleep_jax.experiments.config_files import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Sweep config, e.g. configs/sweeps/rule110_paper.py."
)
_SWEEP_DIR = flags.DEFINE_string(
  "sweep_dir", None, "Sweep directory (default runs/sweeps/<name>; gs://... for remote runs)."
)
_ONLY = flags.DEFINE_string("only", None, "Submit only the arm with this name.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print what submit would send; submit nothing.")
_PLATFORM = flags.DEFINE_enum(
  "platform",
  "local",
  list(placement_lib.PLATFORMS),
  "local (this machine's CPU), gpu (GPU hosts) or tpu (Cloud TPU slices).",
)
_EXECUTOR = flags.DEFINE_enum(
  "executor",
  None,
  list(placement_lib.EXECUTORS),
  "local or vertex (XManager), tpu_vm (Cloud TPU queued resources). Default: tpu_vm for "
  "--platform=tpu, else local.",
)
_TOPOLOGY = flags.DEFINE_string("topology", None, "tpu: each run's slice, e.g. v5e-16, v5p-32.")
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "tpu: slices per run (multislice).")
_NUM_HOSTS = flags.DEFINE_integer("num_hosts", 1, "gpu: hosts per run, one process each.")
_GPUS_PER_HOST = flags.DEFINE_integer("gpus_per_host", 1, "gpu: GPUs per host.")
_GPU_TYPE = flags.DEFINE_enum(
  "gpu_type", "h100", list(placement_lib.XM_GPU_TYPES), "gpu: XManager's name of the GPU."
)
_BASE_IMAGE = flags.DEFINE_string(
  "base_image", "python:3.11", "XManager: the Docker base image of the job container."
)
_GCP_PROJECT = flags.DEFINE_string("gcp_project", None, "tpu_vm: project (default: gcloud's).")
_GCP_ZONE = flags.DEFINE_string("gcp_zone", None, "tpu_vm: the zone of the TPUs.")
_TPU_RUNTIME = flags.DEFINE_string(
  "tpu_runtime_version", None, "tpu_vm: the TPU VM image (default: the generation's)."
)
_TPU_PROVISIONING = flags.DEFINE_enum(
  "tpu_provisioning", "on-demand", list(tpu_vm.PROVISIONING), "tpu_vm: how TPUs are obtained."
)
_TPU_SERVICE_ACCOUNT = flags.DEFINE_string(
  "tpu_service_account", None, "tpu_vm: the TPU VMs' service account (default: the project's)."
)
_KEEP_TPU = flags.DEFINE_bool(
  "keep_tpu", False, "tpu_vm: keep each run's TPU VMs when it ends (default: deleted)."
)
flags.mark_flags_as_required(["config"])


def make_placement() -> placement_lib.Placement:
  executor = _EXECUTOR.value or ("tpu_vm" if _PLATFORM.value == "tpu" else "local")
  return placement_lib.Placement(
    platform=_PLATFORM.value,
    executor=executor,
    topology=_TOPOLOGY.value,
    num_slices=_NUM_SLICES.value,
    num_hosts=_NUM_HOSTS.value,
    gpus_per_host=_GPUS_PER_HOST.value,
    gpu_type=_GPU_TYPE.value,
  )


def run_tpu_vm(sweep_config, sweep_dir, jobs, placement) -> None:
  """Dry run or submission of the runs as Cloud TPU queued resources (gcloud)."""
  cloud = tpu_vm.CloudTpu(
    zone=_GCP_ZONE.value,
    project=_GCP_PROJECT.value,
    runtime_version=_TPU_RUNTIME.value,
    provisioning=_TPU_PROVISIONING.value,
    service_account=_TPU_SERVICE_ACCOUNT.value,
    keep=_KEEP_TPU.value,
  )
  try:
    from xmanager import xm

    slice_requirement = repr(xm.JobRequirements(**placement.requirements()))
  except ImportError:
    slice_requirement = f"xm.JobRequirements(**{placement.requirements()})"
  files = snapshot.source_files(REPO)
  code = snapshot.tarball(REPO, files)
  code_uri = tpu_vm.code_uri(sweep_dir, snapshot.revision(code))
  resources = tpu_vm.queued_resources(
    jobs, placement, cloud, sweep=sweep_config.name, code=code_uri
  )
  if _DRY_RUN.value:
    print(f"# the code: {len(files)} files, {len(code) / 1e6:.2f} MB -> {code_uri}")
    print(f"# one slice as XManager's requirement (xm_cloud's GKE executor): {slice_requirement}")
    print("\n".join(tpu_vm.describe(resources)))
    return
  paths.check_available(sweep_dir)
  sweeps.write_sweep_files(sweep_config, sweep_dir, only=_ONLY.value)
  tpu_vm.submit(resources, code=code, code_uri=code_uri)


def run_xmanager(sweep_config, sweep_dir, jobs, placement) -> None:
  """Dry run or submission of the runs as XManager work units."""
  # The Local executor's containers write a local sweep dir through a mount at the same path.
  local_dir = placement.executor == "local" and not paths.is_remote(sweep_dir)
  volumes = {sweep_dir: sweep_dir} if local_dir else None
  units = [placement_lib.work_unit(job, placement, volumes) for job in jobs]
  try:
    from xmanager import xm  # noqa: F401  (the `xm` extra)

    from sleep_jax.experiments import xm_jobs
  except ImportError:
    if not _DRY_RUN.value:
      raise app.UsageError('submitting needs xmanager: python -m pip install -e ".[xm]"') from None
    print("# xmanager is not installed: the arguments of the XManager objects submit builds")
    print("\n".join(placement_lib.describe(units)))
    return
  vertex = placement.executor == "vertex"
  xm_jobs.check_late_binding_wrapper(units, wrapped=_xm_flags.WRAP_LATE_BINDINGS.value)
  files = snapshot.source_files(REPO)
  revision = snapshot.revision(snapshot.tarball(REPO, files))
  source_dir = os.path.join(tempfile.gettempdir(), f"sleep_jax_xm_{revision}", "sleep_jax")
  packageable = xm_jobs.container(placement, source_dir, _BASE_IMAGE.value)
  if _DRY_RUN.value:
    print("\n".join(xm_jobs.describe(units, packageable, vertex=vertex)))
    return
  if placement.executor != "local":
    paths.check_available(sweep_dir)
  sweeps.write_sweep_files(sweep_config, sweep_dir, only=_ONLY.value)
  snapshot.stage(REPO, files, source_dir)
  xm_jobs.submit(units, packageable, title=sweep_config.name, vertex=vertex)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  verbosity = flags.FLAGS["verbosity"]
  console.configure(verbosity=verbosity.value if verbosity.present else None)  # quiet libraries
  sweep_config = _CONFIG.value
  sweep_dir = paths.absolute(_SWEEP_DIR.value or os.path.join("runs", "sweeps", sweep_config.name))
  try:
    placement = make_placement()
    placement.check_sweep_dir(sweep_dir)
    jobs = jobs_lib.make_jobs(sweep_config, sweep_dir, only=_ONLY.value)
    load_config(sweep_config.base)  # a missing base config fails here, before anything is sent
    if placement.executor == "tpu_vm":
      run_tpu_vm(sweep_config, sweep_dir, jobs, placement)
    else:
      run_xmanager(sweep_config, sweep_dir, jobs, placement)
  except (ValueError, RuntimeError) as e:
    raise app.UsageError(str(e)) from e
  if _DRY_RUN.value:
    print(f"{len(jobs)} runs on {placement.platform} ({placement.executor} executor)")
    print("\n".join(jobs_lib.describe_costs(sweep_config, sweep_dir, only=_ONLY.value)))


if __name__ == "__main__":
  if _xm_flags is None and any(arg.startswith("--xm_") for arg in sys.argv[1:]):
    sys.exit('--xm_* flags are XManager\'s: python -m pip install -e ".[xm]"')
  app.run(main)
