"""Run a sweep (configs/sweeps/*.py) in this process, one run after another, then report it.

  python launch/sweep.py --config=configs/sweeps/rule110_cpu.py --sweep_dir=runs/sweeps/rule110_cpu \
      [--config.seeds=0,1 --config.depths=4 --only=n2 --dry_run]

Finished runs (results.json at their last step) are skipped and interrupted ones resume from
their checkpoints, so rerunning the same command continues a sweep. A failed run is logged and
the sweep goes on; the failures are listed at the end and the exit status is 1. The report
(`<sweep_dir>/report.md` and figures) is written at the end either way.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/ imports

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from sleep_jax import sweeps  # noqa: E402
from sleep_jax.train.loop import keep_only_our_info_logs  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Sweep config, e.g. configs/sweeps/rule110_cpu.py.")
_SWEEP_DIR = flags.DEFINE_string("sweep_dir", None, "Directory of the sweep; one workdir per run inside.")
_ONLY = flags.DEFINE_string("only", None, "Run only the arm with this name.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the runs (and whether each is finished) and exit.")
flags.mark_flags_as_required(["config", "sweep_dir"])


def describe(run: sweeps.Run) -> str:
  """One line per run: status, workdir and overrides."""
  status = "done" if sweeps.is_finished(run.workdir, run.num_steps) else "todo"
  overrides = " ".join(f"{k}={v}" for k, v in run.overrides.items())
  return f"{status}  {run.workdir}  {overrides}"


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  keep_only_our_info_logs()
  sweep_config, sweep_dir = _CONFIG.value, _SWEEP_DIR.value
  if _DRY_RUN.value:
    runs = sweeps.expand_runs(sweep_config, sweep_dir, only=_ONLY.value)
    print("\n".join(describe(run) for run in runs))
    print(f"{len(runs)} runs")
    return
  failures = sweeps.run_sweep(sweep_config, sweep_dir, only=_ONLY.value)
  from sleep_jax.eval import report  # matplotlib only when there is something to report
  logging.info("report: %s", report.write_report(sweep_dir))
  if failures:
    for run, error in failures:
      logging.error("FAILED %s: %s", run.workdir, error.strip().splitlines()[-1])
    sys.exit(f"{len(failures)} run(s) of {sweep_config.name} failed; rerun the same command to retry them")


if __name__ == "__main__":
  app.run(main)
