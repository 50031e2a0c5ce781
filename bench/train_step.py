"""Train-step throughput: ms/step, achieved FLOP/s against a plain matmul, memory; CPU or GPU.

  python bench/train_step.py                        # the README's first run: sweep shape, N=1 and 4
  python bench/train_step.py --setting=cpu --passes 1 2 4 --remat both   # plain rule110.py:cpu
  python bench/train_step.py --xla_flags=--xla_cpu_use_thunk_runtime=false   # compare XLA flags
  python bench/train_step.py --platform gpu --setting paper --passes 1 2 4 \
      --json bench/results/train_step_gpu.json     # the paper's step on one GPU: MFU, peak memory
  python bench/train_step.py --platform gpu --passes 1 4 --dtype bfloat16 --impl chunked
  python bench/train_step.py --setting paper --count_kernels h100 --passes 1 2 4   # no GPU

Settings (`configs/rule110.py:<variant>` plus overrides; hard eviction, L=24, 96 context tokens):
  sweep (default on the CPU)  variant cpu, depth 2, with the model of the short two-arm run and
                   of configs/sweeps/rule110_cpu.py: d_model 64, 2 heads of 32, MLP 128, batch 32.
  cpu              variant cpu as it is: d_model 128, 4 heads of 32, MLP 512, batch 64, depth 2.
  paper (default with --platform gpu)  variant paper as it is: d_model 256, "AGAG", 4 heads of
                   64, MLP 1024, batch 512, depth 32 (the paper's Fig. 2 step).
`--dtype` overrides model.dtype (activations; params and fast state stay float32) and `--impl`
model.fast_weight_impl ("auto": pallas on a GPU, chunked on the CPU); `config` keeps the config's.

`--platform` sets JAX_PLATFORMS for the measuring processes: `cpu` (default) sets it to cpu
unless the caller's environment already sets it, `gpu` sets it to cuda, `default` leaves the
environment alone. XLA_PYTHON_CLIENT_MEM_FRACTION and XLA_FLAGS are the caller's (`--xla_flags`
appends to the latter).

Each (N, remat) setting runs in its own subprocess (so its peak memory is its own; `--timeout_s`
bounds each, a timeout or a crash is an error row, with the worker's stderr tail in the JSON)
and reports, over `--steps` timed steps after one compile step:
  * median wall ms per step (`median_ms` = `ms_per_step`), CPU ms per step (all threads; the
    host is shared, so this is the steadier number on the CPU when other jobs run), tokens/s
    (batch x tokens per example / step time) and the projected hours for 100k steps (the
    paper's run);
  * achieved FLOP/s = `sleep_jax.sleep.flops.train_step_flops` (model matmul FLOPs, forward +
    backward, no remat recompute) / median step time; `FLOP ratio` is a row's FLOPs per step
    over the N=1 row's, the step time ratio's target (the issue: N=4/N=1 time within 10% of it);
  * in the same process, timed alternately with the steps so that both see the same load, the
    FLOP/s of a plain matmul of the step's own largest dense shape in the model's dtype, the
    SwiGLU up projection [B*L, d_model] @ [d_model, mlp_dim] (32 in one executable, so that
    dispatch does not count), and of a square matmul: float32 1024 on the CPU (the host's
    peak), bfloat16 8192 on a GPU. `vs mm` is the step's FLOP/s over the step-shaped matmul's
    (the CPU issue's target: >= 0.5), `vs peak` (GPU: `vs 8192 bf16 mm`,
    `mfu_vs_measured_matmul`) over the square one's;
  * on a GPU: MFU = achieved FLOP/s / the device's dense bf16 peak (H100 and H200 SXM: 989.4
    TFLOP/s; None for a device not in `BF16_PEAK_FLOPS`), and the device's peak memory in use
    (`memory_stats()["peak_bytes_in_use"]` after the compile step and one more, before the
    reference matmuls are allocated; None where the runtime does not report it);
  * the N / N=1 step-time ratio beside the ideal (4N+1)/5 (Rule 110: four sleep chunks of N
    passes plus one prediction pass), and peak RSS.
A markdown table goes to stdout (a GPU table when the workers ran on a GPU), the rows to `--json`
with the top-level "device" (device_kind), "jax" (version), "platform", "backend", "setting";
the JSON is rewritten after every worker, so a run cut short keeps the rows it measured.

Where the time goes (XLA:CPU host trace, `jax.profiler` with the thunk events of the Eigen
threads, jaxlib 0.10.2, sweep setting, N=1): about 8,000 kernel launches per step, 15 us of
kernel time each on average. Before the causal conv got its own backward pass (layers.py), its
filter gradient was the three slowest kernels (48 of ~300 ms): XLA fused the per-tap (B, T)
reduction with the whole elementwise chain producing its cotangent (SiLU and L2-norm backward,
transposes) and recomputed the chain for every tap and channel; as one matmul it was gone from
the top of the list (297 -> ~255 ms per step). What is left: ~1,500 small dots (~120 ms; the
model's dense matmuls ~35 ms of them, the rest the chunked gated delta rule's per-(batch, head)
products and the triangular inverse's levels), layout copies and transposes feeding them
(~60 ms), the scans' stacking of per-layer and per-chunk outputs (~45 ms). At these widths
(d_model 64, 24-token windows) the step is bound by per-kernel cost, not by matmul throughput.

Counting the kernels statically (the compiled step's HLO, while bodies times their trip
counts; 8,007 per N=1 step, of them 5,836 loop fusions, 1,544 dots, 600 copies): the layer
scan over the two repetitions of "AG" accounted for ~1,800 dynamic slices and updates (the
stacked parameters sliced per repetition, residuals and gradients stacked) and ~560 of the
copies. Unrolled (`model.scan_min_repeats`, default 3): 5,383 kernels, N=1 292 -> 232 ms and
N=4 1000 -> 822 ms in one run. The triangular inverse of the chunked rule took 39 kernels per
call (5 levels of slicing, two dots and concatenation); as one block-diagonal matrix doubled by
masked products (chunks up to 32 tokens; longer ones keep the FLOP-lean form) it takes 17:
4,995 kernels per step, 170-188 ms (N=1) and 668-799 ms (N=4).
Unrolling the sleep chunks' and passes' scans as well cut another 14% (N=1) and 9% (N=4) of
the kernels but not the time (and doubled the N=4 compile): not done. What is left at N=1:
~3,500 loop fusions (the model's elementwise chains, backward pads and adds, the gated delta
rule's masks), ~1,470 dots (225 of them Muon's Newton-Schulz iterations).
Next round (time by component: the thunk events of a host trace joined to the HLO's op names,
with temporary jax.named_scope around the mixers, the MLP and the gated delta rule): the gated
delta rule was ~40% of the step, the Gated DeltaNet mixer's own backward ~20%. Every sleep pass
over a 24-token window is one chunk, yet the rule ran its chunk scan and its lean custom VJP
(the chunk recomputed in the backward, gradient buffers written by dynamic updates); a call of
one chunk is now that chunk under plain autodiff. The decay sums of chunks up to 32 tokens
(two cumulative sums, several reduce-window kernels each way) are one matmul against a 0/1
selector. The conv's filter gradient, a matmul batched over channels (~0.6 ms a call), is a
multiply and one reduction over B*T. Projections reading the same input share one matmul per
output width (`layers.project_together`: q|k|v|out_gate, gate|up, decay|beta) and the three
q/k/v convolutions run as one (`layers.convolve_together`). Together: 4,057 kernels per N=1
step and 0.79x the step time of the round before, in one A/B run (alternating persistent
workers, 40 steps each).
XLA flags (sleep_jax/xla_flags.py, set by every entry point; this script's workers too). The
YNNPACK crash guard had turned off all of XLA:CPU's YNNPACK fusions, its dots included; limited
to dots (`--xla_cpu_experimental_ynn_fusion_type=dot`) they are back, and they run the gated
delta rule's small batched products ([B, H] batches of 24 x 32 operands, ~0.1-0.2 ms each
through XLA's own dot, about a fifth of the step) faster. In a process with one CPU device,
`--xla_cpu_multi_thread_eigen=false` saves the thread pool's hand-off on each of the ~4,000
small kernels (the step still uses both cores: CPU ms stays ~1.6x wall). With 8 host devices
the latter made the step slower (195 -> 259 ms at N=1 in one pair of runs), so processes with
several devices (the tests) keep XLA's default. Four settings rotated three times, N=1 medians
of the three runs (one process each, `XLA_FLAGS=...`): previous defaults 184 ms, one-thread
kernels 165 ms, both 144 ms (0.78x), YNN dots alone 157 ms.
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

# Per setting: the configs/rule110.py variant and its overrides (the sweep's model and batch).
SETTINGS = {
  "sweep": {
    "variant": "cpu",
    "overrides": {
      "model": {"d_model": 64, "num_heads": 2, "head_dim": 32, "mlp_dim": 128},
      "train": {"batch_size": 32},
    },
  },
  "cpu": {"variant": "cpu", "overrides": {}},
  "paper": {"variant": "paper", "overrides": {}},
}
MM_REPS = 32  # step-shaped matmuls per timed call of the reference
# The square reference matmul per backend: (size, dtype, calls per timing). On a GPU one 8192
# bf16 matmul is ~1 TFLOP (~1.5 ms), enough that back-to-back dispatch does not count.
SQUARE = {"cpu": (1024, "float32", 1), "gpu": (8192, "bfloat16", 4)}
# Dense bf16 peak FLOP/s by device_kind substring, first match wins (NVIDIA datasheets).
BF16_PEAK_FLOPS = (
  ("H100 PCIe", 756e12),
  ("H100 NVL", 835.5e12),
  ("H100", 989.4e12),  # SXM
  ("H200", 989.4e12),
)
DTYPES = ("float32", "bfloat16")
try:  # the impls the model config accepts (a tree that has more, e.g. "pallas_staged", offers them)
  from sleep_jax.model.config import FAST_WEIGHT_IMPLS
except ImportError:
  FAST_WEIGHT_IMPLS = ("reference", "chunked", "pallas", "auto")
# What each --platform puts in the measuring processes' JAX_PLATFORMS (None: leave it alone).
PLATFORMS = {"cpu": "cpu", "gpu": "cuda", "default": None}


def build_config(setting: str, passes: int, remat, dtype="config", impl="config"):
  """The setting's config at N=`passes`; `remat` True/False overrides sleep.remat, None keeps
  the config's (the paper variant: off, with the loops unrolled)."""
  import importlib

  config = importlib.import_module("configs.rule110").get_config(SETTINGS[setting]["variant"])
  for section, fields in SETTINGS[setting]["overrides"].items():
    for name, value in fields.items():
      config[section][name] = value
  config.sleep.passes = passes
  if remat is not None:
    config.sleep.remat = remat
  if dtype != "config":
    config.model.dtype = dtype
  if impl != "config":
    config.model.fast_weight_impl = impl
  return config


