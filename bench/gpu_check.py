"""The GPU proof in one command: correctness, kernel speed, the paper's step, sleep at depth.

  python bench/gpu_check.py --out docs/results/gpu          # make gpu-check; ~9 min on one H100

Four sections, in subprocesses with time limits (one that fails or runs out of time is reported,
and the next one runs). The timed ones run alone on the GPU, first:

  kernels  bench/gated_delta.py --shape gpu (B=8, T=4096, H=16, K=V=128, bfloat16): both GPU
           kernels ("pallas", the fused Triton kernel, and "pallas_staged",
           XLA stages around a Triton state walk), fla's chunk_gated_delta_rule, chunked and
           the per-token reference, one process.
  step     bench/train_step.py on configs/rule110.py:paper (batch 512) at N = 1, 2, 4 in
           float32 and at N = 1, 4 in bfloat16 (`model.dtype`), with
           `model.fast_weight_impl=auto` (on a GPU: the one-chunk kernel for every 24-token
           sleep pass). The targets are judged per dtype.
  depth    configs/sweeps/rule110_gpu_check.py: N=1 beside N=4 at equal steps (both at once),
           sized to the time left (depth 8, or 4 when fewer than 2,000 steps fit); the figure
           draws both against steps and against training compute (steps x the step's FLOPs),
           where N=1's curve is the compute-matched line for N=4 up to N=1's last step.
  tests    `pytest -m gpu`, beside the depth runs: both kernels against "chunked" at T=1000,
           K=V=128, float32 and bfloat16, outputs and all six gradients from a random initial
           state; the model's train-step gradient with each kernel against "chunked".

Writes to --out, flat: gpu_check.json (everything, with versions and the targets met or
missed), gated_delta.json, train_step.json (with each step's static kernel count beside the
profile's runtime one), depth_curves.json, report.md, depth_curves.png (eval exact accuracy
against steps), target_config.txtpb (the GPU's own target config, for the deviceless compiles)
and gpu_check.log (every subprocess's output).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from sleep_jax import rundir  # noqa: E402  (standard library only)

KERNELS = ("pallas_staged", "pallas")  # the GPU kernels, held to the issue's targets
TARGET_PALLAS_FWD_BWD_MS = 2.0
TARGET_STEP_MS_N1 = 15.0
TARGET_RATIO_SLACK = 0.10  # N=4 / N=1 step time within 10% of the FLOP ratio
PAPER_STEPS = 100_000
DEPTH_STEPS_FOR_T8 = 2_000  # fewer steps than this fit: depth 4 (t=8 needed ~2,700 at N=1)
# The step section's runs: (model.dtype, the N measured). bfloat16 skips N=2 to save GPU time.
STEP_RUNS = (("float32", (1, 2, 4)), ("bfloat16", (1, 4)))
# Each (dtype, N) step measurement is a process of its own: start-up, a ~40 s compile (the
# 2026-11-28 H100 run: 38-41 s per N), 5 timed steps. Its limit, and the minute kept for the
# depth runs and the tests whatever the step section takes:
STEP_LIMIT_PER_RUN_S = 65
DEPTH_MIN_S = 60
DEPTH_ARMS = {"n1": 1, "n4": 4}  # configs/sweeps/rule110_gpu_check.py's arms


class Check:
  """Runs the sections, keeps the log and the time, and collects the results."""

  def __init__(
    self, out_dir: str, budget_s: float, platform: str, step_setting: str, depth_base: str | None
  ):
    self.out_dir = out_dir
    # Scratch outside `out_dir`, which must stay a handful of files; deleted at the end.
    self.work_dir = tempfile.mkdtemp(prefix="gpu_check_")
    self.log = open(os.path.join(out_dir, "gpu_check.log"), "w")
    self.start = time.monotonic()
    self.budget_s = budget_s
    self.platform = platform  # JAX_PLATFORMS of every subprocess ("cpu" for a dry run)
    self.step_setting = step_setting  # bench/train_step.py --setting
    self.depth_base = depth_base  # a base config for the depth sweep other than its own (dry runs)
    self.junit_path = os.path.join(self.work_dir, "gpu_tests.xml")
    self.results: dict = {"sections": {}}

  def elapsed(self) -> float:
    return time.monotonic() - self.start

  def left(self) -> float:
    return self.budget_s - self.elapsed()

  def say(self, text: str) -> None:
    line = f"[gpu_check {self.elapsed():6.0f}s] {text}"
    print(line, flush=True)
    self.log.write(line + "\n")
    self.log.flush()

  def run(self, name: str, argv: list[str], timeout_s: float, env: dict | None = None) -> dict:
    """Runs argv with a time limit; its output goes to the log. Returns rc, wall_s, tail."""
    return self.run_together([(name, argv, env)], timeout_s)[0]

  def run_together(self, commands: list[tuple], timeout_s: float) -> list[dict]:
    """Runs (name, argv, extra env) commands at once, all within one time limit."""
    timeout_s = max(10.0, timeout_s)
    start = time.monotonic()
    procs = []
    for name, argv, env in commands:
      full_env = dict(os.environ, PYTHONUNBUFFERED="1", JAX_PLATFORMS=self.platform, **(env or {}))
      full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, full_env.get("PYTHONPATH")]))
      self.say(f"{name}: {' '.join(argv)} (limit {timeout_s:.0f}s)")
      log_file = tempfile.TemporaryFile("w+")
      procs.append(
        (
          subprocess.Popen(
            argv, cwd=REPO, env=full_env, stdout=log_file, stderr=subprocess.STDOUT, text=True
          ),
          log_file,
          name,
        )
      )
    ended = {}  # index -> (return code or "timeout", seconds)
    while len(ended) < len(procs):
      for index, (proc, _, _) in enumerate(procs):
        if index not in ended and proc.poll() is not None:
          ended[index] = (proc.returncode, time.monotonic() - start)
      if time.monotonic() - start > timeout_s:
        for index, (proc, _, _) in enumerate(procs):
          if index not in ended:
            proc.kill()
            proc.wait()
            ended[index] = ("timeout", time.monotonic() - start)
      time.sleep(0.5)
    runs = []
    for index, (_, log_file, name) in enumerate(procs):
      rc, wall = ended[index]
      log_file.seek(0)
      output = log_file.read()
      log_file.close()
      self.log.write(f"----- {name} output -----\n{output}\n----- end {name} -----\n")
      self.log.flush()
      tail = output.strip().splitlines()[-15:]
      self.say(f"{name}: rc={rc} after {wall:.0f}s")
      if rc != 0:
        print("\n".join(tail), flush=True)
      runs.append({"rc": rc, "wall_s": round(wall, 1), "tail": tail})
    return runs


def versions() -> dict:
  found = {"python": sys.version.split()[0]}
  for module in ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "triton", "torch", "fla"):
    try:
      found[module] = __import__(module, fromlist=["__version__"]).__version__
    except Exception as error:  # not installed, or broken: say which
      found[module] = f"unavailable ({type(error).__name__})"
  try:
    query = "--query-gpu=name,driver_version,memory.total,clocks.max.sm"
    found["nvidia_smi"] = subprocess.run(
      ["nvidia-smi", query, "--format=csv,noheader"], capture_output=True, text=True, timeout=30
    ).stdout.strip()
  except (OSError, subprocess.TimeoutExpired) as error:
    found["nvidia_smi"] = f"unavailable ({type(error).__name__})"
  return found


TARGET_CONFIG = (
  "import jax; from jax._src.lib import xla_client; "
  "print(xla_client.get_topology_for_devices(jax.devices()).target_config)"
)


def capture_target_config(check: Check) -> dict:
  """The GPU's own target config (the text GpuTargetConfigProto that deviceless compiles take),
  written to --out as target_config.txtpb, to set beside sleep_jax/parallel/gpu_targets/."""
  env = {**os.environ, "JAX_PLATFORMS": check.platform}
  try:
    out = subprocess.run(
      [sys.executable, "-c", TARGET_CONFIG], capture_output=True, text=True, env=env, timeout=120
    )
  except subprocess.TimeoutExpired:
    return {"error": "timeout"}
  if out.returncode or "gpu_device_info" not in out.stdout:
    return {"error": (out.stderr.strip().splitlines() or ["no gpu_device_info"])[-1]}
  path = os.path.join(check.out_dir, "target_config.txtpb")
  with open(path, "w") as f:
    f.write(out.stdout)
  return {"path": path}


# --- 1. tests -----------------------------------------------------------------------------------


def tests_command(check: Check) -> tuple:
  """(name, argv, env) of the gpu-marked tests. They run beside the depth runs, which hold 90% of
  the GPU's memory: the tests allocate as they go instead of preallocating."""
  argv = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-rA"]
  argv += [f"--junitxml={check.junit_path}"]
  argv += ["tests/ops/test_pallas_lowering.py", "tests/train/test_step.py"]
  # Autotuning picks fast GEMM configs, which correctness does not need: off, it compiles far
  # faster (the first check ran 5 of the 6 tests in 4 minutes with it on).
  env = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false", "XLA_FLAGS": "--xla_gpu_autotune_level=0"}
  return ("tests", argv, env)


