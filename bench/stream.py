"""Streaming inference: block prefill against `apply`, and per-token decode latency and memory
against the context fed, for sleep at several N and for a full-attention KV-cache decoder.

    python bench/stream.py                       # prefill at 4K and 64K; decode at 1K..64K
    python bench/stream.py --passes 1 --contexts 1024 4096 --prefill_contexts 4096 \\
        --timed_tokens 50 --out_dir /tmp/stream  # a quick look
    python bench/stream.py --eviction sliding --window 256
    python bench/stream.py --model_config configs/rule110.py:cpu --passes 2 --window 64 \
        --contexts 1024 --no_full_attention --out_dir /tmp/stream_cpu  # another config's model

Prefill: for each N, a batch of `--prefill_batch` random prompts of each `--prefill_contexts`
length is fed to a fresh stream as one block (`stream_feed`: whole passes, every token's
logits), and the same tokens run through `apply` with every window but the last slept on and
the last predicted (the training forward of a sequence that long). Both are timed in the same
process, alternately, best of `--repeats` after a warm-up; the table gives tokens/s and their
ratio (target, issue 27: prefill >= 0.5x apply).

Decode: for each N and for the full-attention decoder (`eviction="none"`, a KV cache of every
token: `stream_init(..., max_len=context + timed tokens)`), one stream (batch 1, random tokens)
is fed up to each context length in blocks, then `--timed_tokens` single-token feeds are timed
(for sleep they stay inside a window: pure wake; one sleep is timed apart as the feed of the
token that fills a window, minus the median wake). Reported: median and p99 ms per token, the
stream state's bytes, and the process's resident memory. The model is small (d_model 128,
"AGAG", 4 heads of 32, MLP 512, vocabulary 256) with a 512-token window: an inference
setting, not a paper config. `--model_config` takes the model of an experiment config instead
(its `config.model`; the window and N stay the flags').

Prints markdown tables; writes stream.json and decode.png (latency and memory against the
context) to `--out_dir` (docs/results/stream by default).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(BENCH_DIR))  # runnable as a plain script from anywhere
from sleep_jax import xla_flags  # noqa: E402

xla_flags.apply_defaults()  # before JAX starts its backend

import jax  # noqa: E402
import numpy as np  # noqa: E402

import sleep_jax  # noqa: E402
from sleep_jax.experiments import config_files  # noqa: E402
from sleep_jax.sleep import stream  # noqa: E402

MODEL = dict(vocab_size=256, pattern="AGAG", d_model=128, num_heads=4, head_dim=32, mlp_dim=512)
FEED_BLOCK = 512  # tokens per feed call while filling the context
FULL = "full attention"  # the decoder without eviction


def resident_mb() -> float:
  """The process's resident memory now (not the peak), in MB."""
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def random_tokens(model, rng, shape) -> np.ndarray:
  return rng.integers(0, model.cfg.vocab_size, shape, dtype=np.int32)


def model_fields(spec: str | None) -> dict:
  """The bench's own model, or the model of the experiment config `spec` ("file.py:variant")."""
  if spec is None:
    return MODEL
  return config_files.load_config(spec).model.to_dict()


def schedule(passes, args, context_len=0) -> dict:
  if passes == FULL:
    return dict(passes=1, eviction="none", context_len=context_len)
  return dict(passes=passes, window=args.window, eviction=args.eviction, context_len=context_len)


def best_seconds(fn, repeats: int) -> float:
  fn()  # compile and warm up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return min(times)


def measure_prefill(model, passes: int, args) -> list[dict]:
  rows = []
  for context in args.prefill_contexts:
    if context % args.window:
      raise SystemExit(f"--prefill_contexts must be multiples of --window={args.window}")
    rng = np.random.default_rng(context)
    tokens = random_tokens(model, rng, (args.prefill_batch, context))
    forward = schedule(passes, args, context_len=context - args.window)
    streaming = schedule(passes, args)

    def run_apply(tokens=tokens, forward=forward):
      return sleep_jax.apply(model, tokens, sleep_config=forward)

    def run_prefill(tokens=tokens, streaming=streaming):
      state = sleep_jax.stream_init(model, args.prefill_batch, sleep_config=streaming)
      return sleep_jax.stream_feed(model, state, tokens, sleep_config=streaming)

    apply_s = best_seconds(run_apply, args.repeats)
    prefill_s = best_seconds(run_prefill, args.repeats)
    tokens_fed = args.prefill_batch * context
    rows.append(
      dict(
        passes=passes,
        context=context,
        batch=args.prefill_batch,
        apply_tokens_per_s=tokens_fed / apply_s,
        prefill_tokens_per_s=tokens_fed / prefill_s,
        prefill_over_apply=apply_s / prefill_s,
      )
    )
    print(f"  prefill N={passes} {context} tokens: {rows[-1]}", flush=True)
  return rows


