"""Times every gated delta rule implementation available here: forward, forward+backward, memory.

    python bench/gated_delta.py                       # the platform's default shape, all impls
    python bench/gated_delta.py --shape cpu           # B=2  T=2048  H=4  K=V=64  float32
    python bench/gated_delta.py --shape long          # B=2  T=16384 H=4  K=V=64  float32
    python bench/gated_delta.py --shape gpu           # B=8  T=4096  H=16 K=V=128 bfloat16
    python bench/gated_delta.py --shape model         # B=512 T=24  H=4  K=V=64  float32
    python bench/gated_delta.py --impls chunked,chunked_autodiff --repeats 10

Implementations: "reference" (per-token scan), "chunked" (WY form, lean custom VJP),
"chunked_autodiff" (same forward, plain autodiff), "pallas" (fused kernels; on a CPU only when
asked for, since they are interpreted there), "pallas_staged" (GPU: XLA stages around a Triton
state walk; "pallas_staged_highest" with float32 matmuls for bf16 inputs too), and "fla" (flash-linear-attention's Triton
`chunk_gated_delta_rule`, when torch and fla-core are importable and a CUDA GPU is present).

For each: median milliseconds of forward and of forward+backward (gradients of all six inputs
of a scalar loss) over --repeats calls after one warm-up, tokens/s, peak memory of the
forward+backward call (all of it: arguments, outputs and temporaries) and its working memory
(temporaries only: what the op needs beyond its inputs and gradients), and the largest error of outputs and gradients against a baseline
implementation measured in the same run ("chunked", else "reference"). JAX memory is XLA's
compiled estimate; fla's peak is torch's max_memory_allocated. Prints a markdown table plus the ratios the kernel issue's targets are
about, and writes everything as JSON (bench/results/gated_delta_<shape>.json by default).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(BENCH_DIR))  # runnable as a plain script from anywhere
from sleep_jax.ops import gated_delta_rule  # noqa: E402
from sleep_jax.ops.gated_delta.chunked import gated_delta_rule_chunked_autodiff  # noqa: E402
from sleep_jax.ops.gated_delta.pallas_gpu_staged import (  # noqa: E402
  gated_delta_rule_pallas_gpu_staged,
)

SHAPES = {
  "cpu": dict(batch=2, tokens=2048, heads=4, key_dim=64, value_dim=64, dtype="float32"),
  "long": dict(batch=2, tokens=16384, heads=4, key_dim=64, value_dim=64, dtype="float32"),
  "gpu": dict(batch=8, tokens=4096, heads=16, key_dim=128, value_dim=128, dtype="bfloat16"),
  # One call in the paper's Rule 110 model: a 24-token window of the batch of 512, 4 heads of 64.
  "model": dict(batch=512, tokens=24, heads=4, key_dim=64, value_dim=64, dtype="float32"),
}
JAX_IMPLS = {
  "reference": lambda **kw: gated_delta_rule(**kw, impl="reference"),
  "chunked": lambda **kw: gated_delta_rule(**kw, impl="chunked"),
  "chunked_autodiff": gated_delta_rule_chunked_autodiff,
  "pallas": lambda **kw: gated_delta_rule(**kw, impl="pallas"),
  "pallas_staged": lambda **kw: gated_delta_rule(**kw, impl="pallas_staged"),
  # The staged kernels with float32 matmuls whatever the inputs' dtype (bf16 inputs otherwise
  # get TF32): what the precision choice costs.
  "pallas_staged_highest": lambda **kw: gated_delta_rule_pallas_gpu_staged(
    **kw, precision=jax.lax.Precision.HIGHEST, interpret=jax.default_backend() != "gpu"
  ),
}


def default_impls(shape_name):
  on_accelerator = jax.default_backend() in ("gpu", "tpu")
  if shape_name == "long":  # the memory comparison; the per-token scan would take minutes
    return ["chunked", "chunked_autodiff"] + (["pallas"] if on_accelerator else [])
  if jax.default_backend() == "gpu":
    return (
      ["pallas_staged", "pallas"]
      + (["fla"] if fla_available() else [])
      + [
        "chunked",
        "pallas_staged_highest",
        "reference",
      ]
    )
  impls = ["reference", "chunked", "chunked_autodiff"]
  if on_accelerator:
    impls.append("pallas")
  return impls


def fla_available():
  try:
    import fla.ops.gated_delta_rule  # noqa: F401
    import torch
  except ImportError:
    return False
  return torch.cuda.is_available()


def make_inputs(batch, tokens, heads, key_dim, value_dim, dtype, seed=0):
  """Layer-like inputs: unit-norm q and k, g <= 0, beta in (0, 1), a random initial state."""
  keys = jax.random.split(jax.random.key(seed), 6)
  unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  return {
    "q": unit(jax.random.normal(keys[0], (batch, tokens, heads, key_dim))).astype(dtype),
    "k": unit(jax.random.normal(keys[1], (batch, tokens, heads, key_dim))).astype(dtype),
    "v": jax.random.normal(keys[2], (batch, tokens, heads, value_dim)).astype(dtype),
    "g": -jax.random.uniform(keys[3], (batch, tokens, heads), minval=0.01, maxval=0.5),
    "beta": jax.random.uniform(keys[4], (batch, tokens, heads), minval=0.05, maxval=0.95),
    "initial_state": 0.1 * jax.random.normal(keys[5], (batch, heads, key_dim, value_dim)),
  }


def _loss(out, state):
  return jnp.mean(out.astype(jnp.float32) ** 2) + jnp.mean(state**2)


def median_ms(call, repeats):
  """Median wall time in ms; the first call (compile + warm-up) is not counted."""
  call()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    call()
    times.append((time.perf_counter() - start) * 1e3)
  return statistics.median(times)


def measure_jax(rule, inputs, repeats):
  forward = jax.jit(lambda x: rule(**x))
  forward_backward = jax.jit(jax.value_and_grad(lambda x: _loss(*rule(**x))))
  memory = forward_backward.lower(inputs).compile().memory_analysis()
  if memory is None:  # not every backend reports it
    peak_bytes = temp_bytes = float("nan")
  else:
    temp_bytes = memory.temp_size_in_bytes
    peak_bytes = memory.argument_size_in_bytes + memory.output_size_in_bytes + temp_bytes
  out = forward(inputs)[0]
  row = {
    "fwd_ms": median_ms(lambda: jax.block_until_ready(forward(inputs)), repeats),
    "peak_mb": peak_bytes / 2**20,
    "working_mb": temp_bytes / 2**20,
  }
  grads = None
  try:  # e.g. the per-token scan's backward at the GPU shape can run out of device memory
    _, grads = forward_backward(inputs)
    grads = {k: np.asarray(v, np.float32) for k, v in grads.items()}
    row["fwd_bwd_ms"] = median_ms(lambda: jax.block_until_ready(forward_backward(inputs)), repeats)
  except Exception as error:
    row["fwd_bwd_error"] = f"{type(error).__name__}: {str(error)[:200]}"
  return row, np.asarray(out, np.float32), grads


def measure_fla(inputs, repeats):
  """fla's chunk_gated_delta_rule on the same inputs (same layout and semantics)."""
  import torch
  from fla.ops.gated_delta_rule import chunk_gated_delta_rule

  dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[str(inputs["q"].dtype)]
  to_torch = lambda x, dt: torch.tensor(np.asarray(x, np.float32), device="cuda", dtype=dt)
  tensors = {
    k: to_torch(v, dtype if k in ("q", "k", "v") else torch.float32) for k, v in inputs.items()
  }

  def forward(requires_grad=False):
    leaves = {k: t.detach().requires_grad_(requires_grad) for k, t in tensors.items()}
    out, state = chunk_gated_delta_rule(
      leaves["q"],
      leaves["k"],
      leaves["v"],
      leaves["g"],
      leaves["beta"],
      initial_state=leaves["initial_state"],
      output_final_state=True,
    )
    return leaves, out, state

  def forward_backward():
    leaves, out, state = forward(requires_grad=True)
    loss = out.float().pow(2).mean() + state.pow(2).mean()
    loss.backward()
    return leaves

  def timed(fn):
    def call():
      fn()
      torch.cuda.synchronize()

    return median_ms(call, repeats)

  with torch.no_grad():
    _, out, _ = forward()
  row = {"fwd_ms": timed(lambda: forward())}
  grads = None
  try:
    torch.cuda.reset_peak_memory_stats()
    leaves = forward_backward()
    row["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    grads = {k: t.grad.float().cpu().numpy() for k, t in leaves.items()}
    row["fwd_bwd_ms"] = timed(forward_backward)
  except Exception as error:  # fla's backward fails on some GPU/Triton combinations
    row["fwd_bwd_error"] = f"{type(error).__name__}: {str(error)[:200]}"
  return row, out.float().cpu().numpy(), grads


def max_relative_error(got, want):
  return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "--shape", choices=sorted(SHAPES), default=None, help="default: gpu on a GPU, cpu otherwise"
  )
  parser.add_argument("--impls", default=None, help="comma-separated; default: all available")
  parser.add_argument("--repeats", type=int, default=5, help="timed calls per measurement")
  parser.add_argument(
    "--json", default=None, help="default: bench/results/gated_delta_<shape>.json"
  )
  args = parser.parse_args(argv)

  shape_name = args.shape or ("gpu" if jax.default_backend() == "gpu" else "cpu")
  shape = SHAPES[shape_name]
  impls = args.impls.split(",") if args.impls else default_impls(shape_name)
  unknown = sorted(set(impls) - set(JAX_IMPLS) - {"fla"})
  if unknown:
    parser.error(f"unknown impls {unknown}; known: {sorted(JAX_IMPLS) + ['fla']}")
  inputs = make_inputs(**shape)
  tokens_per_call = shape["batch"] * shape["tokens"]

  path = args.json or os.path.join(BENCH_DIR, "results", f"gated_delta_{shape_name}.json")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

  def write(rows, **more):
    with open(path, "w") as f:
      json.dump(
        {
          "shape_name": shape_name,
          "shape": shape,
          "backend": jax.default_backend(),
          "device": jax.devices()[0].device_kind,
          "jax": jax.__version__,
          "repeats": args.repeats,
          "results": rows,
          **more,
        },
        f,
        indent=2,
      )

  rows, outputs, grads = {}, {}, {}
  for impl in impls:
    print(f"measuring {impl} ...", file=sys.stderr, flush=True)
    try:
      if impl == "fla":
        rows[impl], outputs[impl], grads[impl] = measure_fla(inputs, args.repeats)
      else:
        measured = measure_jax(JAX_IMPLS[impl], inputs, args.repeats)
        rows[impl], outputs[impl], grads[impl] = measured
    except Exception as error:  # one implementation failing must not lose the others' numbers
      print(f"{impl} failed: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
      rows[impl] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
    write(rows, partial=True)  # a run stopped from outside keeps the rows it measured
  measured = [impl for impl in impls if "error" not in rows[impl]]
  outputs = {impl: outputs[impl] for impl in measured}
  baseline = "chunked" if "chunked" in measured else (measured or impls)[0]
  for impl, row in rows.items():
    if impl not in measured or baseline not in measured:
      continue
    row["fwd_tokens_per_s"] = tokens_per_call / (row["fwd_ms"] / 1e3)
    if "fwd_bwd_ms" in row:
      row["fwd_bwd_tokens_per_s"] = tokens_per_call / (row["fwd_bwd_ms"] / 1e3)
    row["out_rel_err"] = max_relative_error(outputs[impl], outputs[baseline])
    if grads[impl] is not None and grads[baseline] is not None:
      row["grad_rel_err"] = max(
        max_relative_error(grads[impl][k], grads[baseline][k]) for k in grads[baseline]
      )

  ratios = {}
  pairs = [
    ("pallas", "fla", "fwd_ms"),
    ("pallas", "fla", "fwd_bwd_ms"),
    ("pallas_staged", "fla", "fwd_ms"),
    ("pallas_staged", "fla", "fwd_bwd_ms"),
    ("pallas_staged", "pallas", "fwd_ms"),
    ("pallas_staged", "pallas", "fwd_bwd_ms"),
    ("pallas_staged", "pallas_staged_highest", "fwd_bwd_ms"),
    ("chunked", "chunked_autodiff", "fwd_bwd_ms"),
    ("chunked", "chunked_autodiff", "peak_mb"),
    ("chunked", "chunked_autodiff", "working_mb"),
    ("chunked", "reference", "fwd_bwd_ms"),
    ("pallas", "chunked", "fwd_bwd_ms"),
  ]
  for a, b, key in pairs:
    if key in rows.get(a, {}) and key in rows.get(b, {}):
      ratios[f"{a}/{b} {key}"] = rows[a][key] / rows[b][key]

  print(
    f"\ngated_delta_rule {shape_name}: {shape}, backend={jax.default_backend()} "
    f"({jax.devices()[0].device_kind}), median of {args.repeats}\n"
  )
  print(
    f"| impl | fwd ms | fwd+bwd ms | fwd tok/s | fwd+bwd tok/s | peak MB (fwd+bwd) | "
    f"working MB | out err vs {baseline} | grad err vs {baseline} |"
  )
  print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
  fmt = lambda row, key, spec: format(row[key], spec) if key in row else "-"
  for impl, row in rows.items():
    print(
      f"| {impl} | {fmt(row, 'fwd_ms', '.2f')} | "
      f"{fmt(row, 'fwd_bwd_ms', '.2f') if 'fwd_bwd_error' not in row else 'failed'} | "
      f"{fmt(row, 'fwd_tokens_per_s', ',.0f')} | {fmt(row, 'fwd_bwd_tokens_per_s', ',.0f')} | "
      f"{fmt(row, 'peak_mb', ',.0f')} | {fmt(row, 'working_mb', ',.0f')} | "
      f"{fmt(row, 'out_rel_err', '.1e')} | "
      f"{fmt(row, 'grad_rel_err', '.1e')} |"
    )
  for impl, row in rows.items():
    for key in ("error", "fwd_bwd_error"):
      if key in row:
        print(f"\n{impl} {key}: {row[key]}")
  print()
  for name, value in ratios.items():
    print(f"{name}: {value:.2f}")

  write(rows, baseline=baseline, ratios=ratios)
  print(f"\nwrote {path}")


if __name__ == "__main__":
  main()