def tests_results(check: Check, run: dict) -> dict:
  junit = check.junit_path
  cases = []
  if os.path.exists(junit):
    for case in ElementTree.parse(junit).getroot().iter("testcase"):
      problem = next(
        (child for child in case if child.tag in ("failure", "error", "skipped")), None
      )
      cases.append(
        {
          "test": f"{case.get('classname')}::{case.get('name')}",
          "outcome": "passed" if problem is None else problem.tag,
          "seconds": float(case.get("time", 0)),
          "message": None if problem is None else (problem.get("message") or "")[:600],
        }
      )
  run["cases"] = cases
  run["passed"] = sum(c["outcome"] == "passed" for c in cases)
  run["not_passed"] = sum(c["outcome"] != "passed" for c in cases)
  return run


# --- 2. kernel speed ----------------------------------------------------------------------------


def section_kernels(check: Check, timeout_s: float, shape: str) -> dict:
  raw_path = os.path.join(check.work_dir, "gated_delta_raw.json")
  run = check.run(
    "kernels",
    [sys.executable, "bench/gated_delta.py", "--shape", shape, "--repeats", "10"]
    + ["--json", raw_path],
    timeout_s,
    # fla's torch shares the GPU with JAX's preallocated pool: leave it room.
    env={"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.6"},
  )
  if not os.path.exists(raw_path):
    return run
  raw = rundir.read_json(raw_path)
  impls = raw["results"]
  summary = {
    "device": raw["device"],
    "jax": raw.get("jax"),
    "shape": raw["shape"],
    "repeats": raw["repeats"],
    "baseline_for_errors": raw.get("baseline"),
    "partial": raw.get("partial", False),
    "impls": impls,
    "ratios": raw.get("ratios", {}),
  }
  fla_fwd = impls.get("fla", {}).get("fwd_ms")
  targets = {}
  for kernel in KERNELS:
    row = impls.get(kernel, {})
    if "fwd_ms" in row and fla_fwd:
      targets[f"{kernel} fwd <= fla fwd"] = {
        "value_ms": row["fwd_ms"],
        "target_ms": fla_fwd,
        "met": row["fwd_ms"] <= fla_fwd,
      }
    if "fwd_bwd_ms" in row:
      targets[f"{kernel} fwd+bwd <= {TARGET_PALLAS_FWD_BWD_MS} ms"] = {
        "value_ms": row["fwd_bwd_ms"],
        "target_ms": TARGET_PALLAS_FWD_BWD_MS,
        "met": row["fwd_bwd_ms"] <= TARGET_PALLAS_FWD_BWD_MS,
      }
  summary["targets"] = targets
  rundir.write_json(os.path.join(check.out_dir, "gated_delta.json"), summary)
  run["summary"] = summary
  return run


