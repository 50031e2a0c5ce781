"""The compile-only modes of the bench scripts work from this host and report what the library
measures: `bench/train_step.py --count_kernels` (kernels per step, per N) and
`bench/gpu_kernels.py` (ptxas' report per Triton kernel)."""

import json
import os
import subprocess
import sys

import pytest

from bench import train_step
from sleep_jax.parallel import gpu_topology
from sleep_jax.train import aot

pytestmark = [
  pytest.mark.gpu_compile,
  pytest.mark.skipif(bool(gpu_topology.missing_toolchain()), reason="no CUDA plugin or ptxas"),
]
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHARED_MEMORY_LIMIT = 232_448


def _run(args, timeout=900):
  run = subprocess.run(
    [sys.executable, *args], capture_output=True, text=True, cwd=REPO, timeout=timeout
  )
  assert run.returncode == 0, run.stderr[-3000:]
  return run.stdout


def test_count_kernels_prints_and_saves_the_librarys_count_per_passes(tmp_path):
  # The CPU sweep's small model, so that the compiles take seconds.
  out = tmp_path / "count.json"
  stdout = _run(
    [
      "bench/train_step.py",
      "--setting=sweep",
      "--count_kernels=h100",
      "--passes",
      "1",
      "2",
      f"--json={out}",
    ]
  )
  rows = json.loads(out.read_text())["rows"]
  assert [row["passes"] for row in rows] == [1, 2]
  one = aot.compile_for_topology(train_step.build_config("sweep", 1, None), "h100")
  assert rows[0]["kernels_per_step"] == one["kernels_per_step"] > 0
  assert rows[0]["kernels_by_kind"] == one["kernels_by_kind"]
  # A second pass per window runs the sleep pass's kernels again.
  assert rows[1]["kernels_per_step"] > rows[0]["kernels_per_step"]
  assert rows[1]["gflop_per_step"] > rows[0]["gflop_per_step"]
  assert all(row["spill_bytes"] == 0 for row in rows)
  assert f"| 1 | float32 | True | False | {rows[0]['kernels_per_step']:,} |" in stdout


def test_gpu_kernels_prints_and_saves_ptxas_report_of_the_selected_cases(tmp_path):
  out = tmp_path / "kernels.json"
  stdout = _run(["bench/gpu_kernels.py", "--only=attention", f"--json={out}"])
  report = json.loads(out.read_text())
  assert "H100" in report["device"] and report["shared_memory_limit"] == SHARED_MEMORY_LIMIT
  rows = report["rows"]
  # float32 and bfloat16, each a forward and a backward kernel.
  assert sorted((r["dtype"], r["kernel"]) for r in rows) == [
    ("bfloat16", "causal_attention_backward"),
    ("bfloat16", "causal_attention_forward"),
    ("float32", "causal_attention_backward"),
    ("float32", "causal_attention_forward"),
  ]
  for row in rows:
    assert 0 < row["registers"] <= 255, row
    assert row["spill_store_bytes"] == row["spill_load_bytes"] == 0, row
    assert 0 < row["shared_memory_bytes"] <= SHARED_MEMORY_LIMIT, row
    assert f"| attention | {row['dtype']} | 64 | {row['kernel']} | {row['registers']} |" in stdout
  assert "4 kernels, 0 spill bytes in all" in stdout


def test_gpu_kernels_refuses_an_unknown_case_before_compiling():
  run = subprocess.run(
    [sys.executable, "bench/gpu_kernels.py", "--only=flash"],
    capture_output=True,
    text=True,
    cwd=REPO,
    timeout=300,
  )
  assert run.returncode != 0
  assert "--only='flash' matches no case" in run.stderr and "pallas_staged" in run.stderr
