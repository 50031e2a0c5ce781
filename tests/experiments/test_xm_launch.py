"""launch/xm_launch.py: XManager work units that XManager accepts, Cloud TPU queued resources,
and a dry run that prints what submit sends.

The XManager tests build the real objects (xmanager>=0.8.3, the `xm` extra) and run xmanager's
own submission code for Vertex AI and the Local executor with only the network (aiplatform,
docker) replaced; they skip where xmanager is not installed. The placement, queued-resource and
"no xmanager" tests need none.
"""

import asyncio
import json
import os
import subprocess
import sys
from unittest import mock

import pytest
from fake_gcs import installed

from sleep_jax.experiments import config_files, jobs, snapshot, tpu_vm
from sleep_jax.experiments import placement as placement_lib
from sleep_jax.parallel import distributed

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SWEEP = "gs://bucket/sweeps/rule110_gpu"

# The placements the issue names, as launch/xm_launch.py flags.
NAMED = {
  "tpu v5e-16": ["--platform=tpu", "--topology=v5e-16"],
  "tpu v5p-32": ["--platform=tpu", "--topology=v5p-32"],
  "tpu 2 x v5e-16": ["--platform=tpu", "--topology=v5e-16", "--num_slices=2"],
  "one 8-GPU host": ["--platform=gpu", "--executor=vertex", "--gpus_per_host=8"],
  "two 8-GPU hosts": ["--platform=gpu", "--executor=vertex", "--gpus_per_host=8", "--num_hosts=2"],
}


def placement(**kwargs):
  return placement_lib.Placement(**kwargs)


def sweep_jobs(sweep_dir=SWEEP, name="rule110_gpu"):
  config = config_files.load_config(os.path.join(REPO, "configs", "sweeps", f"{name}.py"))
  return jobs.make_jobs(config, sweep_dir)


def dry_run(*flags_, sweep="rule110_gpu", sweep_dir=SWEEP, env=None):
  return subprocess.run(
    [
      sys.executable,
      "launch/xm_launch.py",
      f"--config=configs/sweeps/{sweep}.py",
      "--dry_run",
      f"--sweep_dir={sweep_dir}",
      *flags_,
    ],
    capture_output=True,
    text=True,
    cwd=REPO,
    timeout=180,
    env=env,
  )


# --- Placements, as plain data (no xmanager). ----------------------------------------------


@pytest.mark.parametrize(
  "name, generation, grid, chips, accelerator_type",
  [
    ("v5e-16", "v5e", "4x4", 16, "v5litepod-16"),
    ("v5e:4x4", "v5e", "4x4", 16, "v5litepod-16"),
    ("v5p-32", "v5p", "2x2x4", 16, "v5p-32"),
    ("v4-32", "v4", "2x2x4", 16, "v4-32"),
    ("v6e-16", "v6e", "4x4", 16, "v6e-16"),
  ],
)
def test_a_tpu_slice_in_every_systems_names(name, generation, grid, chips, accelerator_type):
  tpu = placement_lib.tpu_slice(name)
  assert (tpu.generation, tpu.grid, tpu.chips) == (generation, grid, chips)
  assert tpu.xm_resource == f"tpu_{generation}" and tpu.accelerator_type == accelerator_type


def test_requirements_carry_xmanagers_names_and_grid_values():
  tpu = placement(platform="tpu", executor="tpu_vm", topology="v5e-16")
  assert tpu.requirements() == {"tpu_v5e": "4x4"}  # the grid alone, not jax's "v5e:4x4"
  v5p = placement(platform="tpu", executor="tpu_vm", topology="v5p-32")
  assert v5p.requirements() == {"tpu_v5p": "2x2x4"}  # tpu_v5p, not tpu_v5
  vertex = placement(platform="gpu", executor="vertex", gpus_per_host=8, num_hosts=3)
  assert vertex.requirements() == {"h100": 8} and vertex.machine_type == "a3-highgpu-8g"
  assert vertex.requirements(replicas=2) == {"h100": 8, "replicas": 2}
  local = placement(platform="gpu", executor="local", gpus_per_host=8)
  assert local.requirements() == {"local_gpu": 8} and local.machine_type is None
  h200 = placement(platform="gpu", executor="vertex", gpus_per_host=8, gpu_type="h200")
  assert h200.machine_type == "a3-ultragpu-8g"
  a100 = placement(platform="gpu", executor="vertex", gpus_per_host=4, gpu_type="a100_80gib")
  assert a100.machine_type == "a2-ultragpu-4g"


