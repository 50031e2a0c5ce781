"""Typed task configurations: `config.task` becomes one of these frozen dataclasses at load.

Every check is plain Python on static values, so a bad setting fails before any compilation,
with a message naming the field.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from sleep_jax import paths
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
    depths: when non-empty, every training example (and the main held-out set's) draws its own
      t uniformly from these distinct depths, and `depth` is unused: one model for several
      depths, so that an adaptive sleeper can spend more passes where t is larger. Each depth
      writes its cells in its own pair of tokens (the task's vocabulary grows by two per
      depth: `rule110.mixed_vocab_size`), so the strings show the depth.
    eval_depths: also evaluate on held-out sets at these depths ("depth{t}/..." metrics).
  """

  name: str = "rule110"
  depth: int = 32
  depths: tuple[int, ...] = ()
  eval_depths: tuple[int, ...] = ()

  def __post_init__(self):
    object.__setattr__(self, "depths", _ints(self.depths))
    object.__setattr__(self, "eval_depths", _ints(self.eval_depths))
    for field in ("depth", "depths", "eval_depths"):
      values = getattr(self, field)
      if any(t < 0 for t in (values if isinstance(values, tuple) else (values,))):
        raise ValueError(f"task.{field} (Rule 110 steps) must be >= 0, got {values}")
    if len(set(self.depths)) != len(self.depths):
      raise ValueError(
        f"task.depths must be distinct (each drawn equally often), got {self.depths}"
      )
    if self.depths and not set(self.eval_depths) <= set(self.depths):
      raise ValueError(
        f"task.eval_depths={self.eval_depths} must be among task.depths={self.depths}: a "
        "mixed-depth model reads each depth from its own cell tokens, and knows only those"
      )

  @property
  def training_settings(self) -> dict[str, Any]:
    """What defines the training task (for results.json); evaluation-only fields excluded."""
    return {"depths": list(self.depths)} if self.depths else {"depth": self.depth}


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


@dataclasses.dataclass(frozen=True)
class GsmInfiniteTaskConfig:
  """GSM-Infinite, question first, no chain of thought (configs/gsm_infinite.py).

  Attributes:
    name: "gsm_infinite".
    tokenizer: a tokenizer.json path (a checkpoint's own), or "word_level": a small tokenizer
      over the generator's vocabulary, built once (sleep_jax.data.gsm_task), for from-scratch
      runs.
    family: "symbolic" or "realistic".
    ops: training operation counts, an inclusive range (lo, hi).
    eval_ops: also evaluate per operation count ("ops{k}/loss", "ops{k}/accuracy").
    seq_len: tokens per example (left-padded); a multiple of predict_len.
    predict_len: the last chunk (sleep.window): the answer lies in it; the rest is slept on.
    target_length: pad each problem with noise to this many tokens (None: no noise).
    distractors: distractor chains per problem.
    modulus: reduce every value modulo this (None: plain integers).
  """

  name: str = "gsm_infinite"
  tokenizer: str = "word_level"
  family: str = "symbolic"
  ops: tuple[int, int] = (1, 8)
  eval_ops: tuple[int, ...] = (2, 4, 6, 8)
  seq_len: int = 4_000
  predict_len: int = 2_000
  target_length: int | None = None
  distractors: int = 4
  modulus: int | None = None

  def __post_init__(self):
    object.__setattr__(self, "ops", _ints(self.ops))
    object.__setattr__(self, "eval_ops", _ints(self.eval_ops))
    if len(self.ops) != 2 or not 1 <= self.ops[0] <= self.ops[1]:
      raise ValueError(f"task.ops must be a range (lo, hi) with 1 <= lo <= hi, got {self.ops}")
    if any(k < 1 for k in self.eval_ops):
      raise ValueError(f"task.eval_ops must be >= 1, got {self.eval_ops}")
    if self.predict_len < 1 or self.seq_len % self.predict_len:
      raise ValueError(
        f"task.seq_len={self.seq_len} must be a multiple of task.predict_len={self.predict_len}"
      )
    if self.family not in ("symbolic", "realistic"):
      raise ValueError(f"task.family={self.family!r}: use 'symbolic' or 'realistic'")
    if self.tokenizer != "word_level" and not paths.exists(self.tokenizer):
      raise ValueError(f"task.tokenizer={self.tokenizer!r} is not a file (a tokenizer.json)")
    if self.target_length is not None and self.target_length >= self.seq_len:
      raise ValueError(
        f"task.target_length={self.target_length} leaves no room in task.seq_len={self.seq_len}"
      )

  @property
  def training_settings(self) -> dict[str, Any]:
    return {
      "family": self.family,
      "ops": list(self.ops),
      "target_length": self.target_length,
      "modulus": self.modulus,
    }


TASK_CONFIGS = {
  "rule110": Rule110TaskConfig,
  "depo": DepoTaskConfig,
  "gsm_infinite": GsmInfiniteTaskConfig,
}
TaskConfig = Rule110TaskConfig | DepoTaskConfig | GsmInfiniteTaskConfig


def task_config(section: Mapping[str, Any] | TaskConfig) -> TaskConfig:
  """The typed config of `config.task`, by its `name` (unknown names and fields are errors)."""
  if isinstance(section, tuple(TASK_CONFIGS.values())):
    return section
  name = section.get("name") if hasattr(section, "get") else None
  if name not in TASK_CONFIGS:
    raise ValueError(f"unknown task.name={name!r}; known tasks: {sorted(TASK_CONFIGS)}")
  return dataclass_from_section(TASK_CONFIGS[name], section, "task")
