"""Run a sweep (configs/sweeps/*.py) in this process, one run after another, then report it.

  python launch/sweep.py --config=configs/sweeps/rule110_cpu.py --sweep_dir=runs/sweeps/rule110_cpu \
      [--config.seeds=0,1 --config.depths=4 --only=n2 --dry_run]

Finished runs (results.json at their last step) are skipped and interrupted ones resume from
their checkpoints, so rerunning the same command continues a sweep. A failed run is logged and
the sweep goes on; the failures are listed at the end and the exit status is 1. The report
(`<sweep_dir>/report.md` and figures) is written at the end either way, and the arms are
printed side by side. SIGTERM saves the current run's checkpoint and stops the sweep (exit 0).
"""

import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/ imports

from sleep_jax import xla_flags

xla_flags.apply_defaults()  # before JAX starts its backend

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from sleep_jax import console, rundir  # noqa: E402
from sleep_jax.experiments import sweeps  # noqa: E402

logger = logging.getLogger("sleep_jax.launch")

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Sweep config, e.g. configs/sweeps/rule110_cpu.py."
)
_SWEEP_DIR = flags.DEFINE_string(
  "sweep_dir", None, "Directory of the sweep; one workdir per run inside."
)
_ONLY = flags.DEFINE_string("only", None, "Run only the arm with this name.")
_DRY_RUN = flags.DEFINE_bool(
  "dry_run", False, "Print the runs (and whether each is finished) and exit."
)
flags.mark_flags_as_required(["config", "sweep_dir"])


def describe(run: sweeps.Run) -> str:
  """One line per run: status, workdir and overrides."""
  status = "done" if rundir.RunDir(run.workdir).is_finished(run.num_steps) else "todo"
  overrides = " ".join(f"{k}={v}" for k, v in run.overrides.items())
  return f"{status}  {run.workdir}  {overrides}"


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  console.configure(
    verbosity=flags.FLAGS["verbosity"].value if flags.FLAGS["verbosity"].present else None
  )
  sweep_config, sweep_dir = _CONFIG.value, _SWEEP_DIR.value
  if _DRY_RUN.value:
    runs = sweeps.expand_runs(sweep_config, sweep_dir, only=_ONLY.value)
    print("\n".join(describe(run) for run in runs))
    print(f"{len(runs)} runs")
    return
  from sleep_jax.experiments import report
  from sleep_jax.train.loop import Preempted, train_and_evaluate

  try:
    failures = sweeps.run_sweep(
      sweep_config, sweep_dir, train_fn=train_and_evaluate, only=_ONLY.value
    )
  except Preempted:
    sys.exit(0)  # the current run saved its checkpoint; rerunning the command continues
  logger.info("report: %s", report.write_report(sweep_dir))
  logger.info(
    "%s, arms side by side (finished runs):\n%s", sweep_config.name, report.summary_table(sweep_dir)
  )
  if failures:
    for run, error in failures:
      logger.error("FAILED %s: %s", run.workdir, error.strip().splitlines()[-1])
    sys.exit(
      f"{len(failures)} run(s) of {sweep_config.name} failed; rerun the same command to retry them"
    )


if __name__ == "__main__":
  app.run(main)
