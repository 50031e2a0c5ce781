"""Median ms per train step and peak memory of a config variant for N = 1, 2, 4, with and without remat.

  python bench/train_step.py [--config=rule110:cpu] [--passes 1 2 4] [--steps 5] [--json out.json]

Each (N, remat) setting runs in its own subprocess so that its peak resident memory (ru_maxrss,
what the CPU backend allocates) is its own. Targets from the foundation issue: the N=4 / N=1
step-time ratio within 10% of (4*4+1)/(4+1) = 3.4 (Rule 110: four sleep chunks of N passes
plus one prediction pass), and with remat the N=4 peak memory within 1.3x of N=1.
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


def measure(config_name: str, passes: int, remat: bool, steps: int) -> dict:
  """Times `steps` jitted train steps (after one compile step) in this process."""
  import importlib

  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  import sleep_jax  # noqa: F401  (applies the XLA CPU guard before the backend starts)
  from sleep_jax.data import tasks
  from sleep_jax.model.lm import build_model
  from sleep_jax.sleep.config import SleepConfig
  from sleep_jax.train.optim import make_optimizer, optimizer_labels
  from sleep_jax.train.step import TrainState, train_step

  module, variant = config_name.split(":")
  config = importlib.import_module(f"configs.{module}").get_config(variant)
  config.sleep.passes, config.sleep.remat = passes, remat
  graphdef, state = nnx.split(build_model(config.model, seed=0))
  params = nnx.to_pure_dict(state)
  optimizer = make_optimizer(config.train, optimizer_labels(state))
  train_state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))
  batch = tasks.get_task(config.task).generate(np.random.default_rng(0), config.train.batch_size)
  step = jax.jit(functools.partial(train_step, graphdef=graphdef,
                                   sleep_cfg=SleepConfig.from_config(config.sleep), optimizer=optimizer),
                 donate_argnums=0)
  start = time.perf_counter()
  train_state, metrics = step(train_state, batch)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - start
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    train_state, metrics = step(train_state, batch)
    jax.block_until_ready(metrics)
    times.append(1e3 * (time.perf_counter() - start))
  return {"passes": passes, "remat": remat, "median_ms": statistics.median(times),
          "min_ms": min(times), "compile_s": compile_s,
          "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="rule110:cpu")
  parser.add_argument("--passes", type=int, nargs="+", default=[1, 2, 4])
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--json", default=os.path.join(REPO, "bench", "results", "train_step.json"))
  parser.add_argument("--worker", nargs=2, metavar=("PASSES", "REMAT"), help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    print(json.dumps(measure(args.config, int(args.worker[0]), args.worker[1] == "1", args.steps)))
    return

  rows = []
  for remat in (True, False):
    for passes in args.passes:
      out = subprocess.run([sys.executable, __file__, "--config", args.config, "--steps", str(args.steps),
                            "--worker", str(passes), str(int(remat))], capture_output=True, text=True)
      if out.returncode:
        rows.append({"passes": passes, "remat": remat, "error": out.stderr.strip().splitlines()[-1]})
      else:
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
      print(rows[-1], file=sys.stderr, flush=True)

  print(f"\n{args.config}, {args.steps} timed steps each\n")
  print("| remat | N | median ms/step | ratio to N=1 | ideal ratio | peak RSS MB | mem ratio to N=1 | compile s |")
  print("|---|---:|---:|---:|---:|---:|---:|---:|")
  for row in rows:
    if "error" in row:
      print(f"| {row['remat']} | {row['passes']} | error: {row['error']} |")
      continue
    base = next(r for r in rows if r["remat"] == row["remat"] and r["passes"] == args.passes[0])
    n = row["passes"]
    row["time_ratio"] = row["median_ms"] / base["median_ms"]
    row["ideal_ratio"] = (4 * n + 1) / (4 * args.passes[0] + 1)
    row["memory_ratio"] = row["peak_rss_mb"] / base["peak_rss_mb"]
    print(f"| {row['remat']} | {n} | {row['median_ms']:.0f} | {row['time_ratio']:.2f} | {row['ideal_ratio']:.2f} "
          f"| {row['peak_rss_mb']:.0f} | {row['memory_ratio']:.2f} | {row['compile_s']:.1f} |")
  os.makedirs(os.path.dirname(args.json), exist_ok=True)
  with open(args.json, "w") as f:
    json.dump({"config": args.config, "steps": args.steps, "rows": rows}, f, indent=2)


if __name__ == "__main__":
  main()
