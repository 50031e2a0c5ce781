"""Sweep reports from fake sweep directories (no training): tables, figures, TensorBoard, CLI."""

import json
import os
import pathlib
import subprocess
import sys

import matplotlib.image
import pytest

from sleep_jax import rundir
from sleep_jax.experiments import report

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(sweep_dir, arm, seed, *, task, passes, depth=None, step=10, num_steps=10, metrics):
  parts = [arm] + ([f"depth{depth}"] if depth is not None else []) + [f"seed{seed}"]
  workdir = os.path.join(sweep_dir, *parts)
  os.makedirs(workdir)
  coords = {"sweep": "fake", "arm": arm, "seed": seed, "overrides": {"sleep.passes": passes}}
  config = {
    "seed": seed,
    "task": {"name": task},
    "sleep": {"passes": passes},
    "model": {"d_model": 32, "pattern": "AGAG"},
    "train": {"num_steps": num_steps, "batch_size": 16},
  }
  if depth is not None:
    coords["depth"] = config["task"]["depth"] = depth
  results = rundir.Results(
    task=task,
    task_settings={"depth": depth} if depth is not None else {},
    passes=passes,
    window=24,
    eviction="hard",
    pattern="AGAG",
    seed=seed,
    step=step,
    num_steps=num_steps,
    tokens_seen=0,
    wall_s=60.0,
    eval=metrics,
  )
  for name, data in (
    ("sweep_run.json", coords),
    ("config.json", config),
    ("results.json", results.to_json()),
  ):
    with open(os.path.join(workdir, name), "w") as f:
      json.dump(data, f)
  with open(os.path.join(workdir, "train_log.jsonl"), "w") as f:
    for s in range(1, step + 1):
      f.write(json.dumps({"step": s, "loss": 1.0 / s + seed * 0.1, "accuracy": 0.5}) + "\n")
  with open(os.path.join(workdir, rundir.EVAL_LOG_FILE), "w") as f:
    for s in (5, 10):
      f.write(json.dumps({"step": s, **{k: v * s / 10 for k, v in metrics.items()}}) + "\n")


def write_grid(sweep_dir, base, arms, seeds, depths):
  runs = [
    {"arm": a, "seed": s, **({"depth": d} if d is not None else {})}
    for s in seeds
    for d in (depths or [None])
    for a in arms
  ]
  with open(os.path.join(sweep_dir, "sweep.json"), "w") as f:
    json.dump(
      {"name": "fake", "base": base, "arms": arms, "seeds": seeds, "depths": depths, "runs": runs},
      f,
    )


@pytest.fixture
def rule110_sweep(tmp_path):
  sweep_dir = str(tmp_path / "rule110")
  accuracies = {("n1", 0): 0.2, ("n1", 1): 0.3, ("n2", 0): 0.5, ("n2", 1): 0.7}
  for (arm, seed), acc in accuracies.items():
    metrics = {
      "loss": 1.0 - acc,
      "accuracy": acc,
      "exact_accuracy": acc,
      "depth2/exact_accuracy": acc,
      "depth4/exact_accuracy": acc / 2,
    }
    write_run(sweep_dir, arm, seed, task="rule110", passes=int(arm[1]), depth=4, metrics=metrics)
  # A third seed that was interrupted: it must not enter the means, only the run list.
  write_run(
    sweep_dir, "n2", 2, task="rule110", passes=2, depth=4, step=5, metrics={"exact_accuracy": 0.9}
  )
  write_grid(sweep_dir, "configs/rule110.py:cpu", ["n1", "n2"], [0, 1, 2], [4])
  return sweep_dir


def check_pngs(directory, names):
  for name in names:
    path = os.path.join(directory, f"{name}.png")
    with open(path, "rb") as f:
      assert f.read(8) == PNG_MAGIC, path
    assert matplotlib.image.imread(path).shape[:2] == (400, 600)


def test_rule110_report_tables_figures_and_tensorboard(rule110_sweep):
  path = report.write_report(rule110_sweep)
  text = pathlib.Path(path).read_text()
  # exact accuracy in %: mean ± sample std (finished/expected)
  assert "| n1 | 25.0 ± 7.1 (2/3) | ~10% |" in text
  assert "| n2 | 60.0 ± 14.1 (2/3) | ~20% |" in text
  assert "| n1 | 0.750 ± 0.071 (2/3) |" in text  # eval loss
  assert "t=4: not comparable: depth 4 (paper: 32)" in text
  assert "4/6 runs finished, 1 in progress or failed, 1 not started" in text
  assert "n2/depth4/seed2 | n2 | 2 | 4 | 5/10 | 0.9000" in text  # the interrupted run is listed
  check_pngs(
    rule110_sweep,
    [
      "accuracy_vs_passes",
      "train_loss_depth4",
      "eval_exact_accuracy_depth4",
      "per_depth_eval_depth4",
    ],
  )
  assert "![accuracy_vs_passes](accuracy_vs_passes.png)" in text
  events = os.listdir(os.path.join(rule110_sweep, "report_tb"))
  assert any(name.startswith("events.out.tfevents") for name in events)


