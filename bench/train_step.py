"""Train-step throughput on the CPU: ms/step, achieved GFLOP/s against a plain matmul, memory.

  python bench/train_step.py                        # the README's first run: sweep shape, N=1 and 4
  python bench/train_step.py --setting=cpu --passes 1 2 4 --remat both   # plain rule110.py:cpu
  python bench/train_step.py --xla_flags=--xla_cpu_use_thunk_runtime=false   # compare XLA flags

Settings (both `configs/rule110.py:cpu`, depth 2, hard eviction, L=24, 96 context tokens):
  sweep (default)  the model of the short two-arm run and of configs/sweeps/rule110_cpu.py:
                   d_model 64, 2 heads of 32, MLP 128, batch 32.
  cpu              the variant as it is: d_model 128, 4 heads of 32, MLP 512, batch 64.

Each (N, remat) setting runs in its own subprocess (so its peak resident memory is its own) and
reports, over `--steps` timed steps after one compile step:
  * median wall ms per step, and CPU ms per step (all threads; the host is shared, so this is
    the steadier number when other jobs run);
  * achieved GFLOP/s = `sleep_jax.model.flops.train_step_flops` (model matmul FLOPs, forward +
    backward, no remat recompute) / median step time;
  * in the same process, timed alternately with the steps so that both see the same load, the
    GFLOP/s of a plain float32 matmul of the step's own largest dense shape, the SwiGLU up
    projection [B*L, d_model] @ [d_model, mlp_dim] (32 in one executable, so that dispatch
    does not count), and of a square 1024 matmul (the host's peak). `vs mm` is the step's
    GFLOP/s over the step-shaped matmul's (the issue's target: >= 0.5), `vs peak` over the
    square one's;
  * the N / N=1 step-time ratio beside the ideal (4N+1)/5 (Rule 110: four sleep chunks of N
    passes plus one prediction pass), and peak RSS.
A markdown table goes to stdout, the rows to `--json`.

Where the time goes (XLA:CPU per-kernel trace, jaxlib 0.10.2, sweep setting, N=1 and N=4 alike):
the model's dense matmuls, which hold most of the counted FLOPs, take ~14% of the kernel time;
small batched matmuls (the chunked gated delta rule's per-(batch, head) products, attention
scores) ~24%; elementwise, transpose and reduction kernels the rest. By source: the gated delta
op ~33%, the causal convs' backward ~18%, SwiGLU ~15%, the GDN projections ~11%, attention
~10%, norms ~7%, the optimizer (Muon included) 1-2%. At these widths (d_model 64, 24-token
windows) the step is bound by per-kernel cost, not by matmul throughput.
"""

import argparse
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# Overrides of configs/rule110.py:cpu per setting (the sweep's model and batch).
SETTINGS = {
  "sweep": {
    "model": {"d_model": 64, "num_heads": 2, "head_dim": 32, "mlp_dim": 128},
    "train": {"batch_size": 32},
  },
  "cpu": {},
}
SQUARE = 1024
MM_REPS = 32  # step-shaped matmuls per timed call of the reference


def build_config(setting: str, passes: int, remat: bool):
  import importlib

  config = importlib.import_module("configs.rule110").get_config("cpu")
  for section, fields in SETTINGS[setting].items():
    for name, value in fields.items():
      config[section][name] = value
  config.sleep.passes, config.sleep.remat = passes, remat
  return config


def _timed(fn, reps: int = 1) -> tuple[float, float]:
  """(wall s, process CPU s) per call of `fn`, over `reps` calls dispatched back to back."""
  import jax

  wall, cpu = time.perf_counter(), time.process_time()
  out = None
  for _ in range(reps):
    out = fn()
  jax.block_until_ready(out)
  return (time.perf_counter() - wall) / reps, (time.process_time() - cpu) / reps


