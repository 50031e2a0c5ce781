"""Compile a config's train step for a TPU or GPU topology from any host (no accelerator needed).

  python launch/aot.py --config=configs/rule110.py --topology=v5e-8
  python launch/aot.py --config=configs/depo.py --topology=v5e-16 --num_slices=2 --out=aot.json
  python launch/aot.py --config=configs/rule110.py --topology=v5p-32 --config.train.batch_size=1024
  python launch/aot.py --config=configs/rule110.py --topology=v5e-8 --largest_batch
  python launch/aot.py --config=configs/depo.py:paper_fig3 --topology=h100-8 --out=X.json
  python launch/aot.py --config=configs/rule110.py:paper --topology=h200-8 --largest_batch

TPU slices need libtpu (`python -m pip install -e ".[tpu]"`); GPU topologies (h100, h100-8,
h200-8, h100-2x8 = hosts x GPUs, or jax's h100:1x2x4) need the CUDA plugin and ptxas
(`make install-gpu-compile`: the plugin of the installed jax, ~1.2 GB). The train and eval steps are built as training
builds them (same mesh, shardings and kernel dispatch) over the topology's devices and compiled
by XLA:TPU and Mosaic, or XLA:GPU, Triton and ptxas; prints a table (peak memory per device
against the device's, Pallas kernels, kernels launched per GPU step, model FLOPs per step) and
writes it as JSON with --out (GPU rows add ptxas' registers and spills per Triton kernel).
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/ imports
# Compile-only devices need no accelerator backend: keep JAX from starting one (with the CUDA
# plugin installed on a host without a GPU, starting it fails).
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import app, flags
from ml_collections import config_flags

from sleep_jax import console
from sleep_jax.train import aot

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/rule110.py.")
_TOPOLOGY = flags.DEFINE_string(
  "topology",
  None,
  "TPU slice (v5e-16, v5p-32, v4-8, v6e-8, v5e:4x4 ...) or GPUs (h100-8, h200-8, h100-2x8 ...)",
)
_NUM_SLICES = flags.DEFINE_integer(
  "num_slices", 1, "TPU slices joined over the data-center network."
)
_OUT = flags.DEFINE_string("out", None, "Write the results as JSON here.")
_LARGEST_BATCH = flags.DEFINE_bool(
  "largest_batch", False, "Also find the largest power-of-two batch per device that fits."
)
flags.mark_flags_as_required(["config", "topology"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  console.configure(
    verbosity=flags.FLAGS["verbosity"].value if flags.FLAGS["verbosity"].present else None
  )
  try:
    result = aot.compile_for_topology(_CONFIG.value, _TOPOLOGY.value, num_slices=_NUM_SLICES.value)
    if _LARGEST_BATCH.value:
      result["largest_batch"] = aot.largest_fitting_batch(
        _CONFIG.value, _TOPOLOGY.value, num_slices=_NUM_SLICES.value
      )
  except (ValueError, RuntimeError) as e:
    raise app.UsageError(str(e)) from e
  print(aot.format_table([result]))
  if "largest_batch" in result:
    print(f"largest batch per device that fits: {result['largest_batch']}")
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  app.run(main)