def timed_feed(model, state, token, sleep) -> tuple[float, object]:
  start = time.perf_counter()
  logits, state = sleep_jax.stream_feed(model, state, token, sleep_config=sleep)
  jax.block_until_ready((logits, state))
  return 1e3 * (time.perf_counter() - start), state


def feed_to(model, state, fed: int, target: int, sleep, rng, block: int) -> tuple[object, int]:
  """Feeds random tokens until `target` tokens have been fed in all: first what is left of the
  open block, then whole blocks (few shapes, so few compilations), then the rest."""
  while fed < target:
    size = min(block - fed % block, target - fed)
    tokens = random_tokens(model, rng, (1, size))
    _, state = sleep_jax.stream_feed(model, state, tokens, sleep_config=sleep)
    fed += size
  jax.block_until_ready(state)
  return state, fed


def time_tokens(model, state, sleep, rng, num: int) -> tuple[list[float], object]:
  one = lambda: random_tokens(model, rng, (1, 1))
  times = []
  for _ in range(num):
    ms, state = timed_feed(model, state, one(), sleep)
    times.append(ms)
  return times, state


def point(context, wake, state) -> dict:
  return dict(
    context=context,
    wake_median_ms=statistics.median(wake),
    wake_p99_ms=float(np.percentile(wake, 99)),
    state_mb=stream.state_bytes(state) / 1e6,
    resident_mb=resident_mb(),
  )


def measure_sleep_decode(model, passes: int, args) -> dict:
  sleep = schedule(passes, args)
  rng = np.random.default_rng(0)
  state = sleep_jax.stream_init(model, 1, sleep_config=sleep)
  # Warm up every feed shape and one sleep on a throwaway copy of the stream (the first
  # execution of the sleep branch costs far more than later ones).
  warm, fed = feed_to(model, state, 0, FEED_BLOCK + args.window - 1, sleep, rng, FEED_BLOCK)
  time_tokens(model, warm, sleep, rng, 2)
  fed, points = 0, []
  for context in args.contexts:
    state, fed = feed_to(model, state, fed, context, sleep, rng, FEED_BLOCK)
    if int(state.position[0]) + args.timed_tokens >= args.window:
      raise ValueError("--timed_tokens must fit in what is left of the window")
    wake, state = time_tokens(model, state, sleep, rng, args.timed_tokens)
    fed += args.timed_tokens
    points.append(point(context, wake, state))
    print(f"  decode N={passes} context {context}: {points[-1]}", flush=True)
  sleeps = []
  for _ in range(args.sleep_repeats):  # fill the window to one short, time the token that fills it
    to_fill = args.window - 1 - int(state.position[0])
    state, fed = feed_to(model, state, fed, fed + to_fill, sleep, rng, args.window)
    ms, state = time_tokens(model, state, sleep, rng, 1)
    fed += 1
    assert int(state.position[0]) == 0
    sleeps.append(ms[0])
  wake_median = statistics.median(p["wake_median_ms"] for p in points)
  filling = statistics.median(sleeps)
  # The sleep alone is the filling token's time less a wake's. When a sleep costs less than the
  # timing noise (small windows) the difference can come out negative: both are kept.
  return dict(
    passes=passes, points=points, filling_token_ms=filling, sleep_ms=filling - wake_median
  )


def measure_full_attention_decode(model, args) -> dict:
  sleep = schedule(FULL, args)
  rng = np.random.default_rng(0)
  points = []
  for context in args.contexts:
    state = sleep_jax.stream_init(
      model, 1, sleep_config=sleep, max_len=context + args.timed_tokens + 2
    )
    state, _ = feed_to(model, state, 0, context, sleep, rng, FEED_BLOCK)
    time_tokens(model, state, sleep, rng, 2)  # compile the one-token feed for this cache size
    wake, state = time_tokens(model, state, sleep, rng, args.timed_tokens)
    points.append(point(context, wake, state))
    print(f"  decode {FULL} context {context}: {points[-1]}", flush=True)
    del state
  return dict(passes=FULL, points=points, filling_token_ms=None, sleep_ms=None)


