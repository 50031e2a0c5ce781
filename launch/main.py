"""Train and evaluate one run: a thin absl app over `sleep_jax.train.loop.train_and_evaluate`.

  python launch/main.py --config=configs/rule110.py:cpu --workdir=runs/rule110_cpu \
      [--config.sleep.passes=2 --config.task.depth=4 ...] [--verbosity=0]

A rerun with the same --workdir resumes from the latest checkpoint. SIGTERM (how clusters
preempt) saves a checkpoint at the current step and exits 0. The console shows the project's
lines only; --verbosity=0 (INFO) or 1 (DEBUG) brings back the libraries' logs.

Multi-host: every process runs the same command. It joins the job when JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES and JAX_PROCESS_ID are set (or --coordinator_address, --num_processes,
--process_id; on a multi-host Cloud TPU VM nothing is needed); process 0 writes the logs.
"""

import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/ imports

from sleep_jax import xla_flags

xla_flags.apply_defaults()  # before JAX starts its backend

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from sleep_jax import console, rundir  # noqa: E402
from sleep_jax.parallel import distributed  # noqa: E402
from sleep_jax.train.loop import NonFiniteLossError, Preempted, train_and_evaluate  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Config file, e.g. configs/rule110.py:cpu.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, events, results).")
_COORDINATOR = flags.DEFINE_string(
  "coordinator_address",
  None,
  "Multi-process: host:port of process 0 (or $JAX_COORDINATOR_ADDRESS).",
)
_NUM_PROCESSES = flags.DEFINE_integer(
  "num_processes", None, "Multi-process: processes in the job (or $JAX_NUM_PROCESSES)."
)
_PROCESS_ID = flags.DEFINE_integer(
  "process_id", None, "Multi-process: this process's index (or $JAX_PROCESS_ID)."
)
flags.mark_flags_as_required(["config", "workdir"])

logger = logging.getLogger("sleep_jax.launch")


def verbosity_flag() -> int | None:
  """absl's --verbosity when given on the command line, else None (third-party logs off)."""
  return flags.FLAGS["verbosity"].value if flags.FLAGS["verbosity"].present else None


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  console.configure(verbosity=verbosity_flag())
  distributed.initialize(
    distributed.ProcessGroup(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  )
  console.configure(verbosity=verbosity_flag(), is_writer=jax.process_index() == 0)
  try:
    train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except Preempted:
    sys.exit(0)  # the checkpoint is saved; the scheduler reruns the same command
  except (NonFiniteLossError, rundir.WorkdirError, ValueError) as e:
    logger.error("%s", e)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