def square_reference(backend: str) -> tuple[int, str, int]:
  """(size, dtype, calls per timing) of the square reference matmul on `backend`."""
  return SQUARE["gpu" if backend == "gpu" else "cpu"]


def bf16_peak_flops(device_kind: str | None) -> float | None:
  """The dense bf16 peak FLOP/s of a device by its device_kind, None if unknown."""
  for name, peak in BF16_PEAK_FLOPS:
    if device_kind and name.lower() in device_kind.lower():
      return peak
  return None


def peak_memory_gb(device) -> float | None:
  """The device's peak bytes in use so far in GiB, None where the runtime does not say."""
  try:
    stats = device.memory_stats()
  except Exception:  # not every backend implements it
    return None
  peak = stats.get("peak_bytes_in_use") if isinstance(stats, dict) else None
  return None if peak is None else peak / 2**30


def ratio(num: float | None, den: float | None) -> float | None:
  """num / den, None when either is missing or den is not positive."""
  return None if num is None or not den or den <= 0 else num / den


def gpu_metrics(
  *, flops: float, median_s: float, tokens: int, square_flops_per_s: float, device_kind
) -> dict:
  """The throughput keys every row carries (None where the device's peak is unknown)."""
  achieved = flops / median_s
  peak = bf16_peak_flops(device_kind)
  return {
    "ms_per_step": 1e3 * median_s,
    "tokens_per_s": tokens / median_s,
    "projected_100k_steps_h": 100_000 * median_s / 3600,
    "peak_bf16_flops": peak,
    "mfu": ratio(achieved, peak),
    "mfu_vs_measured_matmul": ratio(achieved, square_flops_per_s),
  }