def test_report_of_an_empty_or_partial_sweep(tmp_path):
  sweep_dir = str(tmp_path / "empty")
  os.makedirs(sweep_dir)
  write_grid(sweep_dir, "configs/rule110.py:cpu", ["n1", "n2"], [0], [8])
  with open(report.write_report(sweep_dir, tensorboard=False)) as f:
    text = f.read()
  assert "| n1 | - (0/1) | ~10% |" in text and "0/2 runs finished" in text


def test_depo_report(tmp_path):
  sweep_dir = str(tmp_path / "depo")
  for arm, passes in (("n1", 1), ("n4", 4)):
    for seed in (0, 1):
      metrics = {"loss": 1.0, "accuracy": 0.5}
      for k in report.DEPO_HOPS:
        metrics[f"hops{k}/loss"] = k / passes + seed
        metrics[f"hops{k}/accuracy"] = min(1.0, passes / k)
      write_run(sweep_dir, arm, seed, task="depo", passes=passes, metrics=metrics)
  write_grid(sweep_dir, "configs/depo.py:cpu", ["n1", "n4"], [0, 1], [])
  with open(report.write_report(sweep_dir)) as f:
    text = f.read()
  # loss at k=16: n1 -> 16, 17 (mean 16.5, std 0.707); n4 -> 4, 5
  assert (
    "| n1 | 1.500 ± 0.707 (2/2) | 2.500 ± 0.707 (2/2) | 4.500 ± 0.707 (2/2) | "
    "8.500 ± 0.707 (2/2) | 16.500 ± 0.707 (2/2) | 1.000 ± 0.000 (2/2) |" in text
  )
  assert (
    "| n4 | 100.0 ± 0.0 (2/2) | 100.0 ± 0.0 (2/2) | 100.0 ± 0.0 (2/2) | 50.0 ± 0.0 (2/2) | "
    "25.0 ± 0.0 (2/2) |" in text
  )
  assert "only N=4 starts to improve at k = 16" in text and "not comparable" in text
  check_pngs(sweep_dir, ["loss_vs_hops", "accuracy_vs_hops", "train_loss", "eval_loss"])


def test_cli_writes_to_the_out_dir(rule110_sweep, tmp_path):
  out_dir = tmp_path / "docs" / "results" / "fake"
  out = subprocess.run(
    [sys.executable, "-m", "sleep_jax.experiments.report", rule110_sweep, f"--out={out_dir}"],
    capture_output=True,
    text=True,
    cwd=REPO,
    timeout=120,
  )
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == str(out_dir / "report.md")
  assert "| n2 | 60.0 ± 14.1 (2/3) |" in (out_dir / "report.md").read_text()
  check_pngs(out_dir, ["accuracy_vs_passes"])
  assert not (out_dir / "report_tb").exists()  # event files stay in the sweep dir


def test_summary_table_puts_the_arms_side_by_side(rule110_sweep):
  lines = report.summary_table(rule110_sweep).splitlines()
  assert lines[0].split() == ["arm", "runs", "exact", "acc", "%", "acc", "%", "loss"]
  rows = {line.split()[0]: line for line in lines[2:]}
  # mean ± std over the finished seeds only (the interrupted n2 seed 2 is left out)
  assert rows["n1"].split()[1:6] == ["(t=4)", "2", "25.0", "±", "7.1"]
  assert rows["n2"].split()[1:6] == ["(t=4)", "2", "60.0", "±", "14.1"]


def test_gsm_infinite_report_is_per_operation_count(tmp_path):
  sweep_dir = str(tmp_path / "gsm")
  for arm, passes in (("n1", 1), ("n2", 2)):
    metrics = {"loss": 1.0, "answer_accuracy": 0.5}
    for ops in (2, 4):
      metrics[f"ops{ops}/loss"] = ops / passes
      metrics[f"ops{ops}/accuracy"] = passes / (2 * ops)
    write_run(sweep_dir, arm, 0, task="gsm_infinite", passes=passes, metrics=metrics)
  write_grid(sweep_dir, "configs/gsm_infinite.py:cpu", ["n1", "n2"], [0], [])
  with open(report.write_report(sweep_dir, tensorboard=False)) as f:
    text = f.read()
  assert "per operation count" in text and "| arm | ops=2 | ops=4 | all ops |" in text
  assert "| n2 | 50.0 (1/1) | 25.0 (1/1) | 50.0 (1/1) |" in text
  assert "6 ops 0.419 -> 0.615" in text
  check_pngs(sweep_dir, ["loss_vs_ops", "accuracy_vs_ops"])
  assert "ops=4 acc %" in report.summary_table(sweep_dir)
