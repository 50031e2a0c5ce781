"""Ahead-of-time compilation of a run's train step for a TPU or GPU topology, from any host.

The train step (and the eval step) are built by `build_program`, exactly as training builds
them, over the devices of a named TPU slice (sleep_jax.parallel.topology) or GPU job
(sleep_jax.parallel.gpu_topology), and compiled by the real XLA:TPU and Mosaic, or XLA:GPU,
Triton and ptxas compilers on this host. This catches sharding, Pallas and shared-memory
errors and tells whether a config fits a device's memory, before any accelerator time is
spent. XLA's cost analysis cannot see inside Pallas calls (and returns nothing for GPUs), so
FLOPs come from the model count (sleep_jax.sleep.flops).

A GPU row also counts the kernels one step launches (`compiled.kernels_per_step`) and reports
ptxas' registers and spills for every Triton kernel. XLA:GPU does not refuse a program larger
than the GPU: `fits` compares the peak with the GPU's memory here.
"""

from __future__ import annotations

import contextlib
import logging
import re
import tempfile
import time
from typing import Any

import jax

from sleep_jax.parallel import compiled as compiled_lib
from sleep_jax.parallel import gpu_topology
from sleep_jax.parallel import topology as topology_lib
from sleep_jax.sleep.flops import train_step_flops
from sleep_jax.train.program import build_program

logger = logging.getLogger(__name__)

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


def topology_devices(topology: str, *, num_slices: int = 1) -> list:
  """The compile-only devices of a TPU slice (times `num_slices`) or a GPU job.

  Raises:
    ValueError: an unknown topology (naming the TPU and GPU forms), or num_slices with a GPU.
    RuntimeError: the compiler for that platform is not installed (naming the package).
  """
  if gpu_topology.is_gpu_topology(topology):
    if num_slices != 1:
      raise ValueError(
        f"num_slices={num_slices} is for TPU slices; a GPU topology names its hosts itself "
        "(h100-2x8: 2 hosts of 8 GPUs)"
      )
    return gpu_topology.gpu_devices(topology)
  try:
    topology_lib.resolve(topology)
  except ValueError as e:
    raise ValueError(f"{e}. {gpu_topology.ACCEPTED}") from e
  return topology_lib.tpu_devices(topology, num_slices=num_slices)


def _is_gpu(devices) -> bool:
  return devices[0].platform == "gpu"


def compile_lowerable(jitted, *args, devices, dump_to: str | None = None):
  """`jitted.lower(*args).compile()` for `devices`' platform.

  GPU compiles lower with a compile-only device as the default (Pallas' Triton lowering asks
  the default device which GPU it targets) and take `gpu_topology.compiler_options()`;
  `dump_to` writes XLA's dumps there (PTX, thunk sequence: `compiled.ptxas_report`).
  """
  options = {}
  context = contextlib.nullcontext()
  if _is_gpu(devices):
    options = gpu_topology.compiler_options()
    context = jax.default_device(devices[0])
  if dump_to:
    options["xla_dump_to"] = dump_to
  with context:
    return jitted.lower(*args).compile(compiler_options=options or None)


def compile_with_triton_report(jitted, *args, devices) -> tuple[Any, dict[str, dict]]:
  """Compiles for compile-only GPU `devices`; returns the executable and ptxas' report
  (registers, spills, shared memory) of every Triton kernel it calls, by kernel name."""
  with tempfile.TemporaryDirectory() as dump_dir:
    executable = compile_lowerable(jitted, *args, devices=devices, dump_to=dump_dir)
    names = compiled_lib.triton_kernel_names(executable.as_text())
    report = compiled_lib.ptxas_report(dump_dir, names, ptxas=gpu_topology.ptxas_path())
    return executable, report


def memory_bytes_per_device(device) -> int:
  """HBM of a TPU chip or memory of a GPU."""
  if device.platform == "gpu":
    return gpu_topology.device_memory_bytes(device)
  return topology_lib.hbm_bytes_per_device(device)


def _gpu_fields(train_text: str, dump_dir: str) -> dict[str, Any]:
  """The GPU row's kernel fields: launches per step and ptxas' report of its Triton kernels."""
  kernels = compiled_lib.kernels_per_step(train_text)
  names = compiled_lib.triton_kernel_names(train_text)
  report = compiled_lib.ptxas_report(dump_dir, names, ptxas=gpu_topology.ptxas_path())
  return {
    "triton_kernels": len(compiled_lib.TRITON_CALL.findall(train_text)),
    "kernels_per_step": kernels.total,
    "kernels_by_kind": kernels.by_kind,
    "loops_without_trip_count": kernels.loops_without_trip_count,
    "array_copies": compiled_lib.copies_of_arrays(train_text),
    "triton_kernel_report": report,
    "spill_bytes": sum(row["spill_store_bytes"] for row in report.values()),
  }


