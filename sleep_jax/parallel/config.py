"""Typed `config.parallel`: the mesh's axis sizes and the logical-axis rules."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from sleep_jax.typed_config import dataclass_from_section

MESH_AXES = ("data", "fsdp", "tensor")
DEFAULT_MESH = {"data": -1, "fsdp": 1, "tensor": 1}  # -1: every device the others leave
# Logical axis of a parameter dimension -> mesh axes (None: whole on every device). The batch
# is always split over data x fsdp. A dimension must divide by its mesh axes' total size;
# "layers" is the leading axis of the stacked repeated blocks.
DEFAULT_RULES = (
  ("vocab", None),
  ("embed", "fsdp"),
  ("mlp", "tensor"),
  ("heads", "tensor"),
  ("head_dim", None),
  ("gate_heads", "tensor"),
  ("conv", None),
  ("dconv", None),  # the Jet block's kernel-generator hidden width
  ("layers", None),
)


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
  """How the job's devices are arranged and how parameters are split over them.

  Attributes:
    mesh: axis name -> size over every device of the job ("data", "fsdp", "tensor"); one size
      may be -1 (the rest). The sizes' product is checked against the device count when the
      mesh is made (`sleep_jax.parallel.mesh.mesh_shape`).
    rules: (logical axis, mesh axis or axes or None) pairs: how each parameter dimension is
      split.
  """

  mesh: Mapping[str, int] = dataclasses.field(default_factory=lambda: dict(DEFAULT_MESH))
  rules: tuple[tuple[str, Any], ...] = DEFAULT_RULES

  def __post_init__(self):
    mesh = dict(self.mesh.items())
    unknown = sorted(set(mesh) - set(MESH_AXES))
    if unknown:
      raise ValueError(f"parallel.mesh has unknown axes {unknown}; the axes are {MESH_AXES}")
    object.__setattr__(self, "mesh", {axis: int(mesh.get(axis, 1)) for axis in MESH_AXES})
    rules = []
    for rule in self.rules:
      if len(rule) != 2 or not isinstance(rule[0], str):
        raise ValueError(
          f"parallel.rules entries are (logical axis, mesh axes) pairs, got {rule!r}"
        )
      target = tuple(rule[1]) if isinstance(rule[1], (list, tuple)) else rule[1]
      for axis in target if isinstance(target, tuple) else (target,):
        if axis is not None and axis not in MESH_AXES:
          raise ValueError(
            f"parallel.rules maps {rule[0]!r} to unknown mesh axis {axis!r}; "
            f"the axes are {MESH_AXES}"
          )
      rules.append((rule[0], target))
    object.__setattr__(self, "rules", tuple(rules))

  @classmethod
  def from_config(cls, section) -> ParallelConfig:
    return dataclass_from_section(cls, section, "parallel")