# --- 3. the paper's train step ------------------------------------------------------------------


def _ok(row: dict) -> bool:
  return "error" not in row and row.get("ms_per_step") is not None


def step_targets(rows: list[dict], impl: str) -> tuple[dict, dict]:
  """The step targets of one dtype's rows ({N: row} measured with `impl`, and the targets);
  adds each row's time and FLOP ratios to N=1."""
  by_passes = {row["passes"]: row for row in rows if _ok(row) and row["impl"] == impl}
  base = by_passes.get(1)
  for row in by_passes.values() if base else ():
    row["time_ratio"] = row["ms_per_step"] / base["ms_per_step"]
    row["flop_ratio"] = row["gflop_per_step"] / base["gflop_per_step"]
  targets = {}
  if base:
    targets[f"N=1 <= {TARGET_STEP_MS_N1} ms/step"] = {
      "value_ms": base["ms_per_step"],
      "target_ms": TARGET_STEP_MS_N1,
      "met": base["ms_per_step"] <= TARGET_STEP_MS_N1,
    }
  if base and 4 in by_passes:
    n4 = by_passes[4]
    off = n4["time_ratio"] / n4["flop_ratio"] - 1
    targets["N=4/N=1 time within 10% of the FLOP ratio"] = {
      "time_ratio": n4["time_ratio"],
      "flop_ratio": n4["flop_ratio"],
      "off_by": off,
      "met": abs(off) <= TARGET_RATIO_SLACK,
    }
  return by_passes, targets