def print_tables(prefill: list[dict], decode: list[dict], args) -> None:
  device = jax.devices()[0]
  print(f"\n{args.eviction} eviction, window L={args.window}, {device}")
  print(f"\nPrefill, batch {args.prefill_batch} (block `stream_feed` vs `apply`, same tokens):\n")
  print("| N | tokens | apply tokens/s | prefill tokens/s | prefill / apply |")
  print("|---:|---:|---:|---:|---:|")
  for row in prefill:
    print(
      f"| {row['passes']} | {row['context']:,} | {row['apply_tokens_per_s']:,.0f} | "
      f"{row['prefill_tokens_per_s']:,.0f} | {row['prefill_over_apply']:.2f} |"
    )
  contexts = " / ".join(context_label(c) for c in args.contexts)
  print(f"\nDecode, batch 1, ms per token and memory at {contexts} tokens of context:\n")
  print(
    "| decoder | median ms | p99 ms | state MB | resident MB | window-filling token ms "
    "| one sleep ms |"
  )
  print("|---|---|---|---|---|---:|---:|")
  for row in decode:
    name = row["passes"] if row["passes"] == FULL else f"sleep N={row['passes']}"
    join = lambda key, fmt, row=row: " / ".join(fmt.format(p[key]) for p in row["points"])
    ms = lambda key, row=row: "-" if row[key] is None else f"{row[key]:.0f}"
    print(
      f"| {name} | {join('wake_median_ms', '{:.2f}')} | {join('wake_p99_ms', '{:.2f}')} | "
      f"{join('state_mb', '{:.2f}')} | {join('resident_mb', '{:.0f}')} "
      f"| {ms('filling_token_ms')} | {ms('sleep_ms')} |"
    )


def context_label(tokens: int) -> str:
  """4096 -> "4K"; a length that is not a whole number of K as it is."""
  return f"{tokens // 1024}K" if tokens % 1024 == 0 else f"{tokens:,}"


def plot(decode: list[dict], path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  figure, (latency, memory) = plt.subplots(1, 2, figsize=(10, 4))
  for row in decode:
    label = row["passes"] if row["passes"] == FULL else f"sleep N={row['passes']}"
    contexts = [p["context"] for p in row["points"]]
    latency.plot(contexts, [p["wake_median_ms"] for p in row["points"]], "o-", label=label)
    memory.plot(contexts, [p["state_mb"] for p in row["points"]], "o-", label=label)
  for axis, title in ((latency, "median ms per generated token"), (memory, "stream state MB")):
    axis.set_xscale("log", base=2)
    axis.set_xlabel("tokens of context")
    axis.set_title(title)
    axis.grid(alpha=0.3)
  memory.set_yscale("log")
  latency.legend()
  figure.tight_layout()
  figure.savefig(path, dpi=120)
  plt.close(figure)


def main():
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--passes", type=int, nargs="+", default=[1, 4])
  parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
  parser.add_argument("--prefill_contexts", type=int, nargs="+", default=[4096, 65536])
  parser.add_argument("--prefill_batch", type=int, default=2)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--window", type=int, default=512)
  parser.add_argument("--eviction", choices=["hard", "sliding"], default="hard")
  parser.add_argument("--timed_tokens", type=int, default=200)
  parser.add_argument("--sleep_repeats", type=int, default=5)
  parser.add_argument("--no_full_attention", action="store_true", help="skip the KV decoder")
  parser.add_argument("--model_config", help="an experiment config whose model to use instead")
  parser.add_argument(
    "--out_dir", default=os.path.join(BENCH_DIR, "..", "docs", "results", "stream")
  )
  args = parser.parse_args()
  if sorted(args.contexts) != args.contexts:
    raise SystemExit("--contexts must increase")
  fields = model_fields(args.model_config)
  model = sleep_jax.build_model(fields, seed=0)
  prefill = [row for passes in args.passes for row in measure_prefill(model, passes, args)]
  decode = [measure_sleep_decode(model, passes, args) for passes in args.passes]
  if not args.no_full_attention:
    decode.append(measure_full_attention_decode(model, args))
  print_tables(prefill, decode, args)
  os.makedirs(args.out_dir, exist_ok=True)
  json_path = os.path.join(args.out_dir, "stream.json")
  with open(json_path, "w") as f:
    json.dump(
      dict(
        device=str(jax.devices()[0]),
        jax=jax.__version__,
        model=fields,
        model_config=args.model_config,
        window=args.window,
        eviction=args.eviction,
        prefill_batch=args.prefill_batch,
        prefill=prefill,
        decode=decode,
      ),
      f,
      indent=2,
    )
  plot(decode, os.path.join(args.out_dir, "decode.png"))
  print(f"wrote {json_path} and decode.png")


if __name__ == "__main__":
  main()
