"""The adaptive-sleep report sections, from a fake mixed-depth sweep (no training)."""

import json
import os
import pathlib

import matplotlib.image
import pytest

from sleep_jax import rundir
from sleep_jax.data import rule110
from sleep_jax.experiments import report

DEPTHS = (0, 2, 4)


def write_run(sweep_dir, arm, seed, *, passes, halt="never", metrics, step=10, in_sweep=True):
  """A finished (or, with step < 10, interrupted) mixed-depth Rule 110 run; `in_sweep=False`
  leaves out sweep_run.json, as for a run of launch/main.py."""
  workdir = os.path.join(sweep_dir, arm, f"seed{seed}")
  os.makedirs(workdir)
  config = {
    "seed": seed,
    "task": {"name": "rule110", "depth": 2, "depths": list(DEPTHS), "eval_depths": list(DEPTHS)},
    "sleep": {"passes": passes, "halt": halt},
    "model": {"d_model": 64, "pattern": "AGAG"},
    "train": {"num_steps": 10, "batch_size": 32},
  }
  results = rundir.Results(
    task="rule110",
    task_settings={"depths": list(DEPTHS)},
    passes=passes,
    window=24,
    eviction="hard",
    pattern="AGAG",
    seed=seed,
    step=step,
    num_steps=10,
    tokens_seen=0,
    wall_s=60.0,
    eval=metrics,
  )
  coords = {"sweep": "adaptive", "arm": arm, "seed": seed}
  files = {rundir.CONFIG_FILE: config, rundir.RESULTS_FILE: results.to_json()}
  if in_sweep:
    files[rundir.SWEEP_RUN_FILE] = coords
  for name, data in files.items():
    pathlib.Path(workdir, name).write_text(json.dumps(data))
  log = "".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, step + 1))
  pathlib.Path(workdir, rundir.TRAIN_LOG_FILE).write_text(log)


def accuracy_metrics(main, per_depth):
  metrics = {"loss": 1.0 - main, "accuracy": main, "exact_accuracy": main}
  for t, acc in zip(DEPTHS, per_depth, strict=True):
    metrics[f"depth{t}/exact_accuracy"] = acc
  return metrics


def passes_metrics(main, per_depth, hist):
  """passes_mean on every set; passes_hist/n on the main set and (the same) on each slice."""
  metrics = {"passes_mean": main}
  for t, mean in zip(DEPTHS, per_depth, strict=True):
    metrics[f"depth{t}/passes_mean"] = mean
  for n, share in enumerate(hist, 1):
    metrics[f"passes_hist/{n}"] = share
    for t in DEPTHS:
      metrics[f"depth{t}/passes_hist/{n}"] = share
  return metrics


@pytest.fixture
def adaptive_sweep(tmp_path):
  sweep_dir = str(tmp_path / "adaptive")
  write_run(sweep_dir, "n1", 0, passes=1, metrics=accuracy_metrics(0.2, (0.5, 0.2, 0.1)))
  write_run(sweep_dir, "n1", 1, passes=1, metrics=accuracy_metrics(0.3, (0.7, 0.2, 0.1)))
  write_run(sweep_dir, "n4", 0, passes=4, metrics=accuracy_metrics(0.4, (0.9, 0.3, 0.2)))
  write_run(sweep_dir, "n4", 1, passes=4, metrics=accuracy_metrics(0.6, (0.9, 0.5, 0.4)))
  for seed, main, per_depth, hist in (
    (0, 2.0, (1.0, 2.0, 3.0), (0.5, 0.0, 0.0, 0.5)),
    (1, 3.0, (1.5, 2.5, 3.5), (0.25, 0.25, 0.25, 0.25)),
  ):
    metrics = accuracy_metrics(0.5, (0.8, 0.4, 0.3)) | passes_metrics(main, per_depth, hist)
    write_run(sweep_dir, "converge_a", seed, passes=4, halt="converge", metrics=metrics)
  # An interrupted seed: listed, but in no mean.
  write_run(
    sweep_dir,
    "converge_a",
    2,
    passes=4,
    halt="converge",
    step=5,
    metrics=accuracy_metrics(0.9, (0.9, 0.9, 0.9)) | passes_metrics(4.0, (4.0,) * 3, (0, 0, 0, 1)),
  )
  arms = ["n1", "n4", "converge_a"]
  runs = [{"arm": a, "seed": s} for s in (0, 1, 2) for a in arms]
  grid = {"name": "adaptive", "base": "configs/rule110.py:cpu", "arms": arms, "seeds": [0, 1, 2]}
  pathlib.Path(sweep_dir, rundir.SWEEP_FILE).write_text(
    json.dumps(grid | {"depths": [], "runs": runs})
  )
  return sweep_dir


