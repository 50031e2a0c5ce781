"""Sweeps without training: grid expansion, skip/resume logic, failures, XManager job lists."""

import os
import subprocess
import sys
import textwrap

import pytest
from absl import flags
from ml_collections import config_dict, config_flags

from sleep_jax import rundir
from sleep_jax.experiments import config_files, sweeps
from sleep_jax.experiments import jobs as jobs_lib
from sleep_jax.train.config import ExperimentConfig

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def sweep_config(name):
  """A named sweep: "depo_cpu" or, with a variant, "gsm_pretrained:ouro"."""
  file, _, variant = name.partition(":")
  path = os.path.join(REPO, "configs", "sweeps", f"{file}.py")
  return config_files.load_config(f"{path}:{variant}" if variant else path)


def tiny_sweep(seeds=(0, 1)):
  c = config_dict.ConfigDict()
  c.name = "tiny"
  c.base = "configs/rule110.py:tiny"
  c.seeds = seeds
  c.depths = (1, 2)
  c.num_steps = 4
  c.overrides = config_dict.ConfigDict({"eval": {"every_steps": 2}})
  c.arms = (sweeps.arm("n1", {"sleep.passes": 1}), sweeps.arm("n2", {"sleep.passes": 2}))
  return c


def test_rule110_cpu_grid_counts_workdirs_and_overrides(tmp_path):
  runs = sweeps.expand_runs(sweep_config("rule110_cpu"), str(tmp_path))
  assert len(runs) == 6 * 1 * 3  # arms x depths x seeds
  assert len({r.workdir for r in runs}) == len(runs)
  assert [r.seed for r in runs[:6]] == [0] * 6  # seeds outermost: every arm at seed 0 first
  by_name = {(r.arm, r.depth, r.seed): r for r in runs}
  n2 = by_name[("n2", 2, 1)]
  assert n2.workdir == str(tmp_path / "n2" / "depth2" / "seed1")
  assert n2.overrides["sleep.passes"] == 2 and n2.overrides["seed"] == 1
  assert n2.overrides["task.depth"] == 2 and n2.overrides["eval.every_steps"] == 40
  assert n2.num_steps == 160
  matched = by_name[("n1_compute_matched", 2, 0)]
  assert matched.num_steps == round((4 * 96 + 4) / 100 * 160) == 621
  assert matched.overrides["sleep.passes"] == 1
  assert by_name[("attention_only", 2, 0)].overrides["model.pattern"] == "AAAA"
  config = config_files.apply_overrides(config_files.load_config(n2.base), n2.overrides)
  assert (config.sleep.passes, config.seed, config.task.depth, config.train.num_steps) == (
    2,
    1,
    2,
    160,
  )
  assert config.is_locked


@pytest.mark.parametrize(
  "name, count",
  [
    ("rule110_gpu", 3),
    ("rule110_paper", 5),
    ("rule110_fig2a", 6),
    ("rule110_muon_lr", 5),
    ("depo_cpu", 12),
    ("depo_paper", 5),
    ("gsm_cpu", 3),
    ("gsm_pretrained:jet_nemotron", 4),
    ("gsm_pretrained:ouro", 3),
    ("gsm_pretrained:ouro_sliding", 3),
  ],
)
def test_other_sweeps_expand(tmp_path, name, count):
  if name.startswith("depo") and not os.path.exists(os.path.join(REPO, "configs", "depo.py")):
    pytest.skip("configs/depo.py is not written yet")
  runs = sweeps.expand_runs(sweep_config(name), str(tmp_path))
  assert len(runs) == count and len({r.workdir for r in runs}) == count
  if name.startswith("depo"):
    assert all(r.depth is None and "task.depth" not in r.overrides for r in runs)
    assert all(r.workdir.endswith(f"{r.arm}{os.sep}seed{r.seed}") for r in runs)
  if name == "depo_cpu":
    matched = [r for r in runs if r.arm == "n1_compute_matched"][0]
    n1 = [r for r in runs if r.arm == "n1"][0]
    assert matched.num_steps == round(3.5 * n1.num_steps)
  if name == "rule110_gpu":
    assert {r.num_steps for r in runs} == {2700} and {r.depth for r in runs} == {8}
  if name.startswith(
    "gsm_pretrained"
  ):  # the converted checkpoint and its tokenizer reach every run
    assert all(r.overrides["init_from"] and r.overrides["task.tokenizer"] for r in runs)
    assert sorted(r.overrides["sleep.passes"] for r in runs)[-1] == (6 if "jet" in name else 4)


