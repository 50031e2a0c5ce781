"""Streaming inference: per-token wake latency and memory against the context fed, and against N.

    python bench/stream.py                                   # N = 1, 2, 4; 1K..64K tokens
    python bench/stream.py --passes 1 --contexts 1024 4096 --timed_tokens 50   # a quick look
    python bench/stream.py --eviction sliding --window 256

For each N, one stream (batch 1, random tokens) is fed up to each context length in blocks (one
jitted `stream_feed` call per block, sleeping whenever a window fills). At each length it times
`--timed_tokens` single-token feeds that stay inside the window (pure wake: no sleep), and
reports their median and p99 in milliseconds, the stream state's bytes, the bytes of every live
JAX array in the process and the process's resident memory. One sleep (N passes over a window,
then eviction) is timed separately: a feed of the token that fills a window, minus the median
wake. The model is small (d_model 128, "AGAG", 4 heads of 32, MLP 512, vocabulary 256) with a
512-token window: an inference setting, not a paper config.

Targets (issue 12): wake latency and memory flat in the context (<= 1.1x from the first length
to the last), wake latency and memory independent of N. Prints a markdown table; writes JSON
(bench/results/stream.json by default).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import numpy as np

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(BENCH_DIR))  # runnable as a plain script from anywhere
import sleep_jax  # noqa: E402
from sleep_jax.sleep import stream  # noqa: E402

MODEL = dict(vocab_size=256, pattern="AGAG", d_model=128, num_heads=4, head_dim=32, mlp_dim=512)
FEED_BLOCK = 512  # tokens per feed call while filling the context (one compiled shape)


def resident_mb() -> float:
  """The process's resident memory now (not the peak), in MB."""
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def live_array_mb() -> float:
  return sum(x.nbytes for x in jax.live_arrays()) / 1e6


def timed_feed(model, state, token, sleep) -> tuple[float, object]:
  start = time.perf_counter()
  logits, state = sleep_jax.stream_feed(model, state, token, sleep_config=sleep)
  jax.block_until_ready((logits, state))
  return 1e3 * (time.perf_counter() - start), state


def feed_to(model, state, fed: int, target: int, sleep, rng) -> tuple[object, int]:
  """Feeds random tokens until `target` tokens have been fed in all.

  Only two shapes are fed (blocks of FEED_BLOCK and single tokens), both compiled before the
  first measurement, so no compilation lands between two measurements.
  """
  while fed < target:
    block = FEED_BLOCK if target - fed >= FEED_BLOCK else 1
    tokens = rng.integers(0, MODEL["vocab_size"], (1, block), dtype=np.int32)
    _, state = sleep_jax.stream_feed(model, state, tokens, sleep_config=sleep)
    fed += block
  jax.block_until_ready(state)
  return state, fed


def measure(model, passes: int, args) -> dict:
  sleep = dict(
    passes=passes, window=args.window, eviction=args.eviction, context_len=0, conv_state="reset"
  )
  rng = np.random.default_rng(0)
  state = sleep_jax.stream_init(model, 1, sleep_config=sleep)
  one = lambda: rng.integers(0, MODEL["vocab_size"], (1, 1), dtype=np.int32)
  # Compile both feed shapes and run one sleep on a throwaway copy of the stream (the first
  # execution of the sleep branch costs far more than later ones).
  warm, fed = feed_to(model, state, 0, FEED_BLOCK, sleep, rng)
  warm, _ = feed_to(model, warm, fed, fed + args.window - 1, sleep, rng)
  timed_feed(model, warm, one(), sleep)
  fed, points = 0, []
  for context in args.contexts:
    state, fed = feed_to(model, state, fed, context, sleep, rng)
    if int(state.position) + args.timed_tokens >= args.window:
      raise ValueError("--timed_tokens must fit in what is left of the window")
    wake = []
    for _ in range(args.timed_tokens):
      ms, state = timed_feed(model, state, one(), sleep)
      wake.append(ms)
    fed += args.timed_tokens
    points.append(
      dict(
        context=context,
        wake_median_ms=statistics.median(wake),
        wake_p99_ms=float(np.percentile(wake, 99)),
        state_mb=stream.state_bytes(state) / 1e6,
        live_arrays_mb=live_array_mb(),
        resident_mb=resident_mb(),
      )
    )
    print(f"  N={passes} context {context}: {points[-1]}", flush=True)
  # One sleep: fill the window to one token short, then time the token that fills it.
  sleeps = []
  for _ in range(args.sleep_repeats):
    state, fed = feed_to(model, state, fed, fed + args.window - 1 - int(state.position), sleep, rng)
    ms, state = timed_feed(model, state, one(), sleep)
    fed += 1
    assert int(state.position) == 0
    sleeps.append(ms)
  wake_median = statistics.median(p["wake_median_ms"] for p in points)
  return dict(
    passes=passes,
    points=points,
    sleep_ms=statistics.median(sleeps) - wake_median,
    wake_flat_ratio=points[-1]["wake_median_ms"] / points[0]["wake_median_ms"],
    resident_flat_ratio=points[-1]["resident_mb"] / points[0]["resident_mb"],
  )


def print_table(rows: list[dict], args) -> None:
  print(f"\n{args.eviction} eviction, window L={args.window}, batch 1, {jax.devices()[0]}")
  print("| N | context | wake median ms | wake p99 ms | state MB | live arrays MB | RSS MB |")
  print("|---:|---:|---:|---:|---:|---:|---:|")
  for row in rows:
    for p in row["points"]:
      print(
        f"| {row['passes']} | {p['context']:,} | {p['wake_median_ms']:.2f} | "
        f"{p['wake_p99_ms']:.2f} | {p['state_mb']:.2f} | {p['live_arrays_mb']:.1f} | "
        f"{p['resident_mb']:.0f} |"
      )
  print("\n| N | one sleep ms | wake last/first context | RSS last/first context |")
  print("|---:|---:|---:|---:|")
  for row in rows:
    print(
      f"| {row['passes']} | {row['sleep_ms']:.1f} | {row['wake_flat_ratio']:.2f} | "
      f"{row['resident_flat_ratio']:.2f} |"
    )
  base = rows[0]["points"]
  for row in rows[1:]:
    ratio = statistics.median(
      p["wake_median_ms"] / b["wake_median_ms"] for p, b in zip(row["points"], base)
    )
    print(f"wake latency N={row['passes']} / N={rows[0]['passes']}: {ratio:.2f}")


def main():
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--passes", type=int, nargs="+", default=[1, 2, 4])
  parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
  parser.add_argument("--window", type=int, default=512)
  parser.add_argument("--eviction", choices=["hard", "sliding"], default="hard")
  parser.add_argument("--timed_tokens", type=int, default=200)
  parser.add_argument("--sleep_repeats", type=int, default=5)
  parser.add_argument("--json", default=os.path.join(BENCH_DIR, "results", "stream.json"))
  args = parser.parse_args()
  if sorted(args.contexts) != args.contexts:
    raise SystemExit("--contexts must increase")
  model = sleep_jax.build_model(MODEL, seed=0)
  rows = [measure(model, passes, args) for passes in args.passes]
  print_table(rows, args)
  os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
  with open(args.json, "w") as f:
    json.dump(
      dict(
        device=str(jax.devices()[0]),
        jax=jax.__version__,
        model=MODEL,
        window=args.window,
        eviction=args.eviction,
        rows=rows,
      ),
      f,
      indent=2,
    )
  print(f"wrote {args.json}")


if __name__ == "__main__":
  main()