def _timed(fn, reps: int = 1) -> tuple[float, float]:
  """(wall s, process CPU s) per call of `fn`, over `reps` calls dispatched back to back."""
  import jax

  wall, cpu = time.perf_counter(), time.process_time()
  out = None
  for _ in range(reps):
    out = fn()
  jax.block_until_ready(out)
  return (time.perf_counter() - wall) / reps, (time.process_time() - cpu) / reps


def summarize_trace(trace_dir: str, num_steps: int, top: int = 15) -> dict:
  """Device time per step from a jax.profiler trace, by kernel name, with launch counts.

  Reads the device planes ("/device:GPU:0", ...) of the .xplane.pb under `trace_dir`; every
  event on a stream line is one kernel run. (A CPU trace has no device plane: empty tables.)
  """
  import collections
  import glob

  from jax.profiler import ProfileData

  paths = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
  if not paths:
    return {"error": "no .xplane.pb written"}
  data = ProfileData.from_file(paths[0])
  by_kernel, launches, lines = collections.Counter(), collections.Counter(), {}
  device_lines = [
    (plane.name, line, list(line.events))
    for plane in data.planes
    if plane.name.startswith("/device:")
    for line in plane.lines
  ]
  # Kernels are on the stream lines; "XLA Modules" / "XLA Ops" summarize the same time (used
  # only where a runtime reports no stream lines).
  stream_lines = [x for x in device_lines if x[1].name.startswith("Stream")]
  for plane_name, line, events in device_lines:
    lines[f"{plane_name} {line.name}"] = sum(e.duration_ns for e in events) / num_steps / 1e6
  for _, _line, events in stream_lines or [x for x in device_lines if x[1].name == "XLA Ops"]:
    for event in events:
      by_kernel[event.name[:80]] += event.duration_ns
      launches[event.name[:80]] += 1
  per_step_ms = lambda counter: [
    (name, round(ns / num_steps / 1e6, 3)) for name, ns in counter.most_common(top)
  ]
  top_kernels = [(name, ms, launches[name] / num_steps) for name, ms in per_step_ms(by_kernel)]
  return {
    "kernel_ms_per_step": sum(by_kernel.values()) / num_steps / 1e6,
    "kernels_per_step": sum(launches.values()) / num_steps,
    "line_ms_per_step": lines,
    "top_kernels": top_kernels,  # (name, ms per step, launches per step)
  }