def test_seed_override_only_filter_and_bad_keys(tmp_path):
  config = tiny_sweep(seeds=(7,))
  runs = sweeps.expand_runs(config, str(tmp_path), only="n2")
  assert [(r.arm, r.seed, r.depth) for r in runs] == [("n2", 7, 1), ("n2", 7, 2)]
  with pytest.raises(ValueError, match="not an arm"):
    sweeps.expand_runs(config, str(tmp_path), only="n3")
  config.arms = (sweeps.arm("typo", {"sleep.pases": 2}),)
  with pytest.raises(KeyError, match="sleep.pases"):
    sweeps.expand_runs(config, str(tmp_path))


def write_results(workdir, step, num_steps=4):
  """A results.json as the trainer writes it, at `step`."""
  os.makedirs(workdir, exist_ok=True)
  rundir.RunDir(str(workdir)).write_results(
    rundir.Results(
      task="rule110",
      task_settings={"depth": 1},
      passes=1,
      window=24,
      eviction="hard",
      pattern="AGAG",
      seed=0,
      step=step,
      num_steps=num_steps,
      tokens_seen=step * 1600,
      wall_s=1.0,
      eval={"exact_accuracy": 0.5},
    )
  )


def test_run_sweep_skips_finished_survives_a_failure_and_resumes(tmp_path):
  sweep_dir = str(tmp_path / "sweep")
  write_results(os.path.join(sweep_dir, "n1", "depth1", "seed1"), 4)  # finished earlier
  write_results(os.path.join(sweep_dir, "n2", "depth1", "seed1"), 2)  # interrupted at step 2
  calls, fail_on = [], [(2, 2, 0)]  # (passes, depth, seed) of the run that crashes

  def fake_train(config, workdir):
    calls.append(os.path.relpath(workdir, sweep_dir))
    assert rundir.read_json(os.path.join(workdir, rundir.SWEEP_RUN_FILE))["seed"] == config.seed
    if (config.sleep.passes, config.task.depth, config.seed) in fail_on:
      raise RuntimeError("simulated crash")
    write_results(workdir, config.train.num_steps, config.train.num_steps)

  failures = sweeps.run_sweep(tiny_sweep(), sweep_dir, train_fn=fake_train)
  assert len(calls) == 7 and os.path.join("n1", "depth1", "seed1") not in calls
  assert os.path.join("n2", "depth1", "seed1") in calls  # unfinished: run again (resumes)
  assert [(r.arm, r.depth, r.seed) for r, _ in failures] == [("n2", 2, 0)]
  assert "simulated crash" in failures[0][1]
  coords = rundir.read_json(os.path.join(sweep_dir, "n2", "depth2", "seed0", rundir.SWEEP_RUN_FILE))
  assert coords["arm"] == "n2" and coords["depth"] == 2 and coords["overrides"]["sleep.passes"] == 2
  grid = rundir.read_json(os.path.join(sweep_dir, rundir.SWEEP_FILE))
  assert grid["arms"] == ["n1", "n2"] and len(grid["runs"]) == 8

  calls.clear()  # rerun the same sweep: only the failed run trains again
  fail_on.clear()
  failures = sweeps.run_sweep(tiny_sweep(), sweep_dir, train_fn=fake_train)
  assert failures == [] and calls == [os.path.join("n2", "depth2", "seed0")]


def test_run_sweep_only_runs_one_arm(tmp_path):
  seen = []
  sweeps.run_sweep(
    tiny_sweep(seeds=(0,)),
    str(tmp_path),
    only="n1",
    train_fn=lambda config, workdir: seen.append((workdir, config.sleep.passes)),
  )
  assert seen == [
    (str(tmp_path / "n1" / "depth1" / "seed0"), 1),
    (str(tmp_path / "n1" / "depth2" / "seed0"), 1),
  ]


def test_xmanager_dry_run_jobs_parse_back_to_the_run_configs(tmp_path):
  config = sweep_config("rule110_cpu")
  jobs = jobs_lib.make_jobs(config, str(tmp_path))
  runs = sweeps.expand_runs(config, str(tmp_path))
  assert len(jobs) == len(runs) == 18 and len({j.args["workdir"] for j in jobs}) == 18
  for job, run in zip(jobs, runs):
    command = job.command()
    assert command[:2] == ["python", "launch/main.py"] and f"--workdir={run.workdir}" in command
    # Parse the flags the way launch/main.py does, and compare with the sweep's own config.
    argv = [command[1], *(a.replace("configs/", f"{REPO}/configs/", 1) for a in command[2:])]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, sys_argv=argv)
    flags.DEFINE_string("workdir", None, "", flag_values=flag_values)
    flag_values(argv)
    assert flag_values.workdir == run.workdir
    assert (
      flag_values.config.to_dict()
      == config_files.apply_overrides(config_files.load_config(run.base), run.overrides).to_dict()
    )


