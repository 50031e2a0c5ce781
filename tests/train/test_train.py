"""The trainer end to end on the `tiny` Rule 110 config: sharding, resume, outputs, bad input."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import depo as depo_configs
from configs import rule110 as rule110_configs
from sleep_jax.train import checkpoint as ckpt
from sleep_jax.train import loop

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny_config(configs=rule110_configs, **overrides):
  config = configs.get_config("tiny")
  for dotted, value in overrides.items():
    section, field = dotted.split("__")
    config[section][field] = value
  return config


def train_log(workdir):
  with open(os.path.join(workdir, loop.TRAIN_LOG_FILE)) as f:
    lines = [json.loads(line) for line in f]
  return {line["step"]: line for line in lines}  # a resumed run re-logs redone steps: keep the last


def final_params(workdir, step):
  restored = ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), "state"))
  return restored["params"]


def test_eight_devices_data_parallel_match_one_device(tmp_path):
  assert jax.local_device_count() == 8  # tests/conftest.py fakes them
  one = loop.train_and_evaluate(tiny_config(parallel__data=1), str(tmp_path / "one"))
  eight = loop.train_and_evaluate(tiny_config(parallel__data=8), str(tmp_path / "eight"))
  log_one, log_eight = train_log(tmp_path / "one"), train_log(tmp_path / "eight")
  assert sorted(log_one) == sorted(log_eight) == [1, 2, 3, 4]
  for step in log_one:
    np.testing.assert_allclose(log_eight[step]["loss"], log_one[step]["loss"], rtol=1e-5)
  np.testing.assert_allclose(eight["eval"]["loss"], one["eval"]["loss"], rtol=1e-5)


def test_resume_after_a_kill_reproduces_the_uninterrupted_run(tmp_path):
  steps = dict(train__num_steps=6)
  straight = loop.train_and_evaluate(tiny_config(**steps), str(tmp_path / "straight"))
  # Killed after step 3: the last checkpoint is step 2, so step 3 is redone on resume.
  loop.train_and_evaluate(tiny_config(**steps), str(tmp_path / "resumed"), stop_after_step=3)
  assert max(train_log(tmp_path / "resumed")) == 3
  resumed = loop.train_and_evaluate(tiny_config(**steps), str(tmp_path / "resumed"))
  assert resumed["step"] == straight["step"] == 6
  assert resumed["eval"] == straight["eval"]
  log_a, log_b = train_log(tmp_path / "straight"), train_log(tmp_path / "resumed")
  assert [log_a[s]["loss"] for s in range(1, 7)] == [log_b[s]["loss"] for s in range(1, 7)]
  jax.tree.map(np.testing.assert_array_equal, final_params(tmp_path / "resumed", 6),
               final_params(tmp_path / "straight", 6))


def test_main_pulse_writes_checkpoints_events_and_results(tmp_path):
  workdir = tmp_path / "pulse"
  out = subprocess.run([sys.executable, os.path.join(REPO, "launch", "main.py"),
                        "--config=" + os.path.join(REPO, "configs", "rule110.py") + ":tiny",
                        f"--workdir={workdir}", "--config.sleep.passes=2"],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  files = os.listdir(workdir)
  assert {"config.json", "results.json", loop.TRAIN_LOG_FILE} <= set(files)
  assert any(f.startswith("events.out.tfevents") for f in files)
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]
  results = json.loads((workdir / "results.json").read_text())
  assert results["task"] == "rule110" and results["passes"] == 2 and results["window"] == 24
  assert results["step"] == 4 and results["tokens_seen"] == 4 * 16 * 100 and results["wall_s"] > 0
  assert {"loss", "accuracy", "exact_accuracy", "label_accuracy/0", "label_accuracy/3"} <= set(results["eval"])
  # Per-depth slices (task.eval_depths = (1, 3) in the tiny config), flat float keys.
  depth_keys = {f"depth{t}/{m}" for t in (1, 3) for m in ("exact_accuracy", "loss", "accuracy")}
  assert depth_keys <= set(results["eval"])
  assert all(isinstance(results["eval"][k], float) for k in depth_keys)
  assert results["eviction"] == "hard" and results["pattern"] == "AGAG"
  # One eval line per evaluation (every 2 steps), the last equal to results.json's.
  eval_lines = [json.loads(line) for line in (workdir / loop.EVAL_LOG_FILE).read_text().splitlines()]
  assert [line["step"] for line in eval_lines] == [2, 4]
  assert eval_lines[-1] == {"step": 4, **results["eval"]}
  assert "step 4/4" in out.stderr and "tok/s" in out.stderr and "ETA" in out.stderr


@pytest.mark.parametrize("overrides, error, message", [
    (dict(task__name="rule111"), ValueError, "unknown task.name"),
    (dict(model__pattern="AGZ"), ValueError, "pattern"),
    (dict(sleep__passes=0), ValueError, "passes"),
    (dict(sleep__window=25), ValueError, "does not tile"),
    (dict(task__depth=-1), ValueError, "depth"),
    (dict(train__batch_size=12), ValueError, "not divisible by the data-parallel size 8"),
    (dict(sleep__eviction="sliding"), ValueError, "not implemented yet"),
    (dict(sleep__context_len=72), ValueError, "context_len"),
    (dict(sleep__eviction="none", sleep__passes=2), ValueError, "passes must be 1"),
    (dict(task__eval_depths=(2, -1)), ValueError, "eval_depths"),
    (dict(eval__num_slice_examples=24), ValueError, "num_slice_examples"),
])
def test_bad_input_fails_before_anything_is_written(tmp_path, overrides, error, message):
  with pytest.raises(error, match=message):
    loop.train_and_evaluate(tiny_config(**overrides), str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_incompatible_workdir_is_refused_and_left_untouched(tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  saved = json.dumps(tiny_config().to_dict())
  (workdir / "config.json").write_text(saved)
  with pytest.raises(ValueError, match="incompatible config.*model"):
    loop.train_and_evaluate(tiny_config(model__d_model=48), str(workdir))
  assert (workdir / "config.json").read_text() == saved
  assert os.listdir(workdir) == ["config.json"]


def test_corrupt_checkpoint_is_a_clear_error_and_is_kept(tmp_path):
  workdir = tmp_path / "run"
  loop.train_and_evaluate(tiny_config(train__num_steps=2), str(workdir))
  state_dir = workdir / "checkpoints" / "2" / "state"
  for root, _, names in os.walk(state_dir):
    for name in names:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"garbage")
  with pytest.raises(RuntimeError, match="could not be restored"):
    loop.train_and_evaluate(tiny_config(train__num_steps=4), str(workdir))
  assert (workdir / "checkpoints" / "2").exists()


def test_nan_stops_training_with_a_clear_error(tmp_path):
  with pytest.raises(loop.NonFiniteLossError, match="non-finite"):
    loop.train_and_evaluate(tiny_config(train__muon_lr=float("nan")), str(tmp_path / "run"))


def test_depo_run_reports_per_hop_metrics(tmp_path):
  workdir = tmp_path / "depo"
  # The reference scan compiles in about half the time of "auto" (chunked) at these sizes.
  config = tiny_config(depo_configs, model__fast_weight_impl="reference")
  results = loop.train_and_evaluate(config, str(workdir))
  assert results["task"] == "depo" and results["window"] == 75 and results["step"] == 2
  assert results["tokens_seen"] == 2 * 16 * 360
  hop_keys = {f"hops{k}/{m}" for k in (1, 16) for m in ("loss", "accuracy")}
  assert hop_keys | {"loss", "accuracy", "exact_accuracy", "answer_accuracy"} <= set(results["eval"])
  assert all(isinstance(v, float) and np.isfinite(v) for v in results["eval"].values())
  assert json.loads((workdir / "results.json").read_text())["eval"] == results["eval"]
  assert [f"label_accuracy/{i}" for i in range(10)] == sorted(
      k for k in results["eval"] if k.startswith("label_accuracy/"))


def test_attention_only_without_eviction_trains(tmp_path):
  # The two baselines' code paths: no fast-weight blocks (empty fast state) and no eviction.
  results = loop.train_and_evaluate(tiny_config(model__pattern="AAAA", sleep__eviction="none"),
                                    str(tmp_path / "run"))
  assert results["pattern"] == "AAAA" and results["eviction"] == "none" and results["step"] == 4
  assert all(np.isfinite(line["loss"]) for line in train_log(tmp_path / "run").values())
  assert "depth3/exact_accuracy" in results["eval"]


def test_baseline_overrides_validate_on_depo():
  for overrides in (dict(sleep__eviction="none"), dict(model__pattern="AAAA")):
    task, model_cfg, sleep_cfg, _ = loop.validate(tiny_config(depo_configs, **overrides))
    assert task.context_len == sleep_cfg.context_len == 300
  _, _, sleep_cfg, _ = loop.validate(tiny_config(depo_configs, sleep__eviction="none"))
  assert sleep_cfg.num_sleep_chunks == 0


def test_changing_only_evaluation_slices_keeps_a_workdir_compatible(tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "config.json").write_text(json.dumps(tiny_config().to_dict()))
  ckpt.check_compatible_config(str(workdir), tiny_config(task__eval_depths=(2, 4, 8)).to_dict())
  with pytest.raises(ValueError, match="incompatible config.*task"):
    ckpt.check_compatible_config(str(workdir), tiny_config(task__depth=2).to_dict())