def section_step(check: Check, timeout_s: float) -> dict:
  best = "auto"  # what a user gets
  platform = "gpu" if check.platform == "cuda" else check.platform
  header, rows, targets, runs, projected = {}, [], {}, [], {}
  for dtype, passes in STEP_RUNS:
    path = os.path.join(check.work_dir, f"train_step_{dtype}.json")
    share = min(
      timeout_s * len(passes) / sum(len(p) for _, p in STEP_RUNS),
      len(passes) * STEP_LIMIT_PER_RUN_S + 5,
    )
    argv = [sys.executable, "bench/train_step.py", "--platform", platform]
    argv += ["--setting", check.step_setting, "--passes", *map(str, passes), "--impl", best]
    argv += ["--dtype", dtype, "--steps", "5", "--timeout_s", str(int(share / len(passes) - 5))]
    argv += ["--json", path]
    runs.append(check.run(f"step {dtype}", argv, share))
    report = rundir.read_json(path) if os.path.exists(path) else {}
    header = header or {k: v for k, v in report.items() if k != "rows"}
    dtype_rows = report.get("rows", [])
    for row in dtype_rows:
      row["dtype"] = dtype
    by_passes, dtype_targets = step_targets(dtype_rows, best)
    rows += dtype_rows
    targets.update({f"{dtype}: {name}": t for name, t in dtype_targets.items()})
    if dtype == "float32":
      projected = {
        f"N={n} t=32 {PAPER_STEPS:,} steps h (float32)": PAPER_STEPS * row["ms_per_step"] / 3.6e6
        for n, row in sorted(by_passes.items())
      }
  summary = {
    **header,
    "config": "configs/rule110.py:paper",
    "chosen_impl": best,
    "rows": rows,
    "targets": targets,
    "projected_paper_run": projected,
  }
  rundir.write_json(os.path.join(check.out_dir, "train_step.json"), summary)
  return {"run": runs, "summary": summary}


# --- 4. sleep at depth ----------------------------------------------------------------------------


