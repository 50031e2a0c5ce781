"""Times the gated delta rule: per-token `reference` vs `chunked`, forward and forward+backward.

    python bench/gated_delta.py [--json bench/results/gated_delta.json] [--repeats 5]

Shapes: B=2, T=2048, H=4, K=V=64, float32, on whatever backend JAX picks (the CPU on dev hosts).
Prints a markdown table (median ms over the repeats, compile and warm-up excluded) and the
chunked/reference speedups, and writes the same numbers as JSON. The issue's target is a
forward+backward speedup of at least 4x for `chunked`.
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

IMPLS = ("reference", "chunked")
BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
DEFAULT_JSON = os.path.join(BENCH_DIR, "results", "gated_delta.json")

# Runnable as a plain script from anywhere: put the repository root on the path.
sys.path.insert(0, os.path.dirname(BENCH_DIR))
from sleep_jax.ops import gated_delta_rule  # noqa: E402


def make_inputs(batch, tokens, heads, key_dim, value_dim, seed=0):
    """Layer-like inputs: unit-norm q and k, g <= 0, beta in (0, 1), a random initial state."""
    keys = jax.random.split(jax.random.key(seed), 6)

    def unit(x):
        return x / jnp.linalg.norm(x, axis=-1, keepdims=True)

    return {
        "q": unit(jax.random.normal(keys[0], (batch, tokens, heads, key_dim))),
        "k": unit(jax.random.normal(keys[1], (batch, tokens, heads, key_dim))),
        "v": jax.random.normal(keys[2], (batch, tokens, heads, value_dim)),
        "g": -jax.random.uniform(keys[3], (batch, tokens, heads), minval=0.01, maxval=0.5),
        "beta": jax.random.uniform(keys[4], (batch, tokens, heads), minval=0.05, maxval=0.95),
        "initial_state": 0.1 * jax.random.normal(keys[5], (batch, heads, key_dim, value_dim)),
    }


def make_functions(impl):
    """Jitted forward and value_and_grad (w.r.t. all six inputs) of a scalar loss."""

    def forward(inputs):
        return gated_delta_rule(**inputs, impl=impl)

    def loss(inputs):
        out, state = forward(inputs)
        return jnp.mean(out**2) + jnp.mean(state**2)

    return jax.jit(forward), jax.jit(jax.value_and_grad(loss))


def median_ms(fn, inputs, repeats):
    """Median wall time in ms; the first call (compile + warm-up) is not counted."""
    jax.block_until_ready(fn(inputs))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(inputs))
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=DEFAULT_JSON, help="where to write the results")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per measurement")
    args = parser.parse_args(argv)

    shape = {"batch": 2, "tokens": 2048, "heads": 4, "key_dim": 64, "value_dim": 64}
    inputs = make_inputs(**shape)
    tokens_per_call = shape["batch"] * shape["tokens"]
    rows, outputs = {}, {}
    for impl in IMPLS:
        forward, forward_backward = make_functions(impl)
        outputs[impl] = np.asarray(forward(inputs)[0])
        rows[impl] = {
            "fwd_ms": median_ms(forward, inputs, args.repeats),
            "fwd_bwd_ms": median_ms(forward_backward, inputs, args.repeats),
        }
        rows[impl]["tokens_per_s"] = tokens_per_call / (rows[impl]["fwd_bwd_ms"] / 1e3)
        rows[impl]["max_abs_err_vs_reference"] = float(
            np.abs(outputs[impl] - outputs["reference"]).max()
        )

    speedup = {
        key: rows["reference"][key] / rows["chunked"][key] for key in ("fwd_ms", "fwd_bwd_ms")
    }
    print(f"gated_delta_rule, {shape}, float32, backend={jax.default_backend()}, "
          f"median of {args.repeats}\n")
    print("| impl | fwd ms | fwd+bwd ms | tokens/s (fwd+bwd) | max abs err vs reference |")
    print("|---|---:|---:|---:|---:|")
    for impl, row in rows.items():
        print(f"| {impl} | {row['fwd_ms']:.1f} | {row['fwd_bwd_ms']:.1f} | "
              f"{row['tokens_per_s']:,.0f} | {row['max_abs_err_vs_reference']:.2e} |")
    print(f"\nchunked speedup: forward {speedup['fwd_ms']:.1f}x, "
          f"forward+backward {speedup['fwd_bwd_ms']:.1f}x (target >= 4x)")

    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"shape": shape, "dtype": "float32", "backend": jax.default_backend(),
                   "repeats": args.repeats, "results": rows, "speedup": speedup}, f, indent=2)


if __name__ == "__main__":
    main()
