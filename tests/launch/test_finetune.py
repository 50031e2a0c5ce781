"""From a pretrained checkpoint to a fine-tuned sleeping model, as a user runs it: a tiny
Jet-Nemotron-layout checkpoint, launch/convert.py with the paper's kind of loop range, then
launch/main.py on configs/gsm_infinite.py:tiny_pretrained with --config.init_from, training
only the coda (train.trainable)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from configs import gsm_infinite
from sleep_jax import pretrained
from sleep_jax.model.config import ModelConfig
from sleep_jax.model.lm import build_model, params_by_path
from sleep_jax.train import checkpoint
from sleep_jax.train.checkpoint import restore_model

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def write_tiny_jet_nemotron(path) -> None:
  """A random tiny checkpoint in Jet-Nemotron's layout (config.json + safetensors)."""
  from safetensors.numpy import save_file

  from third_party import jet_nemotron

  hf = gsm_infinite.TINY_JET_NEMOTRON
  model = build_model(ModelConfig(**jet_nemotron.model_config(hf)), seed=7)
  os.makedirs(path, exist_ok=True)
  save_file(pretrained.export(model, hf), os.path.join(path, "model.safetensors"))
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf, f)


def run(script, *flags):
  out = subprocess.run(
    [sys.executable, os.path.join(REPO, "launch", script), *flags],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  return out


@pytest.mark.integration
def test_convert_then_fine_tune_the_coda_only(tmp_path):
  write_tiny_jet_nemotron(tmp_path / "hf")
  converted = tmp_path / "converted"
  run(
    "convert.py",
    f"--checkpoint={tmp_path / 'hf'}",
    f"--out={converted}",
    "--option=loop_start=1",
    "--option=loop_stop=3",
  )
  saved = json.loads((converted / "model.json").read_text())
  assert (saved["loop_start"], saved["loop_stop"], saved["pattern"]) == (1, 3, "JAJS")

  workdir = tmp_path / "run"
  run(
    "main.py",
    "--config=configs/gsm_infinite.py:tiny_pretrained",
    f"--workdir={workdir}",
    f"--config.init_from={converted}",
    "--config.train.trainable=^coda_blocks/",
    "--config.sleep.passes=2",
  )
  results = json.loads((workdir / "results.json").read_text())
  assert results["step"] == 3 and "ops2/accuracy" in json.dumps(results)
  model, _, _ = restore_model(str(workdir))
  trained = params_by_path(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  start, _ = pretrained.load(str(tmp_path / "hf"), loop_start=1, loop_stop=3)
  start = params_by_path(nnx.to_pure_dict(nnx.state(start, nnx.Param)))
  for path, value in trained.items():  # frozen: bit for bit the converted weights
    if path.startswith("coda_blocks/"):
      continue
    np.testing.assert_array_equal(value, start[path], err_msg=path)
  moved = [
    p for p in trained if p.startswith("coda_blocks/") and not np.array_equal(trained[p], start[p])
  ]
  assert moved, "the trainable coda did not move"


def test_init_from_a_different_model_is_a_clear_error(tmp_path):
  model_config = ModelConfig(
    vocab_size=7, pattern="AG", d_model=16, num_heads=2, head_dim=8, mlp_dim=16
  )
  params = nnx.to_pure_dict(nnx.state(build_model(model_config, seed=0), nnx.Param))
  checkpoint.save_initial(str(tmp_path), params, model_config)
  other = ModelConfig(**(model_config.__dict__ | dict(pattern="GA")))
  with pytest.raises(ValueError, match=r"pattern: saved 'AG' vs config 'GA'"):
    checkpoint.load_initial(str(tmp_path), other, None)
  with pytest.raises(FileNotFoundError, match="neither a converted checkpoint"):
    checkpoint.load_initial(str(tmp_path / "nothing"), model_config, None)