def compile_for_topology(config, topology: str, *, num_slices: int = 1) -> dict[str, Any]:
  """Compiles `config`'s train and eval steps for `num_slices` slices of `topology`.

  Args:
    config: a run's ConfigDict (as launch/main.py takes it).
    topology: a Cloud TPU name (`v5e-16`, `v5p-32`, `v4-8`, `v6e-8`) or jax's (`v5e:4x4`), or
      a GPU job (`h100`, `h100-8`, `h200-8`, `h100-2x8`, `h100:1x2x4`).
    num_slices: TPU slices joined over the data-center network (the data axis spans them).

  Returns:
    A JSON-ready dict: topology, num_slices, num_devices, num_processes, device_kind, mesh,
    batch_size, mosaic_kernels (Mosaic calls in the compiled train step; TPU), peak and HBM
    bytes per device, fits, flops_per_step (model count, forward + backward), compile_s, and
    the eval step's Pallas call count and peak bytes. GPU rows add triton_kernels,
    device_memory_bytes, kernels_per_step (and by kind), the copies that move arrays
    (`compiled.copies_of_arrays`), the Triton kernels' ptxas report and their spill_bytes.
    When XLA:TPU refuses the train step for want of memory, fits is False, the peak is the
    size it reported, `error` its message, and the kernel counts and the eval step's figures
    are None.
  """
  devices = topology_devices(topology, num_slices=num_slices)
  is_gpu = _is_gpu(devices)
  program = build_program(config, devices)
  batch = program.abstract_batch(config.train.batch_size)
  validated = program.validated
  row = {
    "topology": topology,
    "jax_topology": (
      gpu_topology.resolve(topology) if is_gpu else topology_lib.resolve(topology)
    ).jax_name,
    "num_slices": num_slices,
    "num_devices": len(devices),
    "num_processes": len({d.process_index for d in devices}),
    "device_kind": devices[0].device_kind,
    "mesh": dict(program.mesh.shape),
    "batch_size": config.train.batch_size,
    "dtype": validated.model.dtype,
    "fast_weight_impl": validated.model.fast_weight_impl,
    "flops_per_step": train_step_flops(
      validated.model,
      validated.sleep,
      seq_len=validated.task.seq_len,
      batch_size=config.train.batch_size,
    ),
  }
  memory = memory_bytes_per_device(devices[0])
  pallas_key = "triton_kernels" if is_gpu else "mosaic_kernels"
  start = time.perf_counter()
  with tempfile.TemporaryDirectory(prefix="sleep_jax_gpu_dump_") as dump_dir:
    try:
      train = compile_lowerable(
        program.train_step,
        program.abstract_state,
        batch,
        devices=devices,
        dump_to=dump_dir if is_gpu else None,
      )
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
    train_text = train.as_text()
    gpu_fields = _gpu_fields(train_text, dump_dir) if is_gpu else {}
  evaluate = compile_lowerable(
    program.eval_step,
    program.abstract_state.params,
    program.abstract_batch(config.eval.batch_size),
    devices=devices,
  )
  peak = compiled_lib.peak_bytes(train)
  count = compiled_lib.pallas_calls
  row |= {
    pallas_key: count(train_text),
    "peak_memory_bytes_per_device": peak,
    "hbm_bytes_per_device": memory,
    "fits": peak <= memory,
    "compile_s": round(compile_s, 2),
    f"eval_{pallas_key}": count(evaluate.as_text()),
    "eval_peak_memory_bytes_per_device": compiled_lib.peak_bytes(evaluate),
  }
  if is_gpu:
    row |= {"device_memory_bytes": memory} | gpu_fields
  return row


def largest_fitting_batch(
  config,
  topology: str,
  *,
  num_slices: int = 1,
  start_per_device: int | None = None,
  limit_per_device: int = 8192,
) -> dict:
  """The largest batch per device whose train step fits the device's memory, doubling from
  `start_per_device` (default: the config's own batch per device).

  Returns:
    {"per_device_batch": b, "batch_size": global batch, "peak_memory_bytes_per_device": ...}
    for the largest fitting b, or per_device_batch 0 when even `start_per_device` does not fit.
  """
  num_devices = len(topology_devices(topology, num_slices=num_slices))
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
  """A markdown table of `compile_for_topology` results (TPU and GPU rows alike)."""
  gib = lambda b: f"{b / 2**30:.2f}"
  dash = lambda value: "-" if value is None else value
  lines = [
    "| config | topology | devices | hosts | mesh (data, fsdp, tensor) | batch | Pallas "
    "kernels | kernels / step | peak GiB / device | memory GiB | fits | TFLOP / step | "
    "compile s |",
    "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---|---:|---:|",
  ]
  for row in rows:
    mesh = "x".join(str(row["mesh"][a]) for a in ("data", "fsdp", "tensor"))
    slices = f" x {row['num_slices']} slices" if row["num_slices"] > 1 else ""
    pallas = row.get("triton_kernels", row.get("mosaic_kernels"))
    lines.append(
      f"| {row.get('config', '')} | {row['topology']}{slices} | {row['num_devices']} | "
      f"{row['num_processes']} | {mesh} | {row['batch_size']} | {dash(pallas)} | "
      f"{dash(row.get('kernels_per_step'))} | "
      f"{gib(row['peak_memory_bytes_per_device'])} | {gib(row['hbm_bytes_per_device'])} | "
      f"{'yes' if row['fits'] else 'NO'} | {row['flops_per_step'] / 1e12:.2f} | "
      f"{row['compile_s']:.1f} |"
    )
  return "\n".join(lines)