def measure(setting: str, passes: int, remat: bool, steps: int) -> dict:
  """Compiles and times the train step (and the reference matmuls) in this process."""
  try:  # the project's XLA CPU workarounds, before the backend starts (older trees: on import)
    from sleep_jax import xla_flags

    xla_flags.apply_workarounds()
  except ImportError:
    pass
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from sleep_jax.data import tasks
  from sleep_jax.model.config import ModelConfig
  from sleep_jax.model.flops import train_step_flops
  from sleep_jax.model.lm import build_model
  from sleep_jax.sleep.config import SleepConfig
  from sleep_jax.train.optim import make_optimizer, optimizer_labels
  from sleep_jax.train.step import TrainState, train_step

  config = build_config(setting, passes, remat)
  sleep_cfg = SleepConfig.from_config(config.sleep)
  model_cfg = ModelConfig.from_config(config.model)
  batch_size = config.train.batch_size
  graphdef, state = nnx.split(build_model(config.model, seed=0))
  params = nnx.to_pure_dict(state)
  optimizer = make_optimizer(config.train, optimizer_labels(state))
  train_state = TrainState(
    step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params)
  )
  batch = tasks.get_task(config.task).generate(np.random.default_rng(0), batch_size)
  batch = jax.tree.map(jnp.asarray, batch)
  seq_len = batch["tokens"].shape[1]
  flops = train_step_flops(model_cfg, sleep_cfg, seq_len=seq_len, batch_size=batch_size)

  step = jax.jit(
    functools.partial(train_step, graphdef=graphdef, sleep_cfg=sleep_cfg, optimizer=optimizer),
    donate_argnums=0,
  )
  start = time.perf_counter()
  train_state, metrics = step(train_state, batch)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - start

  def run_step():
    nonlocal train_state
    train_state, out = step(train_state, batch)
    return out

  # The step's largest dense matmul: rows = one window of the batch, [B*L, d] @ [d, F]. It runs
  # MM_REPS times inside one executable (a loop over distinct left operands), as the step runs
  # its matmuls, so that its rate is not the per-call dispatch overhead.
  rows, inner, cols = batch_size * sleep_cfg.window, model_cfg.d_model, model_cfg.mlp_dim
  keys = jax.random.split(jax.random.key(0), 4)
  lhs = jax.random.normal(keys[0], (MM_REPS, rows, inner))
  rhs = jax.random.normal(keys[1], (inner, cols))
  matmuls = jax.jit(lambda lhs, rhs: jax.lax.map(lambda x: x @ rhs, lhs))
  square = (
    jax.random.normal(keys[2], (SQUARE, SQUARE)),
    jax.random.normal(keys[3], (SQUARE, SQUARE)),
  )
  matmul = jax.jit(jnp.matmul)
  for _ in range(2):
    jax.block_until_ready((run_step(), matmuls(lhs, rhs), matmul(*square)))

  wall, cpu, mm, peak = [], [], [], []
  for _ in range(steps):  # alternate, so that all three see the same load on a shared host
    w, c = _timed(run_step)
    wall.append(w)
    cpu.append(c)
    mm.append(_timed(lambda: matmuls(lhs, rhs))[0] / MM_REPS)
    peak.append(_timed(lambda: matmul(*square))[0])
  median_s = statistics.median(wall)
  matmul_gflops = 2 * rows * inner * cols / statistics.median(mm) / 1e9
  peak_gflops = 2 * SQUARE**3 / statistics.median(peak) / 1e9
  step_gflops = flops / median_s / 1e9
  return {
    "setting": setting,
    "passes": passes,
    "remat": remat,
    "batch_size": batch_size,
    "median_ms": 1e3 * median_s,
    "min_ms": 1e3 * min(wall),
    "cpu_ms": 1e3 * statistics.median(cpu),
    "gflop_per_step": flops / 1e9,
    "gflops": step_gflops,
    "matmul_shape": [rows, inner, cols],
    "matmul_gflops": matmul_gflops,
    "ratio_to_matmul": step_gflops / matmul_gflops,
    "peak_matmul_gflops": peak_gflops,
    "ratio_to_peak": step_gflops / peak_gflops,
    "compile_s": compile_s,
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
  }


