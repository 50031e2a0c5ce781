"""The typed experiment config: every section of a config file as a frozen, validated dataclass.

Config files (configs/*.py) stay ml_collections ConfigDicts, so `--config.<section>.<field>=`
overrides keep working; `ExperimentConfig.from_config` turns one into this tree at load, before
anything is compiled. Unknown fields, wrong values and inconsistent sections are errors that
name the field.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from sleep_jax.data.config import TaskConfig, task_config
from sleep_jax.model.config import ModelConfig
from sleep_jax.parallel.config import ParallelConfig
from sleep_jax.sleep.config import SleepConfig
from sleep_jax.typed_config import dataclass_from_section


def _check_positive(section: str, obj: Any, names: tuple[str, ...], *, zero_ok=()) -> None:
  for name in names:
    value = getattr(obj, name)
    low = 0 if name in zero_ok else 1
    if value < low:
      raise ValueError(f"{section}.{name} must be >= {low}, got {value}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Optimisation (see configs/common.py for every field)."""

  batch_size: int = 512
  num_steps: int = 100_000
  warmup_steps: int = 1_000
  min_lr_ratio: float = 0.1
  muon_lr: float = 2e-3
  adamw_lr: float = 5e-5
  weight_decay: float = 0.0
  grad_clip: float = 1.0
  # A regular expression on parameter paths ("blocks/4/"): only the parameters it matches
  # (re.search) train; the rest stay frozen. Empty: everything trains.
  trainable: str = ""

  def __post_init__(self):
    _check_positive(
      "train", self, ("batch_size", "num_steps", "warmup_steps"), zero_ok=("warmup_steps",)
    )
    for name in ("muon_lr", "adamw_lr", "weight_decay", "min_lr_ratio"):
      if not getattr(self, name) >= 0:
        raise ValueError(f"train.{name} must be >= 0, got {getattr(self, name)}")
    if not self.grad_clip > 0:
      raise ValueError(f"train.grad_clip must be > 0, got {self.grad_clip}")
    try:
      re.compile(self.trainable)
    except re.error as e:
      raise ValueError(
        f"train.trainable={self.trainable!r} is not a regular expression: {e}"
      ) from e


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """Evaluation cadence and held-out set sizes."""

  every_steps: int = 1_000
  num_examples: int = 4_096
  batch_size: int = 512
  num_slice_examples: int | None = None  # per-slice set size; None = num_examples

  def __post_init__(self):
    if self.num_slice_examples is None:
      object.__setattr__(self, "num_slice_examples", self.num_examples)
    _check_positive(
      "eval", self, ("every_steps", "num_examples", "batch_size", "num_slice_examples")
    )
    # Whole batches only: a smaller last batch would compile the eval step a second time.
    for name in ("num_examples", "num_slice_examples"):
      if getattr(self, name) % self.batch_size:
        raise ValueError(
          f"eval.{name}={getattr(self, name)} must be a multiple of "
          f"eval.batch_size={self.batch_size}"
        )


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  """When to save, and how many checkpoints to keep."""

  every_steps: int = 1_000
  max_to_keep: int = 2

  def __post_init__(self):
    _check_positive("checkpoint", self, ("every_steps", "max_to_keep"))


SECTIONS = {
  "task": task_config,
  "model": ModelConfig.from_config,
  "sleep": SleepConfig.from_config,
  "parallel": ParallelConfig.from_config,
  "train": lambda s: dataclass_from_section(TrainConfig, s, "train"),
  "eval": lambda s: dataclass_from_section(EvalConfig, s, "eval"),
  "checkpoint": lambda s: dataclass_from_section(CheckpointConfig, s, "checkpoint"),
}


def _init_from(config) -> str:
  if "init_from" not in config:
    return ""
  if config["init_from"] is None:  # a config that only makes sense from pretrained weights
    raise ValueError(
      "this config starts from pretrained parameters: set --config.init_from=<directory "
      "written by launch/convert.py> (or an earlier run's workdir)"
    )
  return str(config["init_from"])


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  """One run's whole config, typed.

  Attributes:
    seed: parameters, data order and held-out sets.
    log_every_steps: console line, train_log.jsonl and TensorBoard scalars cadence.
    task, model, sleep, train, eval, checkpoint, parallel: the sections.
  """

  seed: int
  log_every_steps: int
  task: TaskConfig
  model: ModelConfig
  sleep: SleepConfig
  train: TrainConfig
  eval: EvalConfig
  checkpoint: CheckpointConfig
  parallel: ParallelConfig
  # Start from these parameters instead of a fresh initialisation: a directory written by
  # launch/convert.py (a pretrained checkpoint) or an earlier run's workdir. Empty: fresh.
  init_from: str = ""

  def __post_init__(self):
    if self.log_every_steps < 1:
      raise ValueError(f"log_every_steps must be >= 1, got {self.log_every_steps}")
    if self.sleep.halt == "learned" and not self.model.halting_unit:
      # The halting unit's parameters belong to the model; a run that halts by it has one.
      object.__setattr__(self, "model", dataclasses.replace(self.model, halting_unit=True))
    self.sleep.check_model(self.model)

  @classmethod
  def from_config(cls, config) -> ExperimentConfig:
    """Builds from a config file's ConfigDict (or a mapping, or returns an ExperimentConfig)."""
    if isinstance(config, cls):
      return config
    known = {f.name for f in dataclasses.fields(cls)}
    extra = sorted(set(config.keys()) - known)
    if extra:
      raise ValueError(f"unknown top-level config fields {extra}; known: {sorted(known)}")
    missing = sorted(known - set(config.keys()) - {"parallel", "init_from"})
    if missing:
      raise ValueError(f"the config has no {missing} field(s); see configs/common.py")
    sections = {
      name: make(config[name] if name in config else {}) for name, make in SECTIONS.items()
    }
    return cls(
      seed=int(config["seed"]),
      log_every_steps=int(config["log_every_steps"]),
      init_from=_init_from(config),
      **sections,
    )

  def to_dict(self) -> dict[str, Any]:
    """Plain JSON-able values (what config.json holds)."""
    return dataclasses.asdict(self)

  def field_defaults(self) -> dict[str, Any]:
    """Dotted name -> default of every section field that has one ("model.loop_norm": False):
    what a config.json saved before that field existed meant."""
    defaults = {}
    for section in dataclasses.fields(self):
      value = getattr(self, section.name)
      if not dataclasses.is_dataclass(value):
        continue
      for field in dataclasses.fields(value):
        if field.default is not dataclasses.MISSING:
          defaults[f"{section.name}.{field.name}"] = field.default
        elif field.default_factory is not dataclasses.MISSING:
          defaults[f"{section.name}.{field.name}"] = field.default_factory()
    return defaults
