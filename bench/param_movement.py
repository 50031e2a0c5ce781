"""How far each parameter group moved in trained runs, and what that predicts for the paper's run.

    python bench/param_movement.py runs/sweeps/rule110_cpu            # every finished run in it
    python bench/param_movement.py runs/first_look/n4/depth2/seed0 --json movement.json

For every run directory under the given paths (a directory holding config.json and a
checkpoint), the initial parameters are rebuilt from the run's seed and compared with the
newest checkpoint's. Per group (the gates the paper leaves to AdamW at 5e-5: the decay and beta
projections, A_log, dt_bias; the conv filters; the rest of AdamW's; Muon's matrices) it reports
  * relative movement ||theta_end - theta_0|| / ||theta_0||, and
  * drift efficiency: mean |theta_end - theta_0| over the summed learning rate of the run. An
    Adam-family step moves a coordinate by at most about its learning rate, so this is the
    fraction of the largest possible drift that the gradients' consistency realised.
Multiplying a group's efficiency by the summed learning rate of the paper's schedule (5e-5 for
AdamW, 100k steps, 1,000 warmup, cosine to 10%) predicts its mean movement there, set beside the
spread of its initial values. Prints a markdown table; writes JSON with --json.
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

from flax import nnx  # noqa: E402

from sleep_jax import rundir  # noqa: E402
from sleep_jax.model.lm import build_model, params_by_path  # noqa: E402
from sleep_jax.train.checkpoint import restore_model  # noqa: E402
from sleep_jax.train.optim import learning_rate_schedule, optimizer_labels  # noqa: E402

GATES = ("decay_proj", "beta_proj", "A_log", "dt_bias")
PAPER_TRAIN = dict(num_steps=100_000, warmup_steps=1_000, min_lr_ratio=0.1)
PAPER_ADAMW_LR = 5e-5


def group_of(path: str, optimizer: str) -> str:
  """The reporting group of a parameter, from its path and optimizer label."""
  for gate in GATES:
    if f"/{gate}/" in f"/{path}/":
      return gate
  if "/conv_" in f"/{path}":
    return "conv filters"
  return "muon matrices" if optimizer == "muon" else "other adamw (embedding, head, norms)"


def summed_lr(train: dict, peak: float) -> float:
  schedule = learning_rate_schedule(train, peak)
  return float(sum(schedule(step) for step in range(train["num_steps"])))


def run_movement(workdir: str) -> dict:
  """Per-group movement of one run (its newest checkpoint against its initialisation)."""
  trained, config, step = restore_model(workdir)
  initial = build_model(config.model, seed=config.seed)
  labels = optimizer_labels(nnx.state(initial, nnx.Param))
  flat = lambda model: {
    path: np.asarray(leaf, np.float64)
    for path, leaf in params_by_path(nnx.to_pure_dict(nnx.state(model, nnx.Param))).items()
  }
  start, end = flat(initial), flat(trained)
  optimizers = {path: str(label) for path, label in params_by_path(labels).items()}
  train = dict(
    num_steps=step,
    warmup_steps=config.train.warmup_steps,
    min_lr_ratio=config.train.min_lr_ratio,
  )
  rates = {
    "muon": config.train.muon_lr,
    "adamw": config.train.adamw_lr,
  }
  sums = {name: summed_lr(train, lr) for name, lr in rates.items()}
  groups: dict[str, dict] = {}
  for path, theta0 in start.items():
    group = group_of(path, optimizers[path])
    entry = groups.setdefault(
      group, dict(delta_sq=0.0, init_sq=0.0, abs_delta=0.0, count=0, values=[], opt=None)
    )
    delta = end[path] - theta0
    entry["delta_sq"] += float(np.sum(delta**2))
    entry["init_sq"] += float(np.sum(theta0**2))
    entry["abs_delta"] += float(np.sum(np.abs(delta)))
    entry["count"] += theta0.size
    entry["values"].append(theta0.ravel())
    entry["opt"] = optimizers[path]
  paper_sum = summed_lr(PAPER_TRAIN, PAPER_ADAMW_LR)
  out = {}
  for group, e in groups.items():
    mean_abs = e["abs_delta"] / e["count"]
    efficiency = mean_abs / sums[e["opt"]]
    init = np.concatenate(e["values"])
    out[group] = dict(
      optimizer=e["opt"],
      lr=rates[e["opt"]],
      relative_movement=float(np.sqrt(e["delta_sq"] / max(e["init_sq"], 1e-30))),
      mean_abs_movement=mean_abs,
      drift_efficiency=efficiency,
      init_spread=float(np.std(init)) if init.size > 1 else float(abs(init[0])),
      predicted_paper_movement=efficiency * paper_sum if e["opt"] == "adamw" else None,
    )
  return dict(workdir=workdir, step=step, passes=config.sleep.passes, groups=out)


def find_runs(paths: list[str]) -> list[str]:
  runs = []
  for path in paths:
    for root, _, files in os.walk(path):
      if rundir.CONFIG_FILE in files and os.path.isdir(os.path.join(root, "checkpoints")):
        runs.append(root)
  return sorted(runs)


def main():
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("paths", nargs="+")
  parser.add_argument("--json", default=None)
  args = parser.parse_args()
  runs = [run_movement(workdir) for workdir in find_runs(args.paths)]
  if not runs:
    raise SystemExit(f"no run with a checkpoint under {args.paths}")
  groups = sorted({g for r in runs for g in r["groups"]})
  paper_sum = summed_lr(PAPER_TRAIN, PAPER_ADAMW_LR)
  print(f"{len(runs)} runs; medians over runs. Paper AdamW schedule: summed lr {paper_sum:.2f}")
  print(
    "| group | optimizer | lr | relative movement | mean abs movement | drift efficiency "
    "| init spread | predicted mean movement, paper run |"
  )
  print("|---|---|---:|---:|---:|---:|---:|---:|")
  summary = {}
  for group in groups:
    rows = [r["groups"][group] for r in runs if group in r["groups"]]
    median = lambda key, rows=rows: float(np.median([row[key] for row in rows]))
    predicted = rows[0]["predicted_paper_movement"]
    summary[group] = {
      key: median(key)
      for key in (
        "relative_movement",
        "mean_abs_movement",
        "drift_efficiency",
        "init_spread",
      )
    }
    summary[group]["optimizer"] = rows[0]["optimizer"]
    summary[group]["lr"] = rows[0]["lr"]
    if predicted is not None:
      summary[group]["predicted_paper_movement"] = median("predicted_paper_movement")
    shown = summary[group].get("predicted_paper_movement")
    print(
      f"| {group} | {rows[0]['optimizer']} | {rows[0]['lr']:g} | "
      f"{summary[group]['relative_movement']:.3f} | {summary[group]['mean_abs_movement']:.4f} | "
      f"{summary[group]['drift_efficiency']:.3f} | {summary[group]['init_spread']:.3f} | "
      f"{'' if shown is None else f'{shown:.3f}'} |"
    )
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(paper_adamw_summed_lr=paper_sum, summary=summary, runs=runs), f, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
  main()