def print_table(rows: list[dict], args) -> None:
  print(
    f"\nrule110.py:cpu, setting {args.setting}, {args.steps} timed steps each, "
    f"XLA_FLAGS extra: {args.xla_flags or '(none)'}\n"
  )
  print(
    "| N | remat | ms/step | CPU ms/step | GFLOP/step | GFLOP/s | matmul GFLOP/s (shape) "
    "| vs mm | 1024^2 GFLOP/s | vs peak | N/N=1 time | ideal | peak RSS MB | compile s |"
  )
  print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
  for row in rows:
    if "error" in row:
      print(f"| {row['passes']} | {row['remat']} | error: {row['error']} |")
      continue
    base = next(
      (
        r
        for r in rows
        if r["remat"] == row["remat"] and "error" not in r and r["passes"] == min(args.passes)
      ),
      row,
    )
    row["time_ratio"] = row["median_ms"] / base["median_ms"]
    row["ideal_ratio"] = (4 * row["passes"] + 1) / (4 * base["passes"] + 1)
    shape = "x".join(map(str, row["matmul_shape"]))
    print(
      f"| {row['passes']} | {row['remat']} | {row['median_ms']:.0f} | {row['cpu_ms']:.0f} "
      f"| {row['gflop_per_step']:.2f} | {row['gflops']:.1f} | {row['matmul_gflops']:.1f} "
      f"({shape}) | {row['ratio_to_matmul']:.2f} | {row['peak_matmul_gflops']:.1f} "
      f"| {row['ratio_to_peak']:.2f} | {row['time_ratio']:.2f} | {row['ideal_ratio']:.2f} "
      f"| {row['peak_rss_mb']:.0f} | {row['compile_s']:.1f} |"
    )


def main():
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--setting", choices=sorted(SETTINGS), default="sweep")
  parser.add_argument("--passes", type=int, nargs="+", default=[1, 4])
  parser.add_argument(
    "--remat",
    choices=("on", "off", "both"),
    default="on",
    help="sleep.remat (the config's default is on)",
  )
  parser.add_argument("--steps", type=int, default=8)
  parser.add_argument(
    "--xla_flags", default="", help="appended to XLA_FLAGS in every measuring process"
  )
  parser.add_argument("--json", default=os.path.join(REPO, "bench", "results", "train_step.json"))
  parser.add_argument("--worker", nargs=2, metavar=("PASSES", "REMAT"), help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    print(json.dumps(measure(args.setting, int(args.worker[0]), args.worker[1] == "1", args.steps)))
    return

  env = dict(os.environ)
  env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {args.xla_flags}".strip()
  env.setdefault("JAX_PLATFORMS", "cpu")
  rows = []
  remats = {"on": (True,), "off": (False,), "both": (True, False)}[args.remat]
  for remat in remats:
    for passes in args.passes:
      out = subprocess.run(
        [
          sys.executable,
          __file__,
          "--setting",
          args.setting,
          "--steps",
          str(args.steps),
          "--worker",
          str(passes),
          str(int(remat)),
        ],
        capture_output=True,
        text=True,
        env=env,
      )
      if out.returncode:
        rows.append(
          {
            "passes": passes,
            "remat": remat,
            "error": (out.stderr.strip().splitlines() or ["?"])[-1],
          }
        )
      else:
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
      print(rows[-1], file=sys.stderr, flush=True)

  print_table(rows, args)
  os.makedirs(os.path.dirname(args.json), exist_ok=True)
  with open(args.json, "w") as f:
    json.dump(
      {
        "config": "rule110.py:cpu",
        "setting": args.setting,
        "overrides": SETTINGS[args.setting],
        "steps": args.steps,
        "xla_flags": args.xla_flags,
        "rows": rows,
      },
      f,
      indent=2,
    )


if __name__ == "__main__":
  main()
