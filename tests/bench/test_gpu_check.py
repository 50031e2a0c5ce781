"""bench/gpu_check.py's arithmetic: the step targets judged per dtype, N=1 against N=4 at equal
training compute, and the report it writes (the GPU measurements themselves need a GPU)."""

import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "bench"))
import gpu_check  # noqa: E402


def step_row(passes, ms, dtype="float32", impl="auto"):
  return dict(passes=passes, ms_per_step=ms, gflop_per_step=100.0 * passes, impl=impl, dtype=dtype)


def test_the_step_targets_compare_n4_with_n1_by_time_and_flops():
  rows = [step_row(1, 10.0), step_row(2, 21.0), step_row(4, 42.0), step_row(1, 5.0, impl="x")]
  by_passes, targets = gpu_check.step_targets(rows, "auto")
  assert sorted(by_passes) == [1, 2, 4]  # another impl's rows are not judged
  assert targets["N=1 <= 15.0 ms/step"]["met"]
  ratio = targets["N=4/N=1 time within 10% of the FLOP ratio"]
  assert (ratio["time_ratio"], ratio["flop_ratio"]) == pytest.approx((4.2, 4.0))
  assert ratio["off_by"] == pytest.approx(0.05) and ratio["met"]
  _, slow = gpu_check.step_targets([step_row(1, 20.0), step_row(4, 100.0)], "auto")
  assert not slow["N=1 <= 15.0 ms/step"]["met"]
  assert not slow["N=4/N=1 time within 10% of the FLOP ratio"]["met"]  # 5x time for 4x FLOPs


def test_n1_and_n4_meet_at_n1s_last_compute():
  evals = lambda points: [dict(step=s, exact_accuracy=a) for s, a in points]
  curves = {
    "arms": {
      "n1": {"eval": evals([(100, 0.1), (200, 0.3)])},
      "n4": {"eval": evals([(0, 0.0), (100, 0.5), (200, 0.9)])},
    },
    "gflop_per_step": {"n1": 10.0, "n4": 40.0},  # N=1 at step 200 = N=4 at step 50: 2 TFLOP
  }
  lines = gpu_check.compute_matched(curves)
  assert lines["n1"] == [(1.0, 0.1), (2.0, 0.3)] and lines["n4"][1] == (4.0, 0.5)
  matched = gpu_check.at_equal_compute(lines)
  assert matched == pytest.approx({"tflop": 2.0, "n1": 0.3, "n4": 0.25})
  assert gpu_check.at_equal_compute({"n1": lines["n1"], "n4": lines["n4"][:1]}) is None
  assert gpu_check.at_equal_compute({"n1": lines["n1"]}) is None


def test_the_report_shows_each_dtype_and_the_equal_compute_comparison():
  rows = [step_row(1, 10.0), step_row(4, 42.0), step_row(1, 7.0, "bfloat16")]
  rows.append(dict(passes=4, dtype="bfloat16", impl="auto", error="timeout"))
  results = {
    "versions": {},
    "wall_s": 1.0,
    "sections": {
      "step": {
        "summary": {"rows": rows, "chosen_impl": "auto", "targets": {}, "projected_paper_run": {}}
      },
      "depth": {
        "curves": {"depth": 8, "num_steps": 200, "impl": "auto", "eval_every": 50},
        "final": {},
        "equal_compute": {"tflop": 2.0, "n1": 0.3, "n4": 0.25},
      },
    },
  }
  report = gpu_check.report_markdown(results)
  assert "| 1 | float32 | auto | 10.0 |" in report and "| 1 | bfloat16 | auto | 7.0 |" in report
  assert "| 4 | bfloat16 | auto | error: timeout |" in report
  assert "At equal training compute (2 TFLOP" in report and "N=1 0.300, N=4 0.250" in report


def test_a_runs_step_flops_come_from_its_saved_config(tmp_path):
  from configs import rule110 as rule110_configs
  from sleep_jax import rundir
  from sleep_jax.data import tasks
  from sleep_jax.model.config import ModelConfig
  from sleep_jax.sleep.config import SleepConfig
  from sleep_jax.sleep.flops import train_step_flops

  config = rule110_configs.get_config("tiny")
  config.sleep.passes = 4
  path = str(tmp_path / "config.json")
  rundir.write_json(path, config.to_dict())  # as a run saves it: tuples become lists
  expected = train_step_flops(
    ModelConfig.from_config(config.model),
    SleepConfig.from_config(config.sleep),
    seq_len=tasks.get_task(config.task).seq_len,
    batch_size=config.train.batch_size,
  )
  assert gpu_check.step_gflop(rundir.read_json(path)) == pytest.approx(expected / 1e9)
  config.sleep.passes = 1
  assert gpu_check.step_gflop(config.to_dict()) < expected / 1e9
  assert gpu_check.step_gflop(None) is None
