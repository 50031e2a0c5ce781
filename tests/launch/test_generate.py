"""Tools that read a trained tiny run: launch/generate.py (streamed answers are the batch
evaluation's) and bench/param_movement.py."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest

import sleep_jax
from configs import rule110 as rule110_configs
from sleep_jax.data import tasks
from sleep_jax.train import loop
from sleep_jax.train.checkpoint import restore_model

pytestmark = pytest.mark.integration  # every test reads a real training run

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A tiny Rule 110 run at N=2 (four steps), its checkpoint on disk."""
  config = rule110_configs.get_config("tiny")
  config.sleep.passes = 2
  workdir = str(tmp_path_factory.mktemp("run"))
  loop.train_and_evaluate(config, workdir)
  return workdir, config


def generate(*flags):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run(
    [sys.executable, os.path.join(REPO, "launch", "generate.py"), *flags],
    capture_output=True,
    text=True,
    env=env,
    timeout=300,
  )


def test_restore_model_reads_the_newest_parameters(trained):
  workdir, config = trained
  model, restored_config, step = restore_model(workdir)
  assert step == config.train.num_steps and restored_config.sleep.passes == 2
  fresh = sleep_jax.build_model(config.model, seed=config.seed)
  examples = tasks.heldout_set(tasks.get_task(config.task), seed=0, num=2)
  trained_logits = np.asarray(sleep_jax.apply(model, examples["tokens"], sleep_config=config.sleep))
  fresh_logits = np.asarray(sleep_jax.apply(fresh, examples["tokens"], sleep_config=config.sleep))
  assert np.max(np.abs(trained_logits - fresh_logits)) > 1e-4  # trained, not initial, weights


def test_streaming_held_out_examples_agrees_with_the_batch_evaluation(trained):
  workdir, _ = trained
  result = generate(f"--workdir={workdir}", "--examples=6")
  assert result.returncode == 0, result.stderr
  assert "N=2, L=24, hard eviction" in result.stdout
  rows = re.findall(r"streamed (\[[\d, ]+\])\s+batch (\[[\d, ]+\])", result.stdout)
  assert len(rows) == 6 and all(streamed == batch for streamed, batch in rows)
  streamed, batch = re.search(
    r"streamed ([\d.]+), batch \(apply\) ([\d.]+)", result.stdout
  ).groups()
  assert streamed == batch
  assert "WARNING" not in result.stderr and "W1" not in result.stderr  # no library chatter


def test_prompted_generation_and_its_errors(trained):
  workdir, _ = trained
  result = generate(f"--workdir={workdir}", "--prompt=1,0,1,1", "--max_new_tokens=5")
  assert result.returncode == 0, result.stderr
  generated = re.search(r"generated: ([\d,]+)", result.stdout).group(1).split(",")
  assert len(generated) == 5
  missing = generate("--workdir=" + os.path.join(workdir, "nothing_here"))
  assert missing.returncode == 1 and "holds no run" in missing.stderr


def test_param_movement_groups_every_parameter_and_bounds_adam_drift(trained):
  sys.path.insert(0, os.path.join(REPO, "bench"))
  import param_movement

  workdir, config = trained
  movement = param_movement.run_movement(workdir)
  groups = movement["groups"]
  assert {"decay_proj", "beta_proj", "A_log", "dt_bias", "conv filters", "muon matrices"} <= set(
    groups
  )
  assert movement["step"] == config.train.num_steps
  for name, group in groups.items():
    assert group["relative_movement"] > 0, name
    if group["optimizer"] == "adamw":
      # An Adam step moves a coordinate by at most about its learning rate.
      assert 0 < group["drift_efficiency"] <= 1.05, (name, group["drift_efficiency"])
      assert group["predicted_paper_movement"] > 0
