"""How much each sleep pass still changes the fast state, per evaluation set, in trained runs.

    python bench/state_change.py runs/sweeps/rule110_adaptive/n4/seed0 [--passes 4] [--json out.json]

For every run directory given, the newest checkpoint's model sleeps N passes (default: the
run's sleep.passes) on every context window of the run's held-out sets (the main set and each
evaluation slice, e.g. one per Rule 110 depth), as halt="never" does, and records after pass n
the relative change r_n = max over gated-delta blocks of ||S_n - S_(n-1)||_F / ||S_(n-1)||_F
that halt="converge" compares with sleep.halt_tol. Prints, per set and pass n >= 2, the 10th,
25th, 50th, 75th and 90th percentiles over rows and windows after the first (the first window
starts from S = 0). Use it to choose halt_tol, and to see whether a model keeps consolidating
longer on some inputs than on others.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sleep_jax import xla_flags

xla_flags.apply_defaults()

import jax  # noqa: E402
from flax import nnx  # noqa: E402

from sleep_jax.data import tasks  # noqa: E402
from sleep_jax.model.lm import HybridLM, zero_fast_state  # noqa: E402
from sleep_jax.sleep.consolidate import relative_change  # noqa: E402
from sleep_jax.train.checkpoint import restore_model  # noqa: E402

PERCENTILES = (10, 25, 50, 75, 90)


@nnx.jit
def _pass(model: HybridLM, h, state):
  return model.stack_pass(h, state)


def state_changes(model: HybridLM, tokens: np.ndarray, window: int, context_len: int, passes: int):
  """r [B, W, N]: the relative state change after each of N passes over each context window.

  Hard eviction, fresh convolutions and no loop range (the whole stack is a pass): every window
  starts from the state the previous window's last pass left, as under halt="never"."""
  state = zero_fast_state(model.cfg, tokens.shape[0])
  changes = []
  for start in range(0, context_len, window):
    h = model.embed(jax.numpy.asarray(tokens[:, start : start + window]))
    per_pass = []
    for _ in range(passes):
      h, new = _pass(model, h, state)
      per_pass.append(np.asarray(relative_change(state, new)))
      state = new
    changes.append(np.stack(per_pass, axis=1))
  return np.stack(changes, axis=1)


def summarize_changes(changes: np.ndarray) -> dict[str, list[float]]:
  """Per pass n >= 2: the PERCENTILES of r_n over rows and windows after the first."""
  later = changes[:, 1:]
  return {
    f"r{n}": [float(q) for q in np.percentile(later[..., n - 1], PERCENTILES)]
    for n in range(2, changes.shape[-1] + 1)
  }


def run_report(workdir: str, passes: int | None, num: int) -> dict:
  model, config, step = restore_model(workdir)
  if (
    config.sleep.eviction != "hard" or len(model.layout) != 1 or config.sleep.conv_state != "reset"
  ):
    raise SystemExit(f"{workdir}: only hard eviction, conv_state=reset and no loop range")
  passes = passes or config.sleep.passes
  task = tasks.get_task(config.task)
  sets = {"main": tasks.heldout_set(task, seed=config.seed, num=num)}
  sets.update(tasks.heldout_slices(task, seed=config.seed, num=num))
  return {
    "workdir": workdir,
    "step": step,
    "passes": passes,
    "sets": {
      name: summarize_changes(
        state_changes(
          model, examples["tokens"], config.sleep.window, config.sleep.context_len, passes
        )
      )
      for name, examples in sets.items()
    },
  }


def markdown(report: dict) -> str:
  lines = [
    f"{report['workdir']} (step {report['step']}, {report['passes']} passes): "
    f"r_n percentiles {', '.join(map(str, PERCENTILES))}",
    "",
    "| set | " + " | ".join(report["sets"]["main"]) + " |",
    "|---|" + "---|" * len(report["sets"]["main"]),
  ]
  for name, per_pass in report["sets"].items():
    cells = [" / ".join(f"{q:.2f}" for q in qs) for qs in per_pass.values()]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("workdirs", nargs="+", help="run directories")
  parser.add_argument("--passes", type=int, default=None, help="N (default: the run's)")
  parser.add_argument("--num", type=int, default=256, help="examples per held-out set")
  parser.add_argument("--json", default=None, help="also write the numbers here")
  args = parser.parse_args(argv)
  reports = [run_report(w, args.passes, args.num) for w in args.workdirs]
  print("\n\n".join(markdown(r) for r in reports))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(reports, f, indent=2)


if __name__ == "__main__":
  main()
