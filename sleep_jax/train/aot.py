"""Ahead-of-time compilation of a run's train step for a TPU topology, from any host.

The train step (and the eval step) are built by `build_program`, exactly as training builds
them, over the devices of a named TPU slice (sleep_jax.parallel.topology), and compiled by the
real XLA:TPU and Mosaic compilers on this host. This catches sharding and Mosaic errors and
tells whether a config fits a chip's memory, before any TPU time is spent. XLA's cost analysis
cannot see inside Pallas calls, so FLOPs come from the model count (sleep_jax.model.flops).
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

from sleep_jax.model.flops import train_step_flops
from sleep_jax.parallel import topology as topology_lib
from sleep_jax.train.program import build_program

logger = logging.getLogger(__name__)

MOSAIC_CALL = re.compile(r'custom_call_target="tpu_custom_call"')
# XLA:TPU's refusal of a program larger than HBM, in the wordings of libtpu releases: "Ran out
# of memory on HBM, the total memory required for HLO temporaries (59.04G) exceeds available HBM
# (15.75G)." (libtpu 0.0.42) and "Ran out of memory in memory space hbm. Used 63.80G of 30.75G
# hbm." (older).
OUT_OF_HBM = re.compile(
  r"required for HLO temporaries \(([\d.]+)([KMGT]?)\) exceeds available HBM \(([\d.]+)([KMGT]?)\)"
  r"|Used ([\d.]+)([KMGT]?) of ([\d.]+)([KMGT]?) hbm"
)
UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def out_of_hbm(error: Exception) -> tuple[int, int] | None:
  """(bytes the program needs, bytes the chip has) from XLA:TPU's out-of-memory error, or
  None for any other error."""
  match = OUT_OF_HBM.search(str(error))
  if "RESOURCE_EXHAUSTED" not in str(error) or match is None:
    return None
  # The matching wording's four groups (the other's are None; an empty unit is bytes).
  used, used_unit, hbm, hbm_unit = (g for g in match.groups() if g is not None)
  return int(float(used) * UNITS[used_unit]), int(float(hbm) * UNITS[hbm_unit])


def _peak_bytes(compiled) -> int:
  """Per-device bytes live at the peak: arguments + outputs (minus donated aliases) + temps."""
  memory = compiled.memory_analysis()
  return int(
    memory.argument_size_in_bytes
    + memory.output_size_in_bytes
    - memory.alias_size_in_bytes
    + memory.temp_size_in_bytes
  )


def compile_for_topology(config, topology: str, *, num_slices: int = 1) -> dict[str, Any]:
  """Compiles `config`'s train and eval steps for `num_slices` slices of `topology`.

  Args:
    config: a run's ConfigDict (as launch/main.py takes it).
    topology: a Cloud TPU name (`v5e-16`, `v5p-32`, `v4-8`, `v6e-8`) or jax's (`v5e:4x4`).
    num_slices: slices joined over the data-center network (the data axis spans them).

  Returns:
    A JSON-ready dict: topology, num_slices, num_devices, num_processes, device_kind, mesh,
    batch_size, mosaic_kernels (Mosaic calls in the compiled train step), peak and HBM bytes
    per device, fits, flops_per_step (model count, forward + backward), compile_s, and the
    eval step's mosaic_kernels and peak bytes. When XLA:TPU refuses the train step for want
    of memory, fits is False, the peak is the size it reported, `error` its message, and the
    Mosaic counts and the eval step's figures are None.
  """
  resolved = topology_lib.resolve(topology)
  devices = topology_lib.tpu_devices(topology, num_slices=num_slices)
  program = build_program(config, devices)
  batch = program.abstract_batch(config.train.batch_size)
  start = time.perf_counter()
  validated = program.validated
  row = {
    "topology": topology,
    "jax_topology": resolved.jax_name,
    "num_slices": num_slices,
    "num_devices": len(devices),
    "num_processes": len({d.process_index for d in devices}),
    "device_kind": devices[0].device_kind,
    "mesh": dict(program.mesh.shape),
    "batch_size": config.train.batch_size,
    "fast_weight_impl": validated.model.fast_weight_impl,
    "flops_per_step": train_step_flops(
      validated.model,
      validated.sleep,
      seq_len=validated.task.seq_len,
      batch_size=config.train.batch_size,
    ),
  }
  try:
    train = program.train_step.lower(program.abstract_state, batch).compile()
  except Exception as e:  # XLA's errors have no Python class of their own to catch
    needed = out_of_hbm(e)
    if needed is None:
      raise
    # XLA:TPU refuses a program that cannot fit: a "does not fit" row, not an error.
    return row | {
      "mosaic_kernels": None,
      "peak_memory_bytes_per_device": needed[0],
      "hbm_bytes_per_device": needed[1],
      "fits": False,
      "compile_s": round(time.perf_counter() - start, 2),
      "error": str(e).splitlines()[0],
      "eval_mosaic_kernels": None,
      "eval_peak_memory_bytes_per_device": None,
    }
  compile_s = time.perf_counter() - start
  evaluate = program.eval_step.lower(
    program.abstract_state.params, program.abstract_batch(config.eval.batch_size)
  ).compile()
  hbm = topology_lib.hbm_bytes_per_device(devices[0])
  peak = _peak_bytes(train)
  return row | {
    "mosaic_kernels": len(MOSAIC_CALL.findall(train.as_text())),
    "peak_memory_bytes_per_device": peak,
    "hbm_bytes_per_device": hbm,
    "fits": peak <= hbm,
    "compile_s": round(compile_s, 2),
    "eval_mosaic_kernels": len(MOSAIC_CALL.findall(evaluate.as_text())),
    "eval_peak_memory_bytes_per_device": _peak_bytes(evaluate),
  }


def largest_fitting_batch(
  config,
  topology: str,
  *,
  num_slices: int = 1,
  start_per_device: int | None = None,
  limit_per_device: int = 8192,
) -> dict:
  """The largest batch per device whose train step fits HBM, doubling from `start_per_device`
  (default: the config's own batch per device).

  Returns:
    {"per_device_batch": b, "batch_size": global batch, "peak_memory_bytes_per_device": ...}
    for the largest fitting b, or per_device_batch 0 when even `start_per_device` does not fit.
  """
  num_devices = len(topology_lib.tpu_devices(topology, num_slices=num_slices))
  best = {"per_device_batch": 0, "batch_size": 0, "peak_memory_bytes_per_device": None}
  per_device = start_per_device or max(config.train.batch_size // num_devices, 1)
  while per_device <= limit_per_device:
    trial = config.copy_and_resolve_references()
    with trial.unlocked():
      trial.train.batch_size = per_device * num_devices
    result = compile_for_topology(trial, topology, num_slices=num_slices)
    logger.info(
      "batch %d per device: peak %.2f GiB of %.2f GiB",
      per_device,
      result["peak_memory_bytes_per_device"] / 2**30,
      result["hbm_bytes_per_device"] / 2**30,
    )
    if not result["fits"]:
      break
    best = {
      "per_device_batch": per_device,
      "batch_size": result["batch_size"],
      "peak_memory_bytes_per_device": result["peak_memory_bytes_per_device"],
    }
    per_device *= 2
  return best


def format_table(rows: list[dict]) -> str:
  """A markdown table of `compile_for_topology` results."""
  gib = lambda b: f"{b / 2**30:.2f}"
  lines = [
    "| config | topology | devices | hosts | mesh (data, fsdp, tensor) | batch | Mosaic "
    "kernels | peak GiB / device | HBM GiB | fits | TFLOP / step | compile s |",
    "|---|---|---:|---:|---|---:|---:|---:|---:|---|---:|---:|",
  ]
  for row in rows:
    mesh = "x".join(str(row["mesh"][a]) for a in ("data", "fsdp", "tensor"))
    slices = f" x {row['num_slices']} slices" if row["num_slices"] > 1 else ""
    lines.append(
      f"| {row.get('config', '')} | {row['topology']}{slices} | {row['num_devices']} | "
      f"{row['num_processes']} | {mesh} | {row['batch_size']} | "
      f"{'-' if row['mosaic_kernels'] is None else row['mosaic_kernels']} | "
      f"{gib(row['peak_memory_bytes_per_device'])} | {gib(row['hbm_bytes_per_device'])} | "
      f"{'yes' if row['fits'] else 'NO'} | {row['flops_per_step'] / 1e12:.2f} | "
      f"{row['compile_s']:.1f} |"
    )
  return "\n".join(lines)