def test_job_cost_is_the_step_flops_times_the_steps_at_the_measured_rate(tmp_path):
  from sleep_jax.model.config import ModelConfig
  from sleep_jax.sleep.config import SleepConfig
  from sleep_jax.sleep.flops import train_step_flops

  runs = sweeps.expand_runs(sweep_config("rule110_paper"), str(tmp_path))
  costs = {run.arm: jobs_lib.run_cost(run, str(tmp_path)) for run in runs}
  paper = config_files.load_config("configs/rule110.py:paper")
  step = train_step_flops(
    ModelConfig.from_config(paper.model),
    SleepConfig.from_config(paper.sleep),
    seq_len=100,
    batch_size=512,
  )
  assert costs["n1"].flops == pytest.approx(step * 100_000)
  assert costs["n1"].hours == pytest.approx(step * 100_000 / jobs_lib.MEASURED_FLOP_RATE / 3600)
  assert costs["n1"].tokens == 512 * 100 * 100_000
  # The measured H100 step took 93.8 ms at N=1 and 350.6 ms at N=4 (docs/results/gpu).
  assert costs["n1"].hours == pytest.approx(100_000 * 0.0938 / 3600, rel=0.01)
  assert costs["n4"].hours / costs["n1"].hours == pytest.approx(3.88, rel=0.01)


def test_sweep_cli_dry_run_lists_runs(tmp_path):
  write_results(tmp_path / "n1" / "depth8" / "seed0", 2700, 2700)
  out = subprocess.run(
    [
      sys.executable,
      "launch/sweep.py",
      "--config=configs/sweeps/rule110_gpu.py",
      f"--sweep_dir={tmp_path}",
      "--dry_run",
      "--config.seeds=0,1",
    ],
    capture_output=True,
    text=True,
    cwd=REPO,
    timeout=120,
  )
  assert out.returncode == 0, out.stderr[-2000:]
  lines = out.stdout.strip().splitlines()
  assert lines[-1] == "6 runs" and lines[0].startswith("done") and lines[1].startswith("todo")


@pytest.mark.slow
def test_tiny_sweep_end_to_end(tmp_path):
  config_file = tmp_path / "tiny_sweep.py"
  config_file.write_text(
    textwrap.dedent("""
      from ml_collections import config_dict
      from sleep_jax.experiments.sweeps import arm
      def get_config():
        c = config_dict.ConfigDict()
        c.name, c.base, c.seeds, c.depths, c.num_steps = "tiny", "configs/rule110.py:tiny", (0,), (1,), 4
        c.overrides = config_dict.ConfigDict()
        c.arms = (arm("n1", {"sleep.passes": 1}), arm("n2", {"sleep.passes": 2}))
        return c
  """)
  )
  sweep_dir = tmp_path / "sweep"
  command = [
    sys.executable,
    "launch/sweep.py",
    f"--config={config_file}",
    f"--sweep_dir={sweep_dir}",
  ]
  out = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  for arm in ("n1", "n2"):
    results = rundir.read_json(sweep_dir / arm / "depth1" / "seed0" / "results.json")
    assert results["step"] == 4 and results["passes"] == int(arm[1])
  report = (sweep_dir / "report.md").read_text()
  assert (
    "| n1 |" in report and "| n2 |" in report and (sweep_dir / "accuracy_vs_passes.png").exists()
  )
  assert "arms side by side" in out.stderr and "n1 (t=1)" in out.stderr  # the closing table
  again = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600)
  assert again.returncode == 0 and again.stderr.count("finished already, skipped") == 2


def test_the_depo_paper_model_is_named_for_the_reading_it_implements():
  """The paper's text and its Fig. 3 caption describe different Depo models (issue 11, item 4)."""
  caption = config_files.load_config("configs/depo.py:paper_fig3")
  assert (caption.model.pattern, caption.model.d_model) == ("AGAG", 256)
  assert config_files.load_config("configs/depo.py").model.to_dict() == caption.model.to_dict()
  with pytest.raises(ValueError, match="ambiguous.*10-layer.*paper_text.*paper_fig3"):
    config_files.load_config("configs/depo.py:paper")
  text = ExperimentConfig.from_config(config_files.load_config("configs/depo.py:paper_text"))
  assert (len(text.model.pattern), text.model.d_model) == (10, 512)
  assert set(text.model.pattern) == {"J", "A"} and text.model.fast_state_shape == (4, 96, 256)
