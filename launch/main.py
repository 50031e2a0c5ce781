"""Train and evaluate one run: a thin absl app over `sleep_jax.train.loop.train_and_evaluate`.

  python launch/main.py --config=configs/rule110.py:cpu --workdir=runs/rule110_cpu \
      [--config.sleep.passes=2 --config.task.depth=4 ...]

A rerun with the same --workdir resumes from the latest checkpoint.

Multi-host: every process runs the same command. It joins the job when JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES and JAX_PROCESS_ID are set (or --coordinator_address, --num_processes,
--process_id; on a multi-host Cloud TPU VM nothing is needed); process 0 writes the logs.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/ imports

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from sleep_jax.parallel import distributed  # noqa: E402
from sleep_jax.train.loop import keep_only_our_info_logs, train_and_evaluate  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/rule110.py:cpu.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, events, results).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                    "Multi-process: host:port of process 0 (or $JAX_COORDINATOR_ADDRESS).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None,
                                      "Multi-process: processes in the job (or $JAX_NUM_PROCESSES).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None,
                                   "Multi-process: this process's index (or $JAX_PROCESS_ID).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  distributed.initialize(distributed.ProcessGroup(_COORDINATOR.value, _NUM_PROCESSES.value,
                                                  _PROCESS_ID.value))
  keep_only_our_info_logs(is_writer=jax.process_index() == 0)
  results = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  if jax.process_index() == 0:
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
  app.run(main)
