"""bench/stream.py end to end at toy sizes: the tables and JSON it writes say what the streaming
design promises (a sleeping stream's state does not grow with the context; a KV cache does)."""

import json
import os
import subprocess
import sys

import pytest

from sleep_jax.experiments import config_files

pytestmark = pytest.mark.integration  # ~1.5 minutes on 2 cores: three compiles per decoder
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONTEXTS = (64, 256)
QUICK = ["--window=32", "--repeats=1", "--sleep_repeats=1"]  # toy sizes, one timing each


def run_bench(out_dir, *flags) -> tuple[dict, str]:
  """Runs bench/stream.py with `flags` at toy sizes; returns its JSON and its stdout."""
  command = [sys.executable, "bench/stream.py", *QUICK, *flags, f"--out_dir={out_dir}"]
  run = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=900)
  assert run.returncode == 0, run.stderr[-3000:]
  return json.loads((out_dir / "stream.json").read_text()), run.stdout


def test_stream_bench_writes_prefill_and_decode_rows_with_a_constant_sleeping_state(tmp_path):
  report, stdout = run_bench(
    tmp_path,
    "--passes=1",
    "--contexts",
    *map(str, CONTEXTS),
    "--prefill_contexts=128",
    "--timed_tokens=5",
  )
  assert (tmp_path / "decode.png").stat().st_size > 0
  assert report["window"] == 32 and report["eviction"] == "hard"

  (prefill,) = report["prefill"]
  assert (prefill["passes"], prefill["context"]) == (1, 128)
  assert prefill["apply_tokens_per_s"] > 0 and prefill["prefill_tokens_per_s"] > 0

  sleeping, full = report["decode"]
  assert sleeping["passes"] == 1 and full["passes"] == "full attention"
  for row in (sleeping, full):
    assert [p["context"] for p in row["points"]] == list(CONTEXTS)
    assert all(p["wake_median_ms"] > 0 for p in row["points"])
  sleeping_state = [p["state_mb"] for p in sleeping["points"]]
  assert sleeping_state[0] == sleeping_state[1]  # the window is evicted after every sleep
  full_state = [p["state_mb"] for p in full["points"]]
  assert full_state[1] > 2 * full_state[0]  # the KV cache holds every token
  assert sleeping["filling_token_ms"] > 0 and full["sleep_ms"] is None

  assert "at 64 / 256 tokens of context" in stdout
  assert "| sleep N=1 |" in stdout and "| full attention |" in stdout


def test_stream_bench_runs_an_experiment_configs_model(tmp_path):
  report, _ = run_bench(
    tmp_path,
    "--model_config=configs/rule110.py:tiny",
    "--passes=2",
    "--contexts=64",
    "--prefill_contexts=64",
    "--timed_tokens=3",
    "--no_full_attention",
  )
  assert report["model"] == config_files.load_config("configs/rule110.py:tiny").model.to_dict()
  assert report["model_config"] == "configs/rule110.py:tiny"
  ((prefill,), (sleeping,)) = report["prefill"], report["decode"]
  assert prefill["passes"] == sleeping["passes"] == 2
  assert prefill["prefill_tokens_per_s"] > 0 and sleeping["points"][0]["wake_median_ms"] > 0