def depth_and_tests(check: Check, timeout_s: float, step: dict | None, tests: bool) -> dict:
  """The depth runs (N=1 and N=4 at once) and, beside them, the gpu tests: neither is timed."""
  rows = (step or {}).get("summary", {}).get("rows", [])
  impl = (step or {}).get("summary", {}).get("chosen_impl", "auto")
  measured = [r for r in rows if _ok(r) and r["impl"] == impl and r.get("dtype") == "float32"]
  ms = {row["passes"]: row["ms_per_step"] for row in measured}
  ms_n1 = ms.get(1, 60.0)
  ms_n4 = ms.get(4, 4 * ms_n1)
  # Each run compiles a train and an eval program (~45 s together, a guess) and evaluates 8 times;
  # the two arms (and the tests) share the GPU: assume the slower arm runs 1.5x slower than alone.
  training_s = timeout_s - 45 - 20
  num_steps = int(training_s / (1.5 * ms_n4 / 1e3)) // 100 * 100
  num_steps = max(200, min(2_700, num_steps))
  depth = 8 if num_steps >= DEPTH_STEPS_FOR_T8 else 4
  eval_every = max(50, num_steps // 8)
  sweep_dir = os.path.join(check.work_dir, "depth")
  argv = [sys.executable, "launch/sweep.py", "--config=configs/sweeps/rule110_gpu_check.py"]
  argv += [f"--sweep_dir={sweep_dir}", f"--config.num_steps={num_steps}"]
  argv += [f"--config.depths={depth}", f"--config.overrides.eval.every_steps={eval_every}"]
  argv += [f"--config.overrides.checkpoint.every_steps={num_steps}"]
  argv += [f"--config.overrides.model.fast_weight_impl={impl}"]
  if check.depth_base:
    argv += [f"--config.base={check.depth_base}"]
  # The two arms at once: each alone leaves the GPU mostly idle at this model size, and one
  # compiles while the other trains. Each gets under half of the GPU's memory.
  memory = {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.45"}
  commands = [(f"depth {arm}", argv + [f"--only={arm}"], memory) for arm in DEPTH_ARMS]
  runs = check.run_together(commands + ([tests_command(check)] if tests else []), timeout_s)
  run = {"runs": runs[: len(DEPTH_ARMS)]}
  tests_run = tests_results(check, runs[len(DEPTH_ARMS)]) if tests else None
  curves = {
    "impl": impl,
    "depth": depth,
    "num_steps": num_steps,
    "eval_every": eval_every,
    "sized_from_ms_per_step": {"N=1": ms_n1, "N=4": ms_n4},
    # a run's training compute = steps x its step's model FLOPs (from its saved config)
    "gflop_per_step": {},
    "arms_at_once": True,
    "arms": {},
  }
  for arm in DEPTH_ARMS:
    workdir = os.path.join(sweep_dir, arm, f"depth{depth}", "seed0")
    if not os.path.isdir(workdir):
      continue
    run_dir = rundir.RunDir(workdir)
    results = run_dir.results()
    curves["gflop_per_step"][arm] = step_gflop(run_dir.config())
    curves["arms"][arm] = {
      "eval": run_dir.eval_log(),
      "train": run_dir.train_log(),
      "results": None if results is None else results.to_json(),
    }
  rundir.write_json(os.path.join(check.out_dir, "depth_curves.json"), curves)
  try:
    depth_figure(curves).savefig(os.path.join(check.out_dir, "depth_curves.png"), dpi=120)
  except Exception as error:  # the numbers are in depth_curves.json either way
    check.say(f"depth figure failed: {type(error).__name__}: {error}")
  run["curves"] = {k: v for k, v in curves.items() if k != "arms"}
  run["equal_compute"] = at_equal_compute(compute_matched(curves))
  run["final"] = {
    arm: (data["eval"][-1] if data["eval"] else None) for arm, data in curves["arms"].items()
  }
  return {"depth": run, "tests": tests_run}


def step_gflop(config: dict | None) -> float | None:
  """Model GFLOPs of one training step of the run whose saved config.json is `config` (what
  bench/train_step.py divides by). Imported only here, after the depth runs: this process never
  starts a JAX backend."""
  if config is None:
    return None
  from ml_collections import config_dict

  from sleep_jax.experiments.jobs import config_step_flops

  return config_step_flops(config_dict.ConfigDict(config)) / 1e9


def compute_matched(curves: dict) -> dict:
  """Each arm's eval exact accuracy against its training compute (TFLOP: step x the step's
  FLOPs): on one axis, N=1's curve is the compute-matched line for N=4 up to N=1's last step."""
  lines = {}
  for arm, data in curves["arms"].items():
    gflop = curves["gflop_per_step"].get(arm)
    points = [e for e in data["eval"] if e.get("exact_accuracy") is not None]
    if gflop and points:
      lines[arm] = [(e["step"] * gflop / 1e3, e["exact_accuracy"]) for e in points]
  return lines


def at_equal_compute(lines: dict) -> dict | None:
  """N=1's last eval beside N=4's accuracy at the same training compute (linear between N=4's
  evals); None where either curve is missing or N=4 has not reached that compute."""
  if "n1" not in lines or "n4" not in lines:
    return None
  compute, n1_accuracy = lines["n1"][-1]
  n4 = lines["n4"]
  for (c0, a0), (c1, a1) in zip(n4, n4[1:], strict=False):
    if c0 <= compute <= c1:
      n4_accuracy = a0 + (a1 - a0) * (compute - c0) / (c1 - c0) if c1 > c0 else a1
      return {"tflop": compute, "n1": n1_accuracy, "n4": n4_accuracy}
  return None


def depth_figure(curves: dict):
  """Eval exact accuracy against steps (left) and against training compute (right)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  figure, (by_step, by_compute) = plt.subplots(1, 2, figsize=(11, 4))
  for arm, data in curves["arms"].items():
    points = [e for e in data["eval"] if e.get("exact_accuracy") is not None]
    by_step.plot(
      [e["step"] for e in points], [e["exact_accuracy"] for e in points], "o-", label=arm
    )
  for arm, line in compute_matched(curves).items():
    by_compute.plot(*zip(*line, strict=True), "o-", label=arm)
  by_step.set(xlabel="training step", ylabel="eval exact accuracy", title="equal steps")
  by_compute.set(xlabel="training compute (TFLOP)", title="equal compute (same runs)")
  for axes in (by_step, by_compute):
    axes.legend()
    axes.grid(alpha=0.3)
  figure.suptitle(f"Rule 110, depth {curves['depth']}: N=1 beside N=4 ({curves['impl']})")
  figure.tight_layout()
  return figure


# --- report ---------------------------------------------------------------------------------------


def _fmt(value, spec=".2f"):
  return "-" if value is None else format(value, spec)


def report_markdown(results: dict) -> str:
  v = results["versions"]
  lines = [
    "# GPU check",
    "",
    f"Device: {v.get('nvidia_smi')}; jax {v.get('jax')}, jaxlib {v.get('jaxlib')}, "
    f"triton {v.get('triton')}, torch {v.get('torch')}, fla {v.get('fla')}. "
    f"Command: `python bench/gpu_check.py` ({results['wall_s']:.0f} s).",
    "",
  ]
  tests = results["sections"].get("tests") or {}
  lines += ["## 1. Correctness (`pytest -m gpu`)", ""]
  lines += [f"{tests.get('passed', 0)} passed, {tests.get('not_passed', 0)} not passed.", ""]
  lines += ["| test | outcome | s |", "|---|---|---:|"]
  for case in tests.get("cases", []):
    lines.append(f"| {case['test']} | {case['outcome']} | {case['seconds']:.1f} |")
  for case in tests.get("cases", []):
    if case["message"]:
      lines += ["", f"`{case['test']}`: {case['message']}"]
  kernels = results["sections"].get("kernels", {}).get("summary")
  lines += ["", "## 2. Kernel speed (`bench/gated_delta.py --shape gpu`)", ""]
  if kernels:
    lines += [f"Shape {kernels['shape']}, median of {kernels['repeats']}.", ""]
    lines += [
      "| impl | fwd ms | fwd+bwd ms | peak MB | out err | grad err | note |",
      "|---|---:|---:|---:|---:|---:|---|",
    ]
    for impl, row in kernels["impls"].items():
      note = row.get("error") or row.get("fwd_bwd_error") or ""
      lines.append(
        f"| {impl} | {_fmt(row.get('fwd_ms'))} | {_fmt(row.get('fwd_bwd_ms'))} "
        f"| {_fmt(row.get('peak_mb'), ',.0f')} | {_fmt(row.get('out_rel_err'), '.1e')} "
        f"| {_fmt(row.get('grad_rel_err'), '.1e')} | {note[:80]} |"
      )
    lines += [""] + [
      f"- {name}: {t['value_ms']:.2f} ms vs {t['target_ms']:.2f} ms: "
      f"{'met' if t['met'] else 'MISSED'}"
      for name, t in kernels["targets"].items()
    ]
  step = results["sections"].get("step", {}).get("summary")
  lines += ["", "## 3. The paper's train step (`bench/train_step.py --setting paper`)", ""]
  if step:
    lines += [
      "| N | dtype | impl | ms/step | tokens/s | MFU (bf16 peak) | peak GB | N/N=1 time "
      "| FLOP ratio |",
      "|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in step["rows"]:
      if not _ok(row):
        lines.append(
          f"| {row.get('passes')} | {row.get('dtype')} | {row.get('impl')} "
          f"| error: {row.get('error')} |"
        )
        continue
      lines.append(
        f"| {row['passes']} | {row.get('dtype')} | {row['impl']} | {row['ms_per_step']:.1f} "
        f"| {_fmt(row.get('tokens_per_s'), ',.0f')} | {_fmt(row.get('mfu'), '.3f')} "
        f"| {_fmt(row.get('peak_gb'))} | {_fmt(row.get('time_ratio'))} "
        f"| {_fmt(row.get('flop_ratio'))} |"
      )
    lines += ["", f"Kernel of the step and depth runs: `{step['chosen_impl']}`."]
    lines += [f"- {name}: {json.dumps(t)}" for name, t in step["targets"].items()]
    lines += [
      f"- projected {name}: {hours:.1f}" for name, hours in step["projected_paper_run"].items()
    ]
  depth = results["sections"].get("depth") or {}
  lines += ["", "## 4. Sleep at depth (`configs/sweeps/rule110_gpu_check.py`)", ""]
  if depth.get("curves"):
    c = depth["curves"]
    lines += [
      f"Depth t={c['depth']}, {c['num_steps']} steps per arm, kernel `{c['impl']}`, "
      f"eval every {c['eval_every']} steps.",
      "",
      "| arm | last eval step | exact accuracy | loss |",
      "|---|---:|---:|---:|",
    ]
    for arm, last in depth.get("final", {}).items():
      if last:
        lines.append(
          f"| {arm} | {last.get('step')} | {_fmt(last.get('exact_accuracy'), '.3f')} "
          f"| {_fmt(last.get('loss'), '.3f')} |"
        )
    matched = depth.get("equal_compute")
    if matched:
      lines += [
        "",
        f"At equal training compute ({matched['tflop']:.3g} TFLOP, N=1's last eval): exact "
        f"accuracy N=1 {matched['n1']:.3f}, N=4 {matched['n4']:.3f} (between its evals).",
      ]
  return "\n".join(lines) + "\n"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=os.path.join(REPO, "docs", "results", "gpu"))
  parser.add_argument("--budget_s", type=float, default=540.0, help="the whole check's wall time")
  parser.add_argument("--skip", default="", help="comma-separated sections to skip")
  # A dry run of the plumbing on a CPU: --platform cpu --kernel_shape cpu --step_setting sweep.
  parser.add_argument("--platform", default="cuda", help="JAX_PLATFORMS of every section")
  parser.add_argument("--kernel_shape", default="gpu", help="bench/gated_delta.py --shape")
  parser.add_argument("--step_setting", default="paper", help="bench/train_step.py --setting")
  parser.add_argument("--depth_base", default=None, help="e.g. configs/rule110.py:tiny")
  args = parser.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  check = Check(args.out, args.budget_s, args.platform, args.step_setting, args.depth_base)
  skip = set(filter(None, args.skip.split(",")))
  check.results["versions"] = versions()
  check.say(json.dumps(check.results["versions"]))
  if "target_config" not in skip:
    check.results["target_config"] = capture_target_config(check)
  sections = check.results["sections"]

  def save():  # after every section: a check stopped from outside keeps what it measured
    check.results["wall_s"] = check.elapsed()
    rundir.write_json(os.path.join(args.out, "gpu_check.json"), check.results)
    with open(os.path.join(args.out, "report.md"), "w") as f:
      f.write(report_markdown(check.results))

  # The timed sections first, alone on the GPU; then the depth runs with the tests beside them,
  # in whatever time remains.
  if "kernels" not in skip:
    sections["kernels"] = section_kernels(check, min(150, 0.3 * check.left()), args.kernel_shape)
    save()
  if "step" not in skip:
    runs = sum(len(passes) for _, passes in STEP_RUNS)
    limit = min(runs * STEP_LIMIT_PER_RUN_S + 10, check.left() - DEPTH_MIN_S)
    sections["step"] = section_step(check, limit)
    save()
  if "depth" not in skip or "tests" not in skip:
    if "depth" in skip:
      name, argv, env = tests_command(check)
      sections["tests"] = tests_results(check, check.run(name, argv, check.left(), env))
    else:
      last = depth_and_tests(check, check.left() - 15, sections.get("step"), "tests" not in skip)
      sections["depth"], sections["tests"] = last["depth"], last["tests"]
    save()
  shutil.rmtree(check.work_dir, ignore_errors=True)
  check.say(f"done; wrote {args.out}")
  print(report_markdown(check.results))


if __name__ == "__main__":
  main()
