"""Tools that read a trained tiny run: launch/generate.py (streamed answers are the batch
evaluation's) and bench/param_movement.py."""

import dataclasses
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


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """A launch/convert.py-style directory (model.json + params/) with a word-level
  tokenizer.json, its model's vocabulary just large enough."""
  from flax import nnx

  from sleep_jax.data import gsm_task
  from sleep_jax.model.config import ModelConfig
  from sleep_jax.train import checkpoint

  directory = str(tmp_path_factory.mktemp("converted"))
  tokenizer_file = os.path.join(directory, "tokenizer.json")
  gsm_task.word_level_tokenizer(tokenizer_file)
  tokenizer = gsm_task.load_tokenizer(tokenizer_file)
  model_config = ModelConfig(
    vocab_size=tokenizer.get_vocab_size(), pattern="AGAG", d_model=32, num_heads=2, head_dim=16,
    mlp_dim=64,
  )  # fmt: skip
  model = sleep_jax.build_model(model_config, seed=3)
  checkpoint.save_initial(directory, nnx.to_pure_dict(nnx.state(model, nnx.Param)), model_config)
  return directory, model, tokenizer


def test_text_in_text_out_from_a_converted_checkpoint(converted):
  from sleep_jax.data import gsm_task

  directory, model, tokenizer = converted
  prompt = "assign V1 = 3 . assign V2 = V1 + 4 ."
  flags = ["--passes=2", "--window=8", "--max_new_tokens=12"]
  result = generate(f"--workdir={directory}", f"--prompt_text={prompt}", *flags)
  assert result.returncode == 0, result.stderr
  assert "converted checkpoint, N=2, L=8, hard eviction" in result.stdout
  ids = tokenizer.encode(prompt, add_special_tokens=False).ids
  sleep = dict(passes=2, window=8, eviction="hard", context_len=0)
  expected = np.asarray(sleep_jax.generate(model, [ids], sleep_config=sleep, max_new_tokens=12))[0]
  _, end = gsm_task.special_ids(tokenizer)
  kept = [int(t) for t in expected[: list(expected).index(end) if end in expected else None]]
  text = tokenizer.decode(kept, skip_special_tokens=True)
  assert result.stdout.splitlines()[-1].strip() == text.strip()
  # The same with token ids in and out.
  ids_run = generate(f"--workdir={directory}", "--prompt=" + ",".join(map(str, ids)), *flags)
  assert ids_run.returncode == 0, ids_run.stderr
  printed = re.search(r"generated: ([\d,]+)", ids_run.stdout).group(1).split(",")
  assert [int(t) for t in printed] == [int(t) for t in expected]


def test_text_generation_refuses_what_does_not_fit(converted, tmp_path):
  directory, _, _ = converted
  no_window = generate(f"--workdir={directory}", "--prompt_text=assign V1 = 3 .")
  assert no_window.returncode == 1 and "give --window" in no_window.stderr
  # A tokenizer with more ids than the model's vocabulary.
  from flax import nnx

  from sleep_jax.model.config import ModelConfig
  from sleep_jax.train import checkpoint

  small = ModelConfig(vocab_size=16, pattern="AG", d_model=16, num_heads=2, head_dim=8, mlp_dim=32)
  model = sleep_jax.build_model(small, seed=0)
  checkpoint.save_initial(str(tmp_path), nnx.to_pure_dict(nnx.state(model, nnx.Param)), small)
  mismatch = generate(
    f"--workdir={tmp_path}", "--window=8", "--prompt_text=assign V1 = 3 .",
    f"--tokenizer={os.path.join(directory, 'tokenizer.json')}",
  )  # fmt: skip
  assert mismatch.returncode == 1 and "not this model's tokenizer" in mismatch.stderr


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
  """A tiny GSM-Infinite run (two steps): its task names the word-level tokenizer."""
  from configs import gsm_infinite as gsm_configs

  config = gsm_configs.get_config("tiny")
  workdir = str(tmp_path_factory.mktemp("gsm_run"))
  loop.train_and_evaluate(config, workdir)
  return workdir


def test_text_in_text_out_from_a_training_run_uses_its_tasks_tokenizer(text_run):
  from sleep_jax.data import gsm_task

  prompt = "assign V1 = 3 ."
  result = generate(f"--workdir={text_run}", f"--prompt_text={prompt}", "--max_new_tokens=8")
  assert result.returncode == 0, result.stderr
  model, config, _ = restore_model(text_run)
  tokenizer = gsm_task.load_tokenizer(gsm_task.tokenizer_path(config.task.tokenizer))
  ids = tokenizer.encode(prompt, add_special_tokens=False).ids
  sleep = dataclasses.replace(config.sleep, context_len=0, predict_chunks=None)  # a stream's
  expected = np.asarray(sleep_jax.generate(model, [ids], sleep_config=sleep, max_new_tokens=8))[0]
  _, end = gsm_task.special_ids(tokenizer)
  kept = [int(t) for t in expected[: list(expected).index(end) if end in expected else None]]
  assert result.stdout.splitlines()[-1].strip() == tokenizer.decode(kept).strip()


def test_prompts_that_are_no_text_are_refused(text_run, trained):
  blank = generate(f"--workdir={text_run}", "--prompt_text=   ")
  assert blank.returncode == 1 and "encodes to no tokens" in blank.stderr
  both = generate(f"--workdir={text_run}", "--prompt=1,2", "--prompt_text=assign V1 = 3 .")
  assert both.returncode == 1 and "not both" in both.stderr
  rule110_run, _ = trained  # a task of cells, with no tokenizer
  no_tokenizer = generate(f"--workdir={rule110_run}", "--prompt_text=1 0 1")
  assert no_tokenizer.returncode == 1 and "--prompt_text needs a tokenizer" in no_tokenizer.stderr
