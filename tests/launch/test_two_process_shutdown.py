"""A two-process job on one loaded host: both processes end cleanly, and SIGTERM to both saves
one step and exits 0 in each; the rerun ends bitwise equal to an uninterrupted run.

Each process runs `launch/main.py` with 2 fake CPU devices and joins the job through
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID (collectives over gloo), beside a
process that burns a CPU core for the whole test. The processes write their output to files:
a process blocked on a full pipe that nobody reads is a process that never reaches JAX's
shutdown barrier, which then fails in the other one after its timeout.

Marked `slow`, so the default and integration steps leave them out; CI runs this file as a step
of its own (`make test-multiprocess`, about 3 minutes on a loaded 2-core host).
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import portpicker
import pytest

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MAIN = os.path.join(REPO, "launch", "main.py")
CONFIG = os.path.join(REPO, "configs", "rule110.py") + ":tiny"
STEPS = 30  # SIGTERM lands mid-run: the processes agree on a step within a few steps
TIMEOUT_S = 300


@contextlib.contextmanager
def cpu_burner():
  """A process that keeps one CPU core busy while the block runs."""
  burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
  try:
    yield burner
  finally:
    burner.kill()
    burner.wait()


STARTED: list[subprocess.Popen] = []  # killed when a test ends, however it ends


@pytest.fixture(autouse=True)
def no_process_left():
  yield
  while STARTED:
    process = STARTED.pop()
    if process.poll() is None:
      process.kill()
      process.wait()


class Job:
  """The two processes of one `launch/main.py` run, their output in files."""

  def __init__(self, workdir: str, logs: str):
    self.workdir = workdir
    port = portpicker.pick_unused_port()
    keep = ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")
    base = {k: v for k, v in os.environ.items() if not k.startswith("JAX_") or k in keep}
    command = [
      sys.executable,
      MAIN,
      f"--config={CONFIG}",
      f"--workdir={workdir}",
      f"--config.train.num_steps={STEPS}",
      f"--config.eval.every_steps={STEPS}",  # one evaluation and one checkpoint, at the end
      f"--config.checkpoint.every_steps={STEPS}",
      "--config.task.eval_depths=()",
    ]
    self.logs, self.processes = [], []
    os.makedirs(logs, exist_ok=True)
    for process_id in range(2):
      env = dict(
        base,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
        JAX_NUM_PROCESSES="2",
        JAX_PROCESS_ID=str(process_id),
        PYTHONUNBUFFERED="1",
      )
      log = os.path.join(logs, f"process{process_id}.log")
      with open(log, "w") as out:
        self.processes.append(
          subprocess.Popen(command, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        )
        STARTED.append(self.processes[-1])
      self.logs.append(log)

  def output(self, process_id: int) -> str:
    with open(self.logs[process_id]) as f:
      return f.read()

  def wait(self) -> list[int]:
    """Every process's exit status (killing all of them after TIMEOUT_S)."""
    deadline = time.time() + TIMEOUT_S
    try:
      for process in self.processes:
        process.wait(timeout=max(1.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
      for process in self.processes:
        process.kill()
        process.wait()
    return [process.returncode for process in self.processes]

  def check_exits_0(self) -> None:
    codes = self.wait()
    for process_id, code in enumerate(codes):
      assert code == 0, f"process {process_id} exited {code}:\n{self.output(process_id)[-4000:]}"


def train_losses(workdir):
  with open(os.path.join(workdir, "train_log.jsonl")) as f:
    lines = [json.loads(line) for line in f]
  return {line["step"]: line["loss"] for line in lines}  # a resumed run re-logs redone steps


def checkpoint_steps(workdir):
  directory = os.path.join(workdir, "checkpoints")
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def params_at(workdir, step):
  """A checkpoint's parameters, restored onto this process's first device."""
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  checkpointer = ocp.StandardCheckpointer()
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
    checkpointer.metadata(path).item_metadata,
  )
  return checkpointer.restore(path, target)["params"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """A two-process run from start to end beside a busy core: both processes exit 0."""
  root = tmp_path_factory.mktemp("uninterrupted")
  with cpu_burner():
    job = Job(str(root / "run"), str(root / "logs"))
    job.check_exits_0()
  return job.workdir


def test_two_processes_beside_a_busy_core_finish_and_exit_cleanly(uninterrupted):
  assert sorted(train_losses(uninterrupted)) == list(range(1, STEPS + 1))
  with open(os.path.join(uninterrupted, "results.json")) as f:
    assert json.load(f)["step"] == STEPS
  assert checkpoint_steps(uninterrupted) == [STEPS]
  # Only process 0 writes the run's files.
  assert sum(f.startswith("events.out.tfevents") for f in os.listdir(uninterrupted)) == 1


def test_sigterm_to_both_processes_saves_one_step_and_the_rerun_ends_bitwise_equal(
  tmp_path, uninterrupted
):
  workdir = str(tmp_path / "run")
  with cpu_burner():
    job = Job(workdir, str(tmp_path / "logs_first"))
    # SIGTERM once both processes train (step 1 logged: past jax.distributed.initialize and
    # the compilation), as a cluster preempting the job signals each of its processes.
    log = os.path.join(workdir, "train_log.jsonl")
    deadline = time.time() + TIMEOUT_S
    while not (os.path.exists(log) and os.path.getsize(log)) and time.time() < deadline:
      assert all(p.poll() is None for p in job.processes), job.output(0)[-4000:]
      time.sleep(0.05)
    for process in job.processes:
      process.send_signal(signal.SIGTERM)
    job.check_exits_0()
    [saved] = checkpoint_steps(workdir)  # one step, agreed by both processes, then exit 0
    assert 1 <= saved < STEPS
    assert f"SIGTERM: saved a checkpoint at step {saved}" in job.output(0)
    assert not os.path.exists(os.path.join(workdir, "results.json"))
    rerun = Job(workdir, str(tmp_path / "logs_rerun"))
    rerun.check_exits_0()
  assert checkpoint_steps(workdir) == [saved, STEPS]
  got, want = train_losses(workdir), train_losses(uninterrupted)
  assert got == want  # every step's loss, bit for bit (JSON floats round-trip exactly)
  jax.tree.map(
    np.testing.assert_array_equal, params_at(workdir, STEPS), params_at(uninterrupted, STEPS)
  )
  with (
    open(os.path.join(workdir, "results.json")) as f,
    open(os.path.join(uninterrupted, "results.json")) as g,
  ):
    assert json.load(f)["eval"] == json.load(g)["eval"]
