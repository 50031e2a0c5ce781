"""ptxas' report of every GPU kernel, compiled for an H100 (or H200) on this host: no GPU needed.

  python bench/gpu_kernels.py [--gpu h100] [--json bench/results/gpu_kernels.json]
  python bench/gpu_kernels.py --only attention     # the cases whose op name contains this

Compiles each kernel's forward and backward in one program (the gradient of a loss over its
outputs, from an initial state) through XLA:GPU, Pallas' Triton lowering, Triton and ptxas for
sm_90a, and prints one row per Triton kernel: registers a thread, spill bytes (stores / loads),
shared memory per block against Hopper's opt-in limit, and the program's peak memory. The cases:
the gated delta rule's `pallas` and `pallas_staged` at K = V = 64 and 128 in float32 and
bfloat16 (B=2, T=1024, H=4: 16 chunks), the one-chunk kernels at the Rule 110 paper's sleep pass
(B=512, T=24, H=4, K=V=64), and causal attention over that window. Needs the CUDA plugin of the
installed jax and ptxas (`make install-gpu-compile`). The tests in tests/gpu_compile hold every
row to zero spills; this prints the margins.
"""

import argparse
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
# Compile-only devices: no backend to start (see bench/aot_table.py).
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from sleep_jax.ops import causal_attention, gated_delta_rule  # noqa: E402
from sleep_jax.parallel import compiled, gpu_topology  # noqa: E402
from sleep_jax.train import aot  # noqa: E402

SHARED_MEMORY_LIMIT = 232_448  # Hopper's opt-in bytes per block (the target configs say so)


def gated_delta_case(impl, dtype, batch, tokens, heads, width):
  def loss(q, k, v, g, beta, state):
    out, final = gated_delta_rule(q, k, v, g, beta, initial_state=state, impl=impl)
    return out.astype(jnp.float32).sum() + final.sum()

  shapes = [(batch, tokens, heads, width)] * 3 + [(batch, tokens, heads)] * 2
  dtypes = [dtype] * 3 + [jnp.float32] * 3
  return loss, shapes + [(batch, heads, width, width)], dtypes, range(6)


def attention_case(dtype, batch, tokens, heads, width):
  def loss(q, k, v):
    return causal_attention(q, k, v, impl="pallas").astype(jnp.float32).sum()

  return loss, [(batch, tokens, heads, width)] * 3, [dtype] * 3, range(3)


def cases():
  for impl in ("pallas", "pallas_staged"):
    for dtype in (jnp.float32, jnp.bfloat16):
      for width in (64, 128):
        yield impl, dtype, width, gated_delta_case(impl, dtype, 2, 1024, 4, width)
  for dtype in (jnp.float32, jnp.bfloat16):
    yield "pallas (one chunk)", dtype, 64, gated_delta_case("pallas", dtype, 512, 24, 4, 64)
    yield "attention", dtype, 64, attention_case(dtype, 512, 24, 4, 64)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--gpu", default="h100", help="a one-GPU topology: h100 or h200")
  parser.add_argument("--json", default=os.path.join(REPO, "bench", "results", "gpu_kernels.json"))
  parser.add_argument(
    "--only", default="", help="only the cases whose op name contains this (e.g. pallas_staged)"
  )
  args = parser.parse_args()
  selected = [case for case in cases() if args.only in case[0]]
  if not selected:
    ops = sorted({case[0] for case in cases()})
    sys.exit(f"--only={args.only!r} matches no case; the ops are: {', '.join(ops)}")
  missing = gpu_topology.missing_toolchain()
  if missing:
    sys.exit(missing)
  devices = gpu_topology.gpu_devices(args.gpu)
  sharding = jax.sharding.SingleDeviceSharding(devices[0])
  rows = []
  print(f"{args.gpu} ({devices[0].device_kind}), jax {jax.__version__}, ptxas for sm_90a\n")
  print("| op | dtype | K=V | kernel | registers | spill bytes (st / ld) | shared KB | peak MiB |")
  print("|---|---|---:|---|---:|---|---:|---:|")
  for op, dtype, width, (loss, shapes, dtypes, argnums) in selected:
    specs = [jax.ShapeDtypeStruct(s, d, sharding=sharding) for s, d in zip(shapes, dtypes)]
    step = jax.jit(jax.value_and_grad(loss, argnums=tuple(argnums)))
    executable, report = aot.compile_with_triton_report(step, *specs, devices=devices)
    peak = compiled.peak_bytes(executable)
    for name, row in sorted(report.items()):
      rows.append(
        dict(op=op, dtype=jnp.dtype(dtype).name, width=width, kernel=name, peak_bytes=peak, **row)
      )
      print(
        f"| {op} | {jnp.dtype(dtype).name} | {width} | {name} | {row['registers']} "
        f"| {row['spill_store_bytes']} / {row['spill_load_bytes']} "
        f"| {row['shared_memory_bytes'] / 1024:.1f} | {peak / 2**20:.0f} |",
        flush=True,
      )
  os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
  with open(args.json, "w") as f:
    meta = dict(gpu=args.gpu, device=devices[0].device_kind, jax=jax.__version__)
    json.dump(dict(meta, shared_memory_limit=SHARED_MEMORY_LIMIT, rows=rows), f, indent=1)
  spills = sum(r["spill_store_bytes"] + r["spill_load_bytes"] for r in rows)
  print(f"\n{len(rows)} kernels, {spills} spill bytes in all; JSON: {args.json}")


if __name__ == "__main__":
  main()