@pytest.mark.parametrize(
  "kwargs, message",
  [
    (dict(platform="tpu", executor="tpu_vm"), "needs a topology"),
    (dict(platform="tpu", executor="tpu_vm", topology="v9-8"), "unknown TPU topology"),
    (dict(platform="tpu", executor="vertex", topology="v5e-16"), "knows TPU v2/v3 only"),
    (dict(platform="tpu", executor="local", topology="v5e-16"), "Use --executor=tpu_vm"),
    (dict(platform="gpu", executor="local", num_hosts=2), "one host"),
    (dict(platform="gpu", executor="vertex", gpus_per_host=3), r"hold \[1, 2, 4, 8\] x h100"),
    (dict(platform="gpu", executor="vertex", gpus_per_host=4, gpu_type="h200"), r"\[8\] x h200"),
    (dict(platform="gpu", executor="vertex", gpu_type="t4"), "no Vertex AI machine type"),
    (dict(platform="gpu", gpu_type="h800"), "not an XManager GPU"),
    (dict(platform="gpu", executor="tpu_vm"), "use it with --platform=tpu"),
    (dict(platform="local", topology="v5e-16"), "add --platform=tpu"),
    (dict(platform="local", num_hosts=2), "add --platform=gpu"),
    (dict(platform="gpu", num_hosts=0), ">= 1"),
  ],
)
def test_bad_placements_are_refused_by_name(kwargs, message):
  with pytest.raises(ValueError, match=message):
    placement(**kwargs)


def test_remote_executors_write_to_a_bucket():
  vertex = placement(platform="gpu", executor="vertex", gpus_per_host=8)
  with pytest.raises(ValueError, match="give --sweep_dir=gs://"):
    vertex.check_sweep_dir("runs/sweeps/x")
  vertex.check_sweep_dir("gs://bucket/x")
  placement(platform="gpu", gpus_per_host=8).check_sweep_dir("runs/sweeps/x")  # Local: mounted


def test_a_multi_host_gpu_run_is_one_job_group_of_a_coordinator_and_workers():
  [job, *_] = sweep_jobs()
  unit = placement_lib.work_unit(
    job, placement(platform="gpu", executor="vertex", gpus_per_host=8, num_hosts=4)
  )
  coordinator, workers = unit.jobs
  assert (coordinator.name, workers.name) == ("coordinator", "workers")
  assert coordinator.requirements == {"h100": 8}
  assert workers.requirements == {"h100": 8, "replicas": 3}
  for spec in unit.jobs:
    assert spec.env == {
      "JAX_COORDINATOR_ADDRESS": "%objectname(workerpool0)%",
      "JAX_NUM_PROCESSES": "4",
    }
    assert spec.args == job.args and spec.machine_type == "a3-highgpu-8g"
  single = placement_lib.work_unit(job, placement(platform="gpu", gpus_per_host=8))
  assert [(s.name, s.requirements, s.env) for s in single.jobs] == [("train", {"local_gpu": 8}, {})]


# --- Cloud TPU queued resources. -------------------------------------------------------------


def queued(topology, num_slices=1, **cloud):
  tpu = placement(platform="tpu", executor="tpu_vm", topology=topology, num_slices=num_slices)
  cloud = tpu_vm.CloudTpu(**{"zone": "us-west4-a", "project": "proj", **cloud})
  return tpu_vm.queued_resources(
    sweep_jobs(), tpu, cloud, sweep="rule110_gpu", code=f"{SWEEP}/code/sleep_jax-abc.tar.gz"
  )


