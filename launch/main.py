"""Train and evaluate one run: a thin absl app over `sleep_jax.train.loop.train_and_evaluate`.

  python launch/main.py --config=configs/rule110.py:cpu --workdir=runs/rule110_cpu \
      [--config.sleep.passes=2 --config.task.depth=4 ...]

A rerun with the same --workdir resumes from the latest checkpoint.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/ imports

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from sleep_jax.train.loop import keep_only_our_info_logs, train_and_evaluate  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/rule110.py:cpu.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, events, results).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  keep_only_our_info_logs()
  results = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  print(json.dumps(results, indent=2))


if __name__ == "__main__":
  app.run(main)
