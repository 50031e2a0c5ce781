"""Typed task configurations: `config.task` becomes one of these frozen dataclasses at load.

Every check is plain Python on static values, so a bad setting fails before any compilation,
with a message naming the field.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from sleep_jax.data import depo
from sleep_jax.typed_config import dataclass_from_section


def _ints(values) -> tuple[int, ...]:
  return tuple(int(v) for v in (values or ()))


@dataclasses.dataclass(frozen=True)
class Rule110TaskConfig:
  """Rule 110 (configs/rule110.py).

  Attributes:
    name: "rule110".
    depth: t, Rule 110 steps between the strings and their labels.
    eval_depths: also evaluate on held-out sets at these depths ("depth{t}/..." metrics).
  """

  name: str = "rule110"
  depth: int = 32
  eval_depths: tuple[int, ...] = ()

  def __post_init__(self):
    object.__setattr__(self, "eval_depths", _ints(self.eval_depths))
    for t in (self.depth, *self.eval_depths):
      if t < 0:
        raise ValueError(f"task.depth and task.eval_depths (Rule 110 steps) must be >= 0, got {t}")

  @property
  def training_settings(self) -> dict[str, Any]:
    """What defines the training task (for results.json); evaluation-only fields excluded."""
    return {"depth": self.depth}


@dataclasses.dataclass(frozen=True)
class DepoTaskConfig:
  """Depo k-hop retrieval (configs/depo.py).

  Attributes:
    name: "depo".
    hops: k of every training query; None draws k ~ U{1..16} per query.
    min_nodes: smallest cycle (node count ~ U{min..max} per example).
    max_nodes: largest cycle.
    eval_hops: also evaluate with every query at these k ("hops{k}/..." metrics).
  """

  name: str = "depo"
  hops: int | None = None
  min_nodes: int = depo.MIN_NODES
  max_nodes: int = depo.MAX_NODES
  eval_hops: tuple[int, ...] = depo.EVAL_HOPS

  def __post_init__(self):
    object.__setattr__(self, "eval_hops", _ints(self.eval_hops))
    for k in (self.hops, *self.eval_hops):
      depo.check_args(k, self.min_nodes, self.max_nodes)

  @property
  def training_settings(self) -> dict[str, Any]:
    return {"hops": self.hops, "min_nodes": self.min_nodes, "max_nodes": self.max_nodes}


TASK_CONFIGS = {"rule110": Rule110TaskConfig, "depo": DepoTaskConfig}
TaskConfig = Rule110TaskConfig | DepoTaskConfig


def task_config(section: Mapping[str, Any] | TaskConfig) -> TaskConfig:
  """The typed config of `config.task`, by its `name` (unknown names and fields are errors)."""
  if isinstance(section, tuple(TASK_CONFIGS.values())):
    return section
  name = section.get("name") if hasattr(section, "get") else None
  if name not in TASK_CONFIGS:
    raise ValueError(f"unknown task.name={name!r}; known tasks: {sorted(TASK_CONFIGS)}")
  return dataclass_from_section(TASK_CONFIGS[name], section, "task")