@pytest.mark.parametrize(
  "topology, num_slices, expected",
  [
    ("v5e-16", 1, ["--accelerator-type=v5litepod-16", "--runtime-version=v2-alpha-tpuv5-lite"]),
    ("v5p-32", 1, ["--accelerator-type=v5p-32", "--runtime-version=v2-alpha-tpuv5"]),
    ("v5e-16", 2, ["--accelerator-type=v5litepod-16", "--node-count=2"]),
  ],
)
def test_each_run_is_one_queued_resource_of_its_slices(topology, num_slices, expected):
  resources = queued(topology, num_slices)
  assert len(resources) == 3 and len({r.name for r in resources}) == 3
  for resource, job in zip(resources, sweep_jobs()):
    create = resource.create
    assert create[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", resource.name]
    assert set(expected) <= set(create) and "--zone=us-west4-a" in create
    nodes = [a for a in create if a.startswith(("--node-id", "--node-count", "--node-prefix"))]
    if num_slices == 1:
      assert nodes == [f"--node-id={resource.name}"]
    else:  # one multislice request; the queued resource gives the VMs their MEGASCALE_* values
      assert nodes == ["--node-count=2", f"--node-prefix={resource.name}"]
    assert create[-1] == f"--metadata-from-file=startup-script={tpu_vm.STARTUP_SCRIPT_FILE}"
    assert (
      "SLEEP_JAX_DISTRIBUTED=cluster .venv/bin/python launch/main.py" in resource.startup_script
    )
    assert f"--workdir={job.args['workdir']}" in resource.startup_script
    assert f"is_finished({job.num_steps})" in resource.startup_script


def test_queued_resource_names_are_valid_ids():
  import re

  for name in ("rule110_paper", "A very/long_sweep name " * 4):
    resource = tpu_vm.resource_name(name, "n1_compute_matched/depth2/seed0")
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", resource) and len(resource) <= 50
  assert tpu_vm.resource_name("s", "n1/seed0") != tpu_vm.resource_name("s", "n1/seed1")


@pytest.mark.parametrize("keep", [False, True])
def test_the_startup_script_is_valid_bash_and_deletes_its_tpu_unless_kept(keep, tmp_path):
  [resource, *_] = queued("v5e-16", keep=keep)
  script = tmp_path / "startup.sh"
  script.write_text(resource.startup_script)
  check = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
  assert check.returncode == 0, check.stderr
  delete = f"gcloud compute tpus queued-resources delete {resource.name} --zone=us-west4-a"
  assert delete in resource.startup_script
  assert f'[ "{str(keep).lower()}" = false ]' in resource.startup_script


def test_bad_cloud_tpu_options_are_refused():
  with pytest.raises(ValueError, match="needs --gcp_zone"):
    tpu_vm.CloudTpu(zone="")
  with pytest.raises(ValueError, match="tpu_provisioning"):
    tpu_vm.CloudTpu(zone="z", provisioning="free")


def test_submitting_queued_resources_uploads_the_code_once_and_runs_gcloud(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  resources = queued("v5e-16", 2, provisioning="spot")
  calls = []

  def record(argv, check):
    assert check
    script = argv[-1].split("startup-script=", 1)[1]
    with open(script) as f:
      calls.append((argv, f.read()))

  with installed() as gcs:
    code_uri = f"{SWEEP}/code/sleep_jax-abc.tar.gz"
    tpu_vm.submit(resources, code=b"tarball", code_uri=code_uri, run=record)
    tpu_vm.submit(resources[:1], code=b"other", code_uri=code_uri, run=record)
    assert gcs.files() == {code_uri: b"tarball"}  # uploaded once
  assert [argv[5] for argv, _ in calls] == [r.name for r in resources] + [resources[0].name]
  for (argv, script), resource in zip(calls, resources):
    assert "--spot" in argv and script == resource.startup_script
  assert not os.path.exists(tmp_path / "gs:")


def test_the_code_snapshot_is_the_files_git_lists_and_is_reproducible(tmp_path):
  files = snapshot.source_files(REPO)
  assert "sleep_jax/paths.py" in files and "launch/main.py" in files and "setup.cfg" in files
  assert not any(f.startswith((".venv/", "runs/", ".git/")) for f in files)
  # A copy without .git ships the same kind of files.
  copy = tmp_path / "copy"
  for name in ("setup.cfg", "launch/main.py", ".venv/bin/python", "runs/x/config.json"):
    (copy / name).parent.mkdir(parents=True, exist_ok=True)
    (copy / name).write_text("x")
  (copy / "sleep_jax.egg-info").mkdir()
  (copy / "sleep_jax.egg-info" / "PKG-INFO").write_text("x")
  assert snapshot.source_files(str(copy)) == ["launch/main.py", "setup.cfg"]
  some = ["setup.cfg", "sleep_jax/paths.py"]
  data = snapshot.tarball(REPO, some)
  assert data == snapshot.tarball(REPO, some) and len(snapshot.revision(data)) == 12


# --- The dry run. --------------------------------------------------------------------------


def test_the_dry_run_needs_no_xmanager(tmp_path):
  # A package named xmanager that cannot be imported, ahead of the installed one.
  blocker = tmp_path / "blocker" / "xmanager"
  blocker.mkdir(parents=True)
  (blocker / "__init__.py").write_text("raise ImportError('xmanager is blocked in this test')\n")
  env = {**os.environ, "PYTHONPATH": str(tmp_path / "blocker")}
  out = dry_run(*NAMED["one 8-GPU host"], "--num_hosts=3", env=env)
  assert out.returncode == 0, out.stderr[-3000:]
  lines = out.stdout.splitlines()
  assert "# xmanager is not installed: the arguments of the XManager objects submit builds" in lines
  specs = [line for line in lines if line.startswith(("[coordinator]", "[workers]"))]
  assert len(specs) == 6  # 3 runs x (coordinator, workers)
  assert specs[0].startswith(
    "[coordinator] xm_local.Vertex(requirements=xm.JobRequirements(h100=8))"
  )
  assert specs[1].startswith(
    "[workers] xm_local.Vertex(requirements=xm.JobRequirements(h100=8, replicas=2))"
  )
  assert all("machine_type='a3-highgpu-8g'" in line for line in specs)
  assert "'JAX_COORDINATOR_ADDRESS': '%objectname(workerpool0)%'" in specs[0]
  tpu = dry_run(*NAMED["tpu 2 x v5e-16"], "--gcp_zone=us-west4-a", env=env)
  assert tpu.returncode == 0, tpu.stderr[-3000:]
  assert "xm.JobRequirements(**{'tpu_v5e': '4x4'})" in tpu.stdout and "--node-count=2" in tpu.stdout
  # --xm_* flags are XManager's: without it they are refused with the fix.
  refused = dry_run("--xm_wrap_late_bindings", env=env)
  assert refused.returncode != 0 and 'pip install -e ".[xm]"' in refused.stderr


@pytest.mark.parametrize(
  "flags_, message",
  [
    (["--platform=tpu"], "needs a topology"),
    (["--platform=tpu", "--topology=v9-8", "--gcp_zone=z"], "unknown TPU topology"),
    (["--platform=tpu", "--topology=v5e-16"], "needs --gcp_zone"),
    (["--platform=tpu", "--topology=v5e-16", "--executor=vertex"], "knows TPU v2/v3 only"),
    (["--platform=gpu", "--executor=vertex", "--gpus_per_host=3"], "Vertex AI machines hold"),
    (["--platform=gpu", "--num_hosts=2"], "runs on this machine: one host"),
    (["--platform=gpu", "--gpu_type=h800"], "value should be one of"),
  ],
)
def test_the_dry_run_refuses_bad_input_by_name(flags_, message):
  out = dry_run(*flags_)
  assert out.returncode != 0 and message in out.stderr
  assert "# work unit" not in out.stdout and "queued-resources create" not in out.stdout


def test_a_vertex_run_needs_a_bucket():
  out = dry_run(*NAMED["one 8-GPU host"], sweep_dir="runs/sweeps/x")
  assert out.returncode != 0 and "give --sweep_dir=gs://BUCKET" in out.stderr


# --- The real XManager objects (skipped without xmanager). -----------------------------------


@pytest.fixture
def xm():
  pytest.importorskip("xmanager", reason="the xm extra is not installed")
  from xmanager import xm

  return xm


def test_our_names_are_xmanagers(xm):
  from xmanager.cloud import utils as cloud_utils
  from xmanager.cloud import vertex

  assert set(placement_lib.XM_GPU_TYPES) == {t.name.lower() for t in xm.GpuType}
  assert placement_lib.COORDINATOR_LATE_BINDING == cloud_utils.get_workerpool_address("workerpool0")
  for gpu in placement_lib.VERTEX_MACHINE_TYPES:  # each has a Vertex accelerator name
    assert vertex.aip_v1_gpu_accelerator_type_str(xm.ResourceType[gpu]).startswith("NVIDIA_")


def test_xmanager_refuses_what_the_old_launcher_built_and_accepts_ours(xm):
  with pytest.raises(ValueError, match="Couldn't parse resource quantity for tpu_v5e"):
    xm.JobRequirements(tpu_v5e="v5e:4x4")
  with pytest.raises(KeyError, match="tpu_v5"):
    xm.JobRequirements(tpu_v5="2x2x4")
  with pytest.raises(KeyError, match="gpu"):
    xm.JobRequirements(gpu=8)
  with pytest.raises(ValueError, match="num_slices is not supported for TPUs"):
    xm.JobRequirements(tpu_v5e="4x4", num_slices=2)  # hence multislice through queued resources
  for topology, resource, grid in (("v5e-16", "TPU_V5E", "4x4"), ("v5p-32", "TPU_V5P", "2x2x4")):
    tpu = placement(platform="tpu", executor="tpu_vm", topology=topology)
    requirements = xm.JobRequirements(**tpu.requirements())
    assert requirements.accelerator == xm.ResourceType[resource]
    assert requirements.topology.name == grid and requirements.topology.chip_count == 16


def vertex_launch(xm, unit, monkeypatch):
  """xmanager's Vertex AI launch of one work unit, with aiplatform replaced: the CustomJob's
  arguments (its worker pools) as Vertex would receive them."""
  from xmanager.cloud import vertex
  from xmanager.xm_local import executables

  from sleep_jax.experiments import xm_jobs

  created = {}

  class CustomJob:
    resource_name = "projects/p/locations/us-central1/customJobs/1"

    def __init__(self, **kwargs):
      created.update(kwargs)

    def submit(self, **kwargs):
      created["submitted"] = kwargs

    def _dashboard_uri(self):
      return "https://console.cloud.google.com/vertex-ai"

  monkeypatch.setattr(vertex.aiplatform, "init", lambda **kwargs: None)
  monkeypatch.setattr(vertex.aiplatform, "CustomJob", CustomJob)
  monkeypatch.setattr(vertex.auth, "get_bucket", lambda: "staging-bucket")
  monkeypatch.setattr(vertex.auth, "get_service_account", lambda: "xm@p.iam.gserviceaccount.com")
  monkeypatch.setattr(vertex, "_default_client", vertex.Client(project="p"))
  image = executables.GoogleContainerRegistryImage(name="sleep_jax", image_path="gcr.io/p/sj:1")
  unit_object = xm_jobs.work_unit(unit, image)
  group = unit_object if isinstance(unit_object, xm.JobGroup) else xm.JobGroup(train=unit_object)
  with xm_jobs.vertex_machine_types():
    vertex.launch("rule110_gpu", unit.name, group)
  return created["worker_pool_specs"]


@pytest.mark.parametrize("num_hosts", [1, 2, 3])
def test_vertex_gets_the_machine_type_and_a_job_group_whose_processes_join(
  xm, num_hosts, monkeypatch, tmp_path
):
  from xmanager.cloud import utils as cloud_utils

  [job, *_] = sweep_jobs()
  gpus = placement(platform="gpu", executor="vertex", gpus_per_host=8, num_hosts=num_hosts)
  pools = vertex_launch(xm, placement_lib.work_unit(job, gpus), monkeypatch)
  assert [pool.replica_count for pool in pools] == [1] + ([num_hosts - 1] if num_hosts > 1 else [])
  for pool in pools:
    machine = pool.machine_spec
    assert machine.machine_type == "a3-highgpu-8g"  # xm_local alone would ask n1-standard-4
    assert machine.accelerator_type.name == "NVIDIA_H100_80GB" and machine.accelerator_count == 8
    assert list(pool.container_spec.args) == job.command()[2:]
  # Each replica as Vertex starts it: the pools' env and a CLUSTER_SPEC of its own.
  counts = [pool.replica_count for pool in pools]
  hosts = {f"workerpool{i}": [f"wp{i}-{r}:2222" for r in range(n)] for i, n in enumerate(counts)}
  ranks = []
  for i, pool in enumerate(pools):
    env = {var.name: var.value for var in pool.container_spec.env}
    for index in range(pool.replica_count):
      spec = json.dumps({"cluster": hosts, "task": {"type": f"workerpool{i}", "index": index}})
      group = distributed.from_environment({**env, "CLUSTER_SPEC": spec})
      if num_hosts == 1:  # one process: nothing to join
        assert env == {} and group == distributed.ProcessGroup()
        continue
      assert group.coordinator_address == "wp0-0:2222" and group.num_processes == num_hosts
      ranks.append(group.process_id)
      # XManager's own wrapper (--xm_wrap_late_bindings) resolves the same address.
      if "JAX_COORDINATOR_ADDRESS" in env:
        script = tmp_path / f"map_env_{i}_{index}.sh"
        with mock.patch.dict(os.environ, {**env, "CLUSTER_SPEC": spec}):
          cloud_utils.create_workerpool_address_env_vars_script(str(script))
        assert "export JAX_COORDINATOR_ADDRESS=wp0-0:2222" in script.read_text()
  assert ranks == (list(range(num_hosts)) if num_hosts > 1 else [])


def test_the_local_executor_asks_docker_for_local_gpus_and_mounts_the_sweep(xm, tmp_path):
  from xmanager.xm_local import executables, execution

  from sleep_jax.experiments import xm_jobs

  sweep_dir = str(tmp_path / "sweep")
  [job, *_] = sweep_jobs(sweep_dir)
  unit = placement_lib.work_unit(
    job, placement(platform="gpu", gpus_per_host=8), volumes={sweep_dir: sweep_dir}
  )
  image = executables.LoadedContainerImage(name="sleep_jax", image_id="sha256:1")
  docker = mock.MagicMock()
  with (
    mock.patch.object(execution.docker_adapter, "instance", return_value=docker),
    mock.patch.object(execution.subprocess, "check_output", return_value=b"GPU 0"),
  ):
    asyncio.run(
      execution._launch_loaded_container_image(lambda n: n, xm_jobs.work_unit(unit, image), image)
    )
  run = docker.run_container.call_args.kwargs
  assert run["gpu_count"] == 8 and run["volumes"][sweep_dir] == sweep_dir
  assert run["args"] == job.command()[2:]


def test_the_late_binding_wrapper_is_refused_where_it_would_change_arguments(xm):
  from sleep_jax.experiments import xm_jobs

  gpus = placement(platform="gpu", executor="vertex", gpus_per_host=8, num_hosts=2)
  units = [placement_lib.work_unit(job, gpus) for job in sweep_jobs(name="rule110_cpu")]
  xm_jobs.check_late_binding_wrapper(units, wrapped=False)
  with pytest.raises(
    ValueError, match=r"--config.task.eval_depths=\(1, 2, 3, 4\) would be changed"
  ):
    xm_jobs.check_late_binding_wrapper(units, wrapped=True)
  units = [placement_lib.work_unit(job, gpus) for job in sweep_jobs()]
  xm_jobs.check_late_binding_wrapper(units, wrapped=True)  # nothing to change: fine


# One placement in the default suite, the others (~3 s each, a subprocess that imports
# xmanager) with the integration tests.
@pytest.mark.parametrize(
  "name",
  [
    name if name == "two 8-GPU hosts" else pytest.param(name, marks=pytest.mark.integration)
    for name in NAMED
  ],
)
def test_the_dry_run_prints_the_objects_and_commands_submit_sends(xm, name):
  flags_ = NAMED[name] + (["--gcp_zone=us-west4-a"] if "tpu" in name else [])
  out = dry_run(*flags_)
  assert out.returncode == 0, out.stderr[-3000:]
  text = out.stdout
  assert "3 runs on" in text and text.strip().splitlines()[-1].startswith("total")
  if name.startswith("tpu"):
    creates = [line for line in text.splitlines() if line.startswith("gcloud compute tpus")]
    assert len(creates) == 3 and "#   SLEEP_JAX_DISTRIBUTED=cluster" in text
    grid = "2x2x4" if "v5p" in name else "4x4"
    assert f"=xm.Topology('{grid}')" in text  # the real xm.JobRequirements of one slice
    assert ("--node-count=2" in text) == ("2 x" in name)
    return
  assert "Packageable(executable_spec=PythonContainer(" in text and '.[gpu]" gcsfs' in text
  assert text.count("executor=Vertex(requirements=xm.JobRequirements(h100=8.0") == (
    3 if name == "one 8-GPU host" else 6
  )
  assert text.count("'machine_type': 'a3-highgpu-8g'") == text.count("vertex machine_spec=")
  if name == "two 8-GPU hosts":
    assert text.count("# work unit") == 3 and text.count("xm.JobGroup of 2 job(s)") == 3
    assert "[workers]   vertex machine_spec=" in text and "replica_count=1" in text
    assert "'JAX_COORDINATOR_ADDRESS': '%objectname(workerpool0)%'" in text


@pytest.mark.integration
def test_xmanagers_flags_pass_through(xm):
  out = dry_run(*NAMED["two 8-GPU hosts"], "--xm_wrap_late_bindings", sweep="rule110_cpu")
  assert out.returncode != 0 and "would be changed by --xm_wrap_late_bindings" in out.stderr
  out = dry_run(
    *NAMED["two 8-GPU hosts"], "--xm_wrap_late_bindings", "--xm_build_image_locally=false"
  )
  assert out.returncode == 0, out.stderr[-3000:]