def measure(
  setting: str,
  passes: int,
  remat: bool,
  steps: int,
  dtype="config",
  impl="config",
  profile_steps: int = 0,
) -> dict:
  """Compiles and times the train step (and the reference matmuls) in this process.

  With `profile_steps`, also traces that many more steps and summarizes where the device time
  went (`summarize_trace`)."""
  try:  # the project's XLA CPU defaults, before the backend starts (older trees: other names)
    from sleep_jax import xla_flags

    xla_flags.apply_defaults()
  except (ImportError, AttributeError):
    pass
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from sleep_jax.data import tasks
  from sleep_jax.model.config import ModelConfig
  from sleep_jax.model.lm import build_model
  from sleep_jax.sleep.config import SleepConfig
  from sleep_jax.sleep.flops import train_step_flops
  from sleep_jax.train.optim import make_optimizer, optimizer_labels
  from sleep_jax.train.step import TrainState, train_step

  backend = jax.default_backend()
  device = jax.devices()[0]
  device_kind = getattr(device, "device_kind", None)
  config = build_config(setting, passes, remat, dtype, impl)
  sleep_cfg = SleepConfig.from_config(config.sleep)
  model_cfg = ModelConfig.from_config(config.model)
  try:  # what "auto" runs here (the library's rule; absent from older trees)
    from sleep_jax.ops.gated_delta.api import resolve_impl

    impl_resolved = resolve_impl(model_cfg.fast_weight_impl, device.platform)
  except Exception:  # informational only
    impl_resolved = None
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

  static_kernels = None
  if backend == "gpu":  # the compiled step's own count, beside the profile's runtime one
    try:
      from sleep_jax.parallel.compiled import kernels_per_step

      static_kernels = kernels_per_step(step.lower(train_state, batch).compile().as_text()).total
    except Exception as error:  # older trees have no counter; informational only
      static_kernels = f"{type(error).__name__}: {error}"

  # The device's high-water mark of the step alone (state, batch, activations), before the
  # reference matmuls allocate their operands.
  jax.block_until_ready(run_step())
  peak_gb = peak_memory_gb(device)

  # The step's largest dense matmul: rows = one window of the batch, [B*L, d] @ [d, F]. It runs
  # MM_REPS times inside one executable (a loop over distinct left operands), as the step runs
  # its matmuls, so that its rate is not the per-call dispatch overhead.
  rows, inner, cols = batch_size * sleep_cfg.window, model_cfg.d_model, model_cfg.mlp_dim
  mm_dtype = jnp.dtype(model_cfg.dtype)
  keys = jax.random.split(jax.random.key(0), 4)
  lhs = jax.random.normal(keys[0], (MM_REPS, rows, inner), mm_dtype)
  rhs = jax.random.normal(keys[1], (inner, cols), mm_dtype)
  matmuls = jax.jit(lambda lhs, rhs: jax.lax.map(lambda x: x @ rhs, lhs))
  square_size, square_dtype, square_reps = square_reference(backend)
  square = (
    jax.random.normal(keys[2], (square_size, square_size), jnp.dtype(square_dtype)),
    jax.random.normal(keys[3], (square_size, square_size), jnp.dtype(square_dtype)),
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
    peak.append(_timed(lambda: matmul(*square), square_reps)[0])
  profile = None
  if profile_steps:
    import tempfile

    trace_dir = tempfile.mkdtemp(prefix="train_step_trace_")
    jax.profiler.start_trace(trace_dir)
    for _ in range(profile_steps):
      jax.block_until_ready(run_step())
    jax.profiler.stop_trace()
    try:
      profile = summarize_trace(trace_dir, profile_steps)
    except Exception as error:  # the timing stands without it
      profile = {"error": f"{type(error).__name__}: {error}"}
  median_s = statistics.median(wall)
  matmul_gflops = 2 * rows * inner * cols / statistics.median(mm) / 1e9
  peak_gflops = 2 * square_size**3 / statistics.median(peak) / 1e9
  step_gflops = flops / median_s / 1e9
  return {
    "setting": setting,
    "variant": SETTINGS[setting]["variant"],
    "passes": passes,
    "remat": remat,
    "impl": model_cfg.fast_weight_impl,
    "impl_resolved": impl_resolved,
    "dtype": model_cfg.dtype,
    "batch_size": batch_size,
    "seq_len": seq_len,
    "backend": backend,
    "device": device_kind,
    "jax": jax.__version__,
    "median_ms": 1e3 * median_s,
    "min_ms": 1e3 * min(wall),
    "cpu_ms": 1e3 * statistics.median(cpu),
    "gflop_per_step": flops / 1e9,
    "gflops": step_gflops,
    "matmul_shape": [rows, inner, cols],
    "matmul_dtype": mm_dtype.name,
    "matmul_gflops": matmul_gflops,
    "ratio_to_matmul": step_gflops / matmul_gflops,
    "peak_matmul_size": square_size,
    "peak_matmul_dtype": square_dtype,
    "peak_matmul_gflops": peak_gflops,
    "ratio_to_peak": step_gflops / peak_gflops,
    **gpu_metrics(
      flops=flops,
      median_s=median_s,
      tokens=batch_size * seq_len,
      square_flops_per_s=peak_gflops * 1e9,
      device_kind=device_kind,
    ),
    "peak_gb": peak_gb,
    "compile_s": compile_s,
    "static_kernels_per_step": static_kernels,
    "profile": profile,
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
  }


def _fmt(value, spec: str) -> str:
  return "n/a" if value is None else format(value, spec)


def _add_ratios(rows: list[dict], base_passes: int) -> None:
  """time_ratio, flop_ratio and ideal_ratio of every measured row against its remat's N=base."""
  for row in rows:
    if "error" in row:
      continue
    base = next(
      (
        r
        for r in rows
        if r["remat"] == row["remat"] and "error" not in r and r["passes"] == base_passes
      ),
      row,
    )
    row["time_ratio"] = row["median_ms"] / base["median_ms"]
    row["flop_ratio"] = row["gflop_per_step"] / base["gflop_per_step"]
    row["ideal_ratio"] = (4 * row["passes"] + 1) / (4 * base["passes"] + 1)


def print_table(rows: list[dict], args) -> None:
  _add_ratios(rows, min(args.passes))
  measured = [r for r in rows if "error" not in r]
  if any(r.get("backend") == "gpu" for r in measured):
    print_gpu_table(rows, args)
    return
  print(
    f"\nrule110.py:{SETTINGS[args.setting]['variant']}, setting {args.setting}, "
    f"{args.steps} timed steps each, XLA_FLAGS extra: {args.xla_flags or '(none)'}"
    + (f", impl {args.impl}" if args.impl != "config" else "")
    + (f", dtype {args.dtype}" if args.dtype != "config" else "")
    + "\n"
  )
  print(
    "| N | remat | ms/step | CPU ms/step | GFLOP/step | GFLOP/s | matmul GFLOP/s (shape) "
    "| vs mm | 1024^2 GFLOP/s | vs peak | N/N=1 time | FLOP ratio | ideal | peak RSS MB "
    "| compile s |"
  )
  print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
  for row in rows:
    if "error" in row:
      print(f"| {row['passes']} | {row['remat']} | error: {row['error']} |")
      continue
    shape = "x".join(map(str, row["matmul_shape"]))
    print(
      f"| {row['passes']} | {row['remat']} | {row['median_ms']:.0f} | {row['cpu_ms']:.0f} "
      f"| {row['gflop_per_step']:.2f} | {row['gflops']:.1f} | {row['matmul_gflops']:.1f} "
      f"({shape}) | {row['ratio_to_matmul']:.2f} | {row['peak_matmul_gflops']:.1f} "
      f"| {row['ratio_to_peak']:.2f} | {row['time_ratio']:.2f} | {row['flop_ratio']:.2f} "
      f"| {row['ideal_ratio']:.2f} | {row['peak_rss_mb']:.0f} | {row['compile_s']:.1f} |"
    )


def print_profile(row: dict) -> None:
  profile = row["profile"]
  print(f"\nprofile, N={row['passes']} impl={row.get('impl')}: ", end="")
  if "error" in profile:
    print(profile["error"])
    return
  print(
    f"{profile['kernel_ms_per_step']:.1f} ms of kernels per step "
    f"({profile['kernels_per_step']:.0f} kernels) vs {row['median_ms']:.1f} ms wall"
  )
  print("\n| kernel | ms/step | launches/step |\n|---|---:|---:|")
  for name, ms, count in profile["top_kernels"]:
    print(f"| `{name}` | {ms:.2f} | {count:.0f} |")


def print_gpu_table(rows: list[dict], args) -> None:
  first = next(r for r in rows if "error" not in r)
  print(
    f"\nrule110.py:{first['variant']}, setting {args.setting}, {first['device']}, "
    f"jax {first['jax']}, batch {first['batch_size']} x {first['seq_len']} tokens, "
    f"{args.steps} timed steps each, XLA_FLAGS extra: {args.xla_flags or '(none)'}\n"
  )
  print(
    "| N | remat | impl | dtype | ms/step | tokens/s | GFLOP/step | TFLOP/s | MFU (bf16 peak) "
    "| vs 8192 bf16 mm | peak GB | N/N=1 time | FLOP ratio | ideal (4N+1)/5 | compile s "
    "| projected 100k steps h |"
  )
  print("|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
  for row in rows:
    if "error" in row:
      print(
        f"| {row['passes']} | {row['remat']} | {row.get('impl', '?')} | {row.get('dtype', '?')} "
        f"| error: {row['error']} |"
      )
      continue
    impl = row["impl"]
    if row.get("impl_resolved") and row["impl_resolved"] != impl:
      impl = f"{impl} ({row['impl_resolved']})"
    print(
      f"| {row['passes']} | {row['remat']} | {impl} | {row['dtype']} | {row['median_ms']:.1f} "
      f"| {row['tokens_per_s']:,.0f} | {row['gflop_per_step']:.1f} | {row['gflops'] / 1e3:.1f} "
      f"| {_fmt(row['mfu'], '.1%')} | {_fmt(row['mfu_vs_measured_matmul'], '.1%')} "
      f"| {_fmt(row['peak_gb'], '.2f')} | {row['time_ratio']:.2f} | {row['flop_ratio']:.2f} "
      f"| {row['ideal_ratio']:.2f} | {row['compile_s']:.1f} "
      f"| {row['projected_100k_steps_h']:.1f} |"
    )


def count_kernels(args) -> None:
  """Compiles the step per N for a compile-only GPU (no GPU needed) and prints, per row, the
  kernels one step launches (sleep_jax.parallel.compiled.kernels_per_step), by kind, beside
  the FLOPs and the peak memory; the rows go to --json."""
  os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile-only devices: no backend to start
  from sleep_jax.train import aot

  rows = []
  for passes in args.passes:
    remat = {"config": None, "on": True, "off": False}[args.remat]
    config = build_config(args.setting, passes, remat, args.dtype, args.impl)
    result = aot.compile_for_topology(config, args.count_kernels)
    rows.append(
      {
        "passes": passes,
        "remat": config.sleep.remat,
        "unroll": config.sleep.unroll,
        "dtype": config.model.dtype,
        "impl": config.model.fast_weight_impl,
        "gflop_per_step": result["flops_per_step"] / 1e9,
        **{key: result[key] for key in ("kernels_per_step", "kernels_by_kind", "triton_kernels")},
        "peak_gib": result["peak_memory_bytes_per_device"] / 2**30,
        "spill_bytes": result["spill_bytes"],
        "compile_s": result["compile_s"],
        "device": result["device_kind"],
      }
    )
    print({k: v for k, v in rows[-1].items() if k != "kernels_by_kind"}, file=sys.stderr)
  print(
    f"\nrule110.py:{SETTINGS[args.setting]['variant']} compiled for {args.count_kernels} "
    f"({rows[0]['device']}) on this host, jax {_jax_version()}\n"
  )
  print(
    "| N | dtype | remat | unrolled | kernels / step | fusions | cuBLAS | Triton | copies "
    "| GFLOP / step | peak GiB | compile s |"
  )
  print("|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
  for row in rows:
    kinds = row["kernels_by_kind"]
    fusions = sum(n for kind, n in kinds.items() if kind.startswith("fusion"))
    cublas = sum(n for kind, n in kinds.items() if "cublas" in kind)
    print(
      f"| {row['passes']} | {row['dtype']} | {row['remat']} | {row['unroll']} "
      f"| {row['kernels_per_step']:,} | {fusions:,} | {cublas:,} "
      f"| {kinds.get('__gpu$xla.gpu.triton', 0)} | {kinds.get('copy', 0)} "
      f"| {row['gflop_per_step']:.0f} | {row['peak_gib']:.2f} | {row['compile_s']:.0f} |"
    )
  os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
  with open(args.json, "w") as f:
    json.dump({"topology": args.count_kernels, "jax": _jax_version(), "rows": rows}, f, indent=2)


def _text(data) -> str:
  """A subprocess stream as text (TimeoutExpired carries bytes even under text=True)."""
  if data is None:
    return ""
  return data.decode(errors="replace") if isinstance(data, bytes) else data


def run_worker(args, passes: int, remat: bool, env: dict) -> dict:
  """Measures one (N, remat) in a subprocess; a crash or a timeout becomes an error row."""
  command = [
    sys.executable,
    __file__,
    "--setting",
    args.setting,
    "--steps",
    str(args.steps),
    "--dtype",
    args.dtype,
    "--impl",
    args.impl,
    "--profile",
    str(args.profile),
    "--worker",
    str(passes),
    "config" if remat is None else str(int(remat)),
  ]
  error = {"passes": passes, "remat": remat, "impl": args.impl, "dtype": args.dtype}
  try:
    out = subprocess.run(command, capture_output=True, text=True, env=env, timeout=args.timeout_s)
  except subprocess.TimeoutExpired as e:
    tail = _text(e.stderr).strip().splitlines()[-40:]
    return {**error, "error": f"timeout after {args.timeout_s:g} s", "stderr_tail": tail}
  stderr = out.stderr.strip().splitlines()
  if out.returncode:
    last = stderr[-1] if stderr else f"exit status {out.returncode}"
    return {**error, "error": last, "returncode": out.returncode, "stderr_tail": stderr[-40:]}
  for line in reversed(out.stdout.strip().splitlines()):  # the row is the last JSON line
    if line.startswith("{"):
      try:
        return json.loads(line)
      except json.JSONDecodeError:
        break
  return {**error, "error": "no result line on stdout", "stderr_tail": stderr[-40:]}


def _jax_version() -> str | None:
  try:
    from importlib import metadata

    return metadata.version("jax")
  except Exception:
    return None


def write_json(rows: list[dict], args, env: dict) -> None:
  measured = [r for r in rows if "error" not in r]
  first = measured[0] if measured else {}
  os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
  with open(args.json, "w") as f:
    json.dump(
      {
        "device": first.get("device"),
        "jax": first.get("jax") or _jax_version(),
        "platform": args.platform,
        "backend": first.get("backend"),
        "jax_platforms": env.get("JAX_PLATFORMS"),
        "setting": args.setting,
        "config": f"rule110.py:{SETTINGS[args.setting]['variant']}",
        "overrides": SETTINGS[args.setting]["overrides"],
        "dtype": args.dtype,
        "impl": args.impl,
        "steps": args.steps,
        "xla_flags": args.xla_flags,
        "rows": rows,
      },
      f,
      indent=2,
    )


def main():
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument(
    "--setting",
    choices=sorted(SETTINGS),
    default=None,
    help="default: paper with --platform gpu, sweep otherwise",
  )
  parser.add_argument("--passes", type=int, nargs="+", default=[1, 4])
  parser.add_argument(
    "--remat",
    choices=("config", "on", "off", "both"),
    default="config",
    help="sleep.remat (config: the variant's own; cpu on, paper off)",
  )
  parser.add_argument("--steps", type=int, default=8)
  parser.add_argument(
    "--dtype", choices=("config", *DTYPES), default="config", help="overrides model.dtype"
  )
  parser.add_argument(
    "--impl",
    choices=("config", *FAST_WEIGHT_IMPLS),
    default="config",
    help="overrides model.fast_weight_impl",
  )
  parser.add_argument(
    "--platform",
    choices=sorted(PLATFORMS),
    default="cpu",
    help="JAX_PLATFORMS of the measuring processes: cpu (unless already set), cuda, or as is",
  )
  parser.add_argument(
    "--timeout_s", type=float, default=None, help="per measuring process; then an error row"
  )
  parser.add_argument(
    "--xla_flags", default="", help="appended to XLA_FLAGS in every measuring process"
  )
  parser.add_argument("--json", default=os.path.join(REPO, "bench", "results", "train_step.json"))
  parser.add_argument(
    "--profile",
    type=int,
    default=0,
    help="trace this many more steps and report device time by kernel with launch counts",
  )
  parser.add_argument(
    "--count_kernels",
    metavar="GPU_TOPOLOGY",
    help="instead of timing: compile the step for this compile-only GPU (h100, h200-8, ...) "
    "and print the kernels it launches per step beside its FLOPs and peak memory",
  )
  parser.add_argument("--worker", nargs=2, metavar=("PASSES", "REMAT"), help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.setting is None:
    args.setting = "paper" if args.platform == "gpu" else "sweep"
  if args.worker:
    row = measure(
      args.setting,
      int(args.worker[0]),
      {"1": True, "0": False, "config": None}[args.worker[1]],
      args.steps,
      args.dtype,
      args.impl,
      args.profile,
    )
    print(json.dumps(row))
    return

  env = dict(os.environ)
  env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {args.xla_flags}".strip()
  if args.platform == "cpu":
    env.setdefault("JAX_PLATFORMS", "cpu")
  elif PLATFORMS[args.platform]:
    env["JAX_PLATFORMS"] = PLATFORMS[args.platform]
  if args.count_kernels:
    count_kernels(args)
    return
  rows = []
  remats = {"config": (None,), "on": (True,), "off": (False,), "both": (True, False)}[args.remat]
  for remat in remats:
    for passes in args.passes:
      rows.append(run_worker(args, passes, remat, env))
      shown = {k: v for k, v in rows[-1].items() if k != "stderr_tail"}
      print(shown, file=sys.stderr, flush=True)
      if "stderr_tail" in rows[-1]:
        print("\n".join(rows[-1]["stderr_tail"]), file=sys.stderr, flush=True)
      write_json(rows, args, env)  # so far: a run cut short keeps the rows it has

  print_table(rows, args)  # adds the ratio keys
  for row in rows:
    if row.get("profile"):
      print_profile(row)
  write_json(rows, args, env)


if __name__ == "__main__":
  main()