def test_adaptive_report_tables_per_depth_from_the_fake_numbers(adaptive_sweep):
  text = pathlib.Path(report.write_report(adaptive_sweep, tensorboard=False)).read_text()
  # The mixed-depth runs group as one training setting, out of 3 expected seeds each.
  assert "| arm | t∈{0,2,4} | paper, t=32 (Fig. 2) |" in text
  assert "| n1 | 25.0 ± 7.1 (2/3) | ~10% |" in text
  # (a) exact accuracy per evaluated depth: main set, then t=0, 2, 4
  assert "## Adaptive sleep (trained at t∈{0,2,4}): exact accuracy (%) per evaluated depth" in text
  assert "| arm | halt | main set | t=0 | t=2 | t=4 |" in text
  assert (
    "| n4 | never | 50.0 ± 14.1 (2/3) | 90.0 ± 0.0 (2/3) | 40.0 ± 14.1 (2/3) | 30.0 ± 14.1 (2/3) |"
    in text
  )
  assert (
    "| converge_a | converge | 50.0 ± 0.0 (2/3) | 80.0 ± 0.0 (2/3) | 40.0 ± 0.0 (2/3) | "
    "30.0 ± 0.0 (2/3) |" in text
  )
  # (b) passes used: fixed arms N, the adaptive arm its passes_mean (seeds 2 and 3 -> 2.50 ±
  # 0.71), and deepest minus shallowest paired per run: (3 - 1, 3.5 - 1.5) -> +2.00 ± 0.00
  assert "| arm | main set | t=0 | t=2 | t=4 | t=4 − t=0 |" in text
  assert "| n4 | 4 (fixed) | 4 (fixed) | 4 (fixed) | 4 (fixed) | - |" in text
  assert (
    "| converge_a | 2.50 ± 0.71 (2/3) | 1.25 ± 0.35 (2/3) | 2.25 ± 0.35 (2/3) | "
    "3.25 ± 0.35 (2/3) | +2.00 ± 0.00 (2) |" in text
  )
  # (d) the histogram: seed means of the shares, in %
  assert "| arm | set | n=1 | n=2 | n=3 | n=4 |" in text
  assert "| converge_a | main set | 37.5 | 12.5 | 12.5 | 37.5 |" in text
  assert "| converge_a | t=4 | 37.5 | 12.5 | 12.5 | 37.5 |" in text
  assert "| n1 | main set |" not in text  # fixed arms have no histogram
  assert "passes_hist_n4" not in text
  # The floors beside (a): the mix's own, then each depth's.
  floors = [rule110.majority_baseline(d) for d in (DEPTHS, *DEPTHS)]
  assert (
    "| majority label (best constant answer) | - | "
    + " | ".join(f"{100 * f:.1f}" for f in floors)
    + " |"
    in text
  )
  # (c) the Pareto figures (main set and each slice) and the histogram figure exist
  figures = [
    "pareto_depths0-2-4",
    *(f"pareto_depths0-2-4_depth{t}" for t in DEPTHS),
    "passes_hist_converge_a_depths0-2-4",
    "accuracy_vs_passes",
    "train_loss_depths0-2-4",
  ]
  for name in figures:
    assert f"![{name}]({name}.png)" in text
    image = matplotlib.image.imread(os.path.join(adaptive_sweep, f"{name}.png"))
    assert image.shape[:2] == (400, 600)
  # The adaptive sections come before the figures.
  assert text.index("## Adaptive sleep") < text.index("## Figures")


def test_passes_used_is_n_for_fixed_arms_and_the_metric_for_adaptive_ones(adaptive_sweep):
  runs = {(r.arm, r.seed): r for r in report.load_runs(adaptive_sweep)}
  assert runs[("n4", 0)].depth == DEPTHS and runs[("n4", 0)].halt == "never"
  assert report.passes_used(runs[("n4", 0)], "depth0/") == 4.0
  assert report.passes_used(runs[("converge_a", 1)]) == 3.0
  assert report.passes_used(runs[("converge_a", 1)], "depth4/") == 3.5
  assert report.passes_used(runs[("converge_a", 1)], "depth8/") is None


def test_a_sweep_without_adaptive_arms_has_no_adaptive_sections(tmp_path):
  sweep_dir = str(tmp_path / "fixed")
  write_run(sweep_dir, "n1", 0, passes=1, metrics=accuracy_metrics(0.2, (0.5, 0.2, 0.1)))
  text = pathlib.Path(report.write_report(sweep_dir, tensorboard=False)).read_text()
  assert "| n1 | 20.0 (1/1) | ~10% |" in text and "Adaptive sleep" not in text
  assert "## Runs" in text and "| n1/seed0 | n1 | 0 | {0,2,4} | 10/10 | 0.2000 |" in text


def test_runs_outside_a_sweep_are_named_by_passes_and_halting_rule(tmp_path):
  sweep_dir = str(tmp_path / "loose")
  metrics = accuracy_metrics(0.2, (0.5, 0.2, 0.1))
  write_run(sweep_dir, "a", 0, passes=4, metrics=metrics, in_sweep=False)
  passes = passes_metrics(2.0, (1.0, 2.0, 3.0), (0.5, 0.0, 0.0, 0.5))
  write_run(sweep_dir, "b", 0, passes=4, halt="converge", metrics=metrics | passes, in_sweep=False)
  assert sorted(r.arm for r in report.load_runs(sweep_dir)) == ["n4", "n4_converge"]
  text = pathlib.Path(report.write_report(sweep_dir, tensorboard=False)).read_text()
  assert "| n4 | 4 (fixed) |" in text and "| n4_converge | 2.00 (1/1) |" in text
