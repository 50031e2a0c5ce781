"""Joining a multi-process job: a Vertex AI job's late-bound coordinator and rank, from CLUSTER_SPEC;
processes on a loaded host that reach their first collective tens of seconds apart."""

import json
import os
import subprocess
import sys

import portpicker
import pytest

from sleep_jax.parallel import distributed

LATE = "%objectname(workerpool0)%"


def cluster_spec(pools: list[int], task_pool: int, index: int) -> str:
  """CLUSTER_SPEC as Vertex AI sets it on a replica (pool i has pools[i] replicas)."""
  cluster = {
    f"workerpool{i}": [f"wp{i}-replica-{r}:2222" for r in range(count)]
    for i, count in enumerate(pools)
  }
  return json.dumps(
    {
      "cluster": cluster,
      "environment": "cloud",
      "task": {"type": f"workerpool{task_pool}", "index": index, "trial": ""},
      "job": "{}",
    }
  )


def test_every_replica_of_a_vertex_job_group_gets_its_own_rank():
  ranks = []
  for pool, count in ((0, 1), (1, 3)):
    for index in range(count):
      environ = {
        "JAX_COORDINATOR_ADDRESS": LATE,
        "JAX_NUM_PROCESSES": "4",
        "CLUSTER_SPEC": cluster_spec([1, 3], pool, index),
      }
      group = distributed.from_environment(environ)
      assert group.coordinator_address == "wp0-replica-0:2222" and group.num_processes == 4
      ranks.append(group.process_id)
  assert ranks == [0, 1, 2, 3]


def test_pools_count_in_their_numeric_order():
  # workerpool10 comes after workerpool2, whatever the JSON's order
  spec = json.loads(cluster_spec([1, 1, 2], 2, 1))
  spec["cluster"] = {"workerpool10": ["x:1"], **spec["cluster"]}
  group = distributed.cluster_spec_group(json.dumps(spec))
  assert (group.process_id, group.num_processes) == (3, 5)


def test_an_explicit_process_id_and_address_win_over_cluster_spec():
  environ = {
    "JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234",
    "JAX_PROCESS_ID": "1",
    "CLUSTER_SPEC": cluster_spec([1, 1], 0, 0),
  }
  group = distributed.from_environment(environ)
  assert (group.coordinator_address, group.num_processes, group.process_id) == (
    "10.0.0.1:1234",
    2,
    1,
  )


def test_cluster_spec_alone_does_not_make_a_job_multi_process():
  environ = {"CLUSTER_SPEC": cluster_spec([1], 0, 0)}  # every Vertex job has one
  assert distributed.from_environment(environ) == distributed.ProcessGroup()
  assert distributed.initialize(environ=environ) is False


@pytest.mark.parametrize(
  "environ, message",
  [
    ({"JAX_COORDINATOR_ADDRESS": LATE, "JAX_NUM_PROCESSES": "2"}, "has no CLUSTER_SPEC"),
    (
      {"JAX_COORDINATOR_ADDRESS": "%objectname(chief)%", "CLUSTER_SPEC": cluster_spec([1], 0, 0)},
      "has no worker pool 'chief'",
    ),
    (
      {
        "JAX_COORDINATOR_ADDRESS": LATE,
        "JAX_NUM_PROCESSES": "3",
        "CLUSTER_SPEC": cluster_spec([1, 1], 1, 0),
      },
      "lists 2 replicas",
    ),
    ({"JAX_COORDINATOR_ADDRESS": LATE, "CLUSTER_SPEC": "{}"}, "not Vertex AI's cluster"),
  ],
)
def test_inconsistent_descriptions_are_clear_errors(environ, message):
  with pytest.raises(ValueError, match=message):
    distributed.initialize(environ=environ)


def test_a_tpu_vm_job_lets_jax_find_its_cluster(monkeypatch):
  calls = []
  monkeypatch.setattr(distributed.jax.distributed, "initialize", lambda **kw: calls.append(kw))
  assert distributed.initialize(environ={"SLEEP_JAX_DISTRIBUTED": "cluster"}) is True
  assert calls == [{}]  # no arguments: jax reads the TPU metadata and MEGASCALE_* itself


STAGGERED = """
import sys, time
import jax
import numpy as np
from sleep_jax.parallel import distributed

assert distributed.initialize()
if jax.process_index() == 1:
  time.sleep(float(sys.argv[1]))  # compiling for longer on a loaded host
mesh = jax.make_mesh((jax.device_count(),), ("data",))
x = jax.make_array_from_process_local_data(
  jax.NamedSharding(mesh, jax.P("data")), np.ones((2, 3), np.float32)
)
total = jax.jit(lambda a: a.sum(), out_shardings=jax.NamedSharding(mesh, jax.P()))(x)
print("sum", float(total))
"""


@pytest.mark.integration
def test_processes_reaching_their_first_collective_40_s_apart_still_meet(tmp_path):
  """XLA gives gloo 30 s to build a group's context at its first collective; initialize builds
  the context of all devices while the processes are in step, so later ones may be late."""
  script = tmp_path / "staggered.py"
  script.write_text(STAGGERED)
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  port = portpicker.pick_unused_port()
  keep = ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")
  base = {k: v for k, v in os.environ.items() if not k.startswith("JAX_") or k in keep}
  processes = []
  for process_id in range(2):
    env = dict(
      base,
      PYTHONPATH=repo,
      JAX_PLATFORMS="cpu",
      XLA_FLAGS="--xla_force_host_platform_device_count=2",
      JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
      JAX_NUM_PROCESSES="2",
      JAX_PROCESS_ID=str(process_id),
    )
    with open(tmp_path / f"process{process_id}.log", "w") as log:  # the child keeps its copy
      command = [sys.executable, str(script), "40"]
      processes.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT))
  for process in processes:
    process.wait(timeout=300)
  for process_id, process in enumerate(processes):
    output = (tmp_path / f"process{process_id}.log").read_text()
    assert process.returncode == 0, output[-3000:]
    assert "sum 12.0" in output  # 2 processes x 2 rows x 3 columns of ones
