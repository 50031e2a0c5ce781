"""The run directory: results schema, atomic JSON, torn JSON lines, the config guard, and the
promise that configs, run directories and reports load without JAX or the trainer."""

import json
import os
import subprocess
import sys

import pytest

from sleep_jax import rundir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def results(**changes):
  fields = dict(
    task="rule110",
    task_settings={"depth": 2},
    passes=2,
    window=24,
    eviction="hard",
    pattern="AGAG",
    seed=0,
    step=4,
    num_steps=4,
    tokens_seen=6400,
    wall_s=1.5,
    eval={"loss": 0.5, "depth4/exact_accuracy": 0.25},
  )
  fields.update(changes)
  return rundir.Results(**fields)


def test_results_round_trip_and_schema_lists_every_field(tmp_path):
  run = rundir.RunDir(str(tmp_path))
  run.write_results(results())
  assert run.results() == results() and run.results().finished
  assert set(rundir.RESULTS_SCHEMA["required"]) == set(results().to_json())
  assert set(rundir.RESULTS_SCHEMA["properties"]) == set(results().to_json())


@pytest.mark.parametrize(
  "broken, message",
  [
    ({"step": "4"}, "field 'step' should be integer"),
    ({"eval": [0.5]}, "field 'eval' should be object"),
    ({"passes": True}, "field 'passes' should be integer"),
  ],
)
def test_results_with_a_wrong_field_are_refused_by_name(broken, message):
  with pytest.raises(ValueError, match=message):
    rundir.Results.from_json({**results().to_json(), **broken})
  value = results().to_json()
  del value["num_steps"]
  with pytest.raises(ValueError, match=r"missing fields \['num_steps'\]"):
    rundir.Results.from_json(value)


def test_a_damaged_results_file_reads_as_no_results(tmp_path):
  (tmp_path / rundir.RESULTS_FILE).write_text('{"task": "rule1')
  run = rundir.RunDir(str(tmp_path))
  assert run.results() is None and not run.is_finished(4)


def test_json_is_replaced_atomically_and_leaves_no_temporary_files(tmp_path, monkeypatch):
  path = str(tmp_path / "x.json")
  rundir.write_json(path, {"a": 1})
  real_dump = json.dump

  def dump_then_crash(value, f, **kwargs):
    real_dump(value, f, **kwargs)
    raise KeyboardInterrupt  # killed half-way through writing the new version

  monkeypatch.setattr(json, "dump", dump_then_crash)
  with pytest.raises(KeyboardInterrupt):
    rundir.write_json(path, {"a": 2})
  assert rundir.read_json(path) == {"a": 1}
  assert os.listdir(tmp_path) == ["x.json"]


def test_json_lines_skip_a_torn_last_line_and_keep_the_last_of_each_step(tmp_path):
  path = str(tmp_path / "log.jsonl")
  for record in ({"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}, {"step": 2, "loss": 1.5}):
    rundir.append_jsonl(path, record)
  with open(path, "a") as f:
    f.write('{"step": 3, "lo')  # killed while appending
  assert rundir.read_jsonl(path) == [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 1.5}]
  assert rundir.read_jsonl(str(tmp_path / "missing.jsonl")) == []


def test_the_config_guard_allows_loop_settings_and_refuses_the_rest(tmp_path):
  run = rundir.RunDir(str(tmp_path / "run"))
  config = {
    "seed": 0,
    "task": {"name": "rule110", "depth": 2, "eval_depths": [1]},
    "model": {"d_model": 32},
    "train": {"batch_size": 16, "num_steps": 4, "muon_lr": 1e-3},
    "sleep": {
      "passes": 2,
      "window": 24,
      "eviction": "hard",
      "context_len": 96,
      "grad_passes": None,
    },
  }
  run.check_compatible_config(config)  # nothing saved yet: anything goes
  run.write_config(config)
  longer = json.loads(json.dumps(config))
  longer["train"].update(num_steps=8, muon_lr=1e-4)
  longer["task"]["eval_depths"] = (1, 2, 4)
  run.check_compatible_config(longer)
  for section, field, value in (
    ("sleep", "passes", 4),
    ("train", "batch_size", 32),
    ("model", "d_model", 64),
    ("task", "depth", 3),
    ("sleep", "halt", "converge"),
  ):
    other = json.loads(json.dumps(config))
    other[section][field] = value
    with pytest.raises(rundir.WorkdirError, match=f"{section}.*saved.*vs new"):
      run.check_compatible_config(other)
  # A run saved before the schedule options existed resumes under their defaults only.
  newer = json.loads(json.dumps(config))
  newer["sleep"].update(predict_chunks=None, predict_then_sleep=False, conv_state="reset")
  defaults = {"sleep.predict_chunks": None, "sleep.predict_then_sleep": False}
  defaults["sleep.conv_state"] = "reset"
  run.check_compatible_config(newer, defaults=defaults)
  with pytest.raises(rundir.WorkdirError, match="conv_state: saved None vs new 'reset'"):
    run.check_compatible_config(newer)  # without the defaults, a missing field is None
  newer["sleep"]["conv_state"] = "carry"
  with pytest.raises(rundir.WorkdirError, match="conv_state: saved 'reset' vs new 'carry'"):
    run.check_compatible_config(newer, defaults=defaults)
  # So do fields added to the task section (Rule 110's mixed depths) and the halting rule.
  newer = json.loads(json.dumps(config))
  newer["task"]["depths"] = []
  newer["sleep"].update(halt="never", halt_tol=0.0)
  defaults = {"task.depths": (), "sleep.halt": "never", "sleep.halt_tol": 0.0}
  run.check_compatible_config(newer, defaults=defaults)
  newer["task"]["depths"] = [0, 2]
  with pytest.raises(rundir.WorkdirError, match=r"task.depths: saved \[\] vs new \[0, 2\]"):
    run.check_compatible_config(newer, defaults=defaults)
  assert rundir.read_json(run.file(rundir.CONFIG_FILE)) == config


def test_configs_run_directories_and_reports_load_without_jax_or_the_trainer():
  heavy = ("jax", "flax", "orbax.checkpoint", "grain", "tensorboardX", "optax")
  code = (
    "import sys; sys.path.insert(0, '.');"
    "import sleep_jax, sleep_jax.rundir, sleep_jax.experiments.report,"
    " sleep_jax.experiments.sweeps, sleep_jax.experiments.jobs;"
    "from configs import rule110, depo; rule110.get_config('cpu'); depo.get_config('cpu');"
    f"loaded = [m for m in {heavy!r} if m in sys.modules];"
    "print(loaded); sys.exit(bool(loaded))"
  )
  out = subprocess.run(
    [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120
  )
  assert out.returncode == 0, out.stdout + out.stderr


def test_importing_the_package_sets_no_xla_flags():
  code = (
    "import os; os.environ.pop('XLA_FLAGS', None); import sleep_jax, sleep_jax.model.lm;"
    "import sys; sys.exit('XLA_FLAGS' in os.environ)"
  )
  out = subprocess.run(
    [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120
  )
  assert out.returncode == 0, out.stderr
