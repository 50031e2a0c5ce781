"""The README's TPU and GPU tables: paper configs compiled for TPU slices or H100s from this host.

  python bench/aot_table.py [--out docs/results/aot/aot.json] [--largest_batch]
  python bench/aot_table.py --platform gpu --out docs/results/aot/gpu.json [--largest_batch]

Compiles the paper Rule 110 and Depo train steps (launch/aot.py's code path) for a v5e-8, a
v5p-32 and two v5e-16 slices (needs libtpu), or for one H100 and one host of eight (needs the
CUDA plugin and ptxas: make install-gpu-compile); prints a markdown table (peak memory per device
against the device's, Pallas kernels, kernels per GPU step, model FLOPs per step) and writes the
rows as JSON. With --largest_batch it also searches the largest power-of-two batch per device
that fits (a v5e chip, an H100), per config.
"""

import argparse
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
# Compile-only devices: no backend to start. Before jax loads its plugins: on a host without a
# GPU the CUDA plugin registers (and offers its topologies) only when JAX_PLATFORMS leaves CUDA out.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from sleep_jax import console  # noqa: E402
from sleep_jax.experiments import config_files  # noqa: E402
from sleep_jax.train import aot  # noqa: E402

CONFIGS = ("configs/rule110.py:paper", "configs/depo.py:paper_fig3")
# Per platform: the (topology, slices) rows, and the topology of the largest-batch search.
TOPOLOGIES = {
  "tpu": ((("v5e-8", 1), ("v5p-32", 1), ("v5e-16", 2)), "v5e-8"),
  "gpu": ((("h100", 1), ("h100-8", 1)), "h100"),
}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=os.path.join(REPO, "bench", "results", "aot.json"))
  parser.add_argument("--largest_batch", action="store_true")
  parser.add_argument("--configs", nargs="+", default=CONFIGS)
  parser.add_argument("--no_slices", action="store_true", help="only the largest-batch search")
  parser.add_argument("--platform", choices=sorted(TOPOLOGIES), default="tpu")
  args = parser.parse_args()
  slices, search_topology = TOPOLOGIES[args.platform]
  console.configure()  # the largest-batch search logs each trial
  rows, largest = [], {}
  for spec in args.configs:
    for topology, num_slices in [] if args.no_slices else slices:
      row = aot.compile_for_topology(
        config_files.load_config(spec), topology, num_slices=num_slices
      )
      rows.append({"config": spec.replace("configs/", ""), **row})
      print(aot.format_table(rows[-1:]).splitlines()[-1], flush=True)
    if args.largest_batch:
      largest[spec] = aot.largest_fitting_batch(config_files.load_config(spec), search_topology)
  print()
  if rows:
    print(aot.format_table(rows))
  for spec, best in largest.items():
    print(
      f"{spec}: largest batch per {search_topology} device that fits (power of two) = "
      f"{best['per_device_batch']} (peak {best['peak_memory_bytes_per_device'] / 2**30:.2f} GiB)"
    )
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    key = {"tpu": "largest_batch_per_v5e_chip", "gpu": "largest_batch_per_h100"}[args.platform]
    json.dump({"rows": rows, key: largest}, f, indent=2)


if __name__ == "__main__":
  main()
