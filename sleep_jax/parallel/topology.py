"""TPU topologies by name, as devices this host can compile for (no TPU needed).

With libtpu installed (the `tpu` extra), `jax.experimental.topologies.get_topology_desc` gives
the devices of any TPU slice, and jitted functions lowered over them compile with the real
XLA:TPU and Mosaic compilers on a CPU host. Names are Cloud TPU's (`v5e-16`, `v5p-32`, `v4-8`,
`v6e-8`: the generation and its count, chips for v5e/v6e and TensorCores for v4/v5p, whose
megacore chips are one device each) or jax's own (`v5e:4x4`, `v5:2x2x4`).
"""

from __future__ import annotations

import dataclasses
import os
import re

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Generation:
  """A TPU generation: jax's topology prefix, how Cloud TPU counts it, and its memory."""

  jax_prefix: str  # "v5e" -> "v5e:4x4"
  cores_per_chip_in_name: int  # Cloud TPU's count is TensorCores for v4/v5p: 2 per chip
  chip_config_name: str | None  # "megacore": one jax device per chip
  hbm_bytes_per_chip: int  # Cloud TPU documentation, per chip
  three_d: bool  # 3-D torus (v4, v5p) or 2-D (v5e, v6e)


GENERATIONS = {
  "v5e": Generation("v5e", 1, None, 16 * GIB, three_d=False),
  "v6e": Generation("v6e", 1, None, 32 * GIB, three_d=False),
  "v5p": Generation("v5", 2, "megacore", 95 * GIB, three_d=True),
  "v4": Generation("v4", 2, "megacore", 32 * GIB, three_d=True),
}
# jax's device_kind -> the generation (for devices jax gives, e.g. "TPU v5 lite").
DEVICE_KINDS = {
  "TPU v5 lite": "v5e",
  "TPU v6 lite": "v6e",
  "TPU v5": "v5p",
  "TPU v5p": "v5p",
  "TPU v4": "v4",
}


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str  # as the user wrote it
  jax_name: str  # as get_topology_desc takes it, e.g. "v5e:4x4"
  chip_config_name: str | None
  hbm_bytes_per_device: int


def _chip_grid(chips: int, three_d: bool) -> str:
  """Cloud TPU's slice shapes: 2-D 1x1, 2x2, 2x4, 4x4, 4x8 ...; 3-D 2x2x1, 2x2x2, 2x2x4, 2x4x4 ..."""
  exponent = chips.bit_length() - 1
  if chips < 1 or chips != 2**exponent:
    raise ValueError(f"a TPU slice has a power-of-two number of chips, got {chips}")
  if not three_d:
    exponents = [exponent // 2, exponent - exponent // 2]
  elif exponent < 2:
    raise ValueError(f"a v4/v5p slice has at least 4 chips (8 TensorCores), got {chips}")
  elif exponent == 2:
    exponents = [1, 1, 0]
  else:  # as even as possible, the larger extents last
    base, extra = divmod(exponent, 3)
    exponents = [base + (i >= 3 - extra) for i in range(3)]
  return "x".join(str(2**e) for e in exponents)


def resolve(name: str) -> Topology:
  """A topology name (Cloud TPU's `v5e-16` or jax's `v5e:4x4`) -> what jax needs to build it.

  Raises:
    ValueError: an unknown generation or an impossible size, naming the accepted forms.
  """
  accepted = (
    "Cloud TPU names like v5e-16, v5p-32, v4-8, v6e-8 or jax names like v5e:4x4, "
    "v5:2x2x4 (v5p), v4:2x2x1, v6e:2x4"
  )
  cloud = re.fullmatch(r"(v5e|v6e|v5p|v4)-(\d+)", name)
  if cloud:
    generation = GENERATIONS[cloud.group(1)]
    count = int(cloud.group(2))
    if count % generation.cores_per_chip_in_name:
      raise ValueError(f"topology {name!r}: {cloud.group(1)} counts TensorCores, 2 per chip")
    chips = count // generation.cores_per_chip_in_name
    grid = _chip_grid(chips, generation.three_d)
    return Topology(
      name,
      f"{generation.jax_prefix}:{grid}",
      generation.chip_config_name,
      generation.hbm_bytes_per_chip,
    )
  native = re.fullmatch(r"(v5e|v6e|v5p|v5|v4):(\d+(?:x\d+){1,2})", name)
  if native:
    key = {"v5": "v5p"}.get(native.group(1), native.group(1))
    generation = GENERATIONS[key]
    return Topology(
      name,
      f"{generation.jax_prefix}:{native.group(2)}",
      generation.chip_config_name,
      generation.hbm_bytes_per_chip,
    )
  raise ValueError(f"unknown TPU topology {name!r}; use {accepted}")


def tpu_devices(name: str, *, num_slices: int = 1) -> list:
  """The devices of `num_slices` slices of topology `name`, for ahead-of-time compilation.

  Raises:
    ValueError: unknown topology or num_slices < 1.
    RuntimeError: libtpu is missing (install the `tpu` extra).
  """
  topology = resolve(name)
  if num_slices < 1:
    raise ValueError(f"num_slices must be >= 1, got {num_slices}")
  try:
    import libtpu  # noqa: F401  (only to give a clear error before jax tries)
  except ImportError as e:
    raise RuntimeError(
      'compiling for a TPU topology needs libtpu: python -m pip install -e ".[tpu]"'
    ) from e
  # Compile-only use never touches a TPU: let several processes (test workers, a table run)
  # load libtpu at once instead of failing on its single-user lock file.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies

  kwargs = {"num_slices": num_slices}
  if topology.chip_config_name:
    kwargs["chip_config_name"] = topology.chip_config_name
  return list(
    topologies.get_topology_desc(platform="tpu", topology_name=topology.jax_name, **kwargs).devices
  )


def hbm_bytes_per_device(device) -> int:
  """HBM of one jax TPU device (a chip; megacore chips are one device)."""
  kind = DEVICE_KINDS.get(device.device_kind)
  if kind is None:
    raise ValueError(f"no HBM size known for device kind {device.device_kind!r}")
  return GENERATIONS[kind].hbm_bytes_per_chip
