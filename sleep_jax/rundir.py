"""The run directory: its file names, the results record, JSON-lines logs, the config.json guard.

A leaf module (the standard library and sleep_jax.paths): the trainer writes a run directory
through it, and the sweeps and reports read run directories through it without loading JAX,
orbax or the trainer. A run directory may be in cloud storage (`gs://bucket/run`): every file
goes through sleep_jax.paths, so nothing lands in a local folder named `gs:`.

A run directory (`--workdir`) holds:
  config.json        the full config of the run (written before anything else; the resume guard)
  checkpoints/       orbax checkpoints: train state + data-iterator position per saved step
  train_log.jsonl    one line of train metrics per logged step
  eval_log.jsonl     one line of eval metrics per evaluation (the learning curves)
  results.json       the `Results` record of the latest evaluation (schema: RESULTS_SCHEMA)
  sweep_run.json     (runs of a sweep) the run's coordinates in the sweep's grid
  events.out.tfevents.*  TensorBoard scalars
A sweep directory holds sweep.json (the grid) and one run directory per run.

Every JSON file is replaced atomically (written beside, then renamed; a cloud object is replaced
whole by the storage), so a process killed at any moment leaves either the old file or the new
one. JSON-lines logs are appended; a reader skips a torn last line and keeps the last line of
each step (a resumed run re-logs the steps it redoes).
"""

from __future__ import annotations

import copy
import dataclasses
import json
from typing import Any

from sleep_jax import paths

CONFIG_FILE = "config.json"
RESULTS_FILE = "results.json"
TRAIN_LOG_FILE = "train_log.jsonl"
EVAL_LOG_FILE = "eval_log.jsonl"
CHECKPOINT_DIR = "checkpoints"
SWEEP_FILE = "sweep.json"  # in a sweep directory: the grid, so reports can count missing runs
SWEEP_RUN_FILE = "sweep_run.json"  # in a run directory: its coordinates in the grid


class WorkdirError(OSError):
  """The run directory cannot be used (unwritable, full, or holding an incompatible run)."""


# --- Plain JSON files, replaced atomically. ---------------------------------------------------


def write_json(path: str, value: Any) -> None:
  """Writes `value` to `path` as indented JSON, atomically (sleep_jax.paths.open_atomic)."""
  with paths.open_atomic(path) as f:
    json.dump(value, f, indent=2, sort_keys=True)
    f.write("\n")


def read_json(path: str) -> Any:
  """The JSON value in `path`, or None when the file is missing or unreadable."""
  try:
    return json.loads(paths.read_text(path))
  except (OSError, ValueError):
    return None


def append_jsonl(path: str, record: dict) -> None:
  """Appends one JSON line (flushed to the OS before returning)."""
  paths.append_text(path, json.dumps(record, sort_keys=True) + "\n")


def read_jsonl(path: str, *, key: str = "step") -> list[dict]:
  """The records of a JSON-lines log, one per `key` value (the last wins), sorted by it.

  A line that does not parse (a process killed while appending) is skipped.
  """
  try:
    text = paths.read_text(path)
  except OSError:
    return []
  by_key = {}
  for line in text.splitlines():
    try:
      record = json.loads(line)
    except ValueError:
      continue
    if isinstance(record, dict) and key in record:
      by_key[record[key]] = record
  return [by_key[k] for k in sorted(by_key)]


# --- The results record. -------------------------------------------------------------------


@dataclasses.dataclass
class Results:
  """What results.json holds: where the run is and its latest evaluation.

  Attributes:
    task: the task name ("rule110", "depo").
    task_settings: the task's training settings (its config section without the name and
      evaluation-only fields), e.g. {"depth": 32} for Rule 110.
    passes: N, passes per evicted window.
    window: L, the attention window.
    eviction: "hard" or "none".
    pattern: the block pattern, e.g. "AGAG".
    seed: the run's seed.
    step: the step of the latest evaluation.
    num_steps: the step the run ends at.
    tokens_seen: training tokens consumed by `step`.
    wall_s: wall-clock seconds of training and evaluation, summed over resumptions.
    eval: metric name -> value of the latest evaluation ("loss", "accuracy",
      "exact_accuracy", "depth4/exact_accuracy", "hops8/loss", ...).
  """

  task: str
  task_settings: dict[str, Any]
  passes: int
  window: int
  eviction: str
  pattern: str
  seed: int
  step: int
  num_steps: int
  tokens_seen: int
  wall_s: float
  eval: dict[str, float]

  @property
  def finished(self) -> bool:
    return self.step >= self.num_steps

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, value: Any, *, source: str = "results") -> Results:
    """Checks `value` against RESULTS_SCHEMA and builds the record (ValueError naming the field)."""
    if not isinstance(value, dict):
      raise ValueError(f"{source}: expected a JSON object, got {type(value).__name__}")
    missing = [name for name in RESULTS_SCHEMA["required"] if name not in value]
    if missing:
      raise ValueError(
        f"{source}: missing fields {missing} (written by an older sleep_jax? "
        "rerun the workdir to rewrite it)"
      )
    for name, spec in RESULTS_SCHEMA["properties"].items():
      if not _matches(value[name], spec["type"]):
        raise ValueError(f"{source}: field {name!r} should be {spec['type']}, got {value[name]!r}")
    return cls(**{name: value[name] for name in RESULTS_SCHEMA["properties"]})


_JSON_TYPES = {"string": str, "integer": int, "number": (int, float), "object": dict}


def _matches(value: Any, json_type: str) -> bool:
  return isinstance(value, _JSON_TYPES[json_type]) and not isinstance(value, bool)


# JSON Schema (draft 2020-12) of results.json, for outside tools; `Results.from_json` checks it.
RESULTS_SCHEMA = {
  "$schema": "https://json-schema.org/draft/2020-12/schema",
  "title": "sleep_jax results.json",
  "type": "object",
  "properties": {
    "task": {"type": "string"},
    "task_settings": {"type": "object"},
    "passes": {"type": "integer"},
    "window": {"type": "integer"},
    "eviction": {"type": "string"},
    "pattern": {"type": "string"},
    "seed": {"type": "integer"},
    "step": {"type": "integer"},
    "num_steps": {"type": "integer"},
    "tokens_seen": {"type": "integer"},
    "wall_s": {"type": "number"},
    "eval": {"type": "object", "additionalProperties": {"type": "number"}},
  },
  "required": [
    "task",
    "task_settings",
    "passes",
    "window",
    "eviction",
    "pattern",
    "seed",
    "step",
    "num_steps",
    "tokens_seen",
    "wall_s",
    "eval",
  ],
}


# --- One run directory. --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RunDir:
  """The paths of one run directory, and what is read from it."""

  path: str

  def file(self, name: str) -> str:
    return paths.join(self.path, name)

  @property
  def checkpoints(self) -> str:
    return paths.absolute(self.file(CHECKPOINT_DIR))

  def config(self) -> dict | None:
    return read_json(self.file(CONFIG_FILE))

  def results(self) -> Results | None:
    """The results record, or None before the first evaluation (or if the file is damaged)."""
    value = read_json(self.file(RESULTS_FILE))
    if value is None:
      return None
    try:
      return Results.from_json(value, source=self.file(RESULTS_FILE))
    except ValueError:
      return None

  def write_results(self, results: Results) -> None:
    write_json(self.file(RESULTS_FILE), results.to_json())

  def train_log(self) -> list[dict]:
    return read_jsonl(self.file(TRAIN_LOG_FILE))

  def eval_log(self) -> list[dict]:
    return read_jsonl(self.file(EVAL_LOG_FILE))

  def is_finished(self, num_steps: int) -> bool:
    """True when results.json reports the run's final step (an interrupted run is not)."""
    results = self.results()
    return results is not None and results.step == num_steps

  def ensure_writable(self) -> None:
    """Creates the directory and proves a file can be written there, before any compilation.

    Raises:
      WorkdirError: naming the directory, the reason and the fix.
    """
    probe = self.file(".write_probe")
    try:
      paths.check_available(self.path)
    except RuntimeError as e:
      raise WorkdirError(f"cannot use workdir {self.path!r}: {e}") from e
    try:
      paths.makedirs(self.path)
      paths.write_text(probe, "ok")
      paths.remove(probe)
    except OSError as e:
      raise WorkdirError(
        f"cannot write to workdir {self.path!r} ({e.strerror or e}). Point "
        "--workdir at a writable directory with free space; nothing in it "
        "was changed."
      ) from e

  # --- The config guard. ---

  def check_compatible_config(
    self, config: dict, defaults: dict[str, Any] | None = None, may_differ: tuple[str, ...] = ()
  ) -> None:
    """Raises WorkdirError if the directory holds a run of an incompatible config.

    Nothing is touched. Loop settings (num_steps, cadences, learning rates, remat, the mesh)
    may differ: a resumed run may run longer or recover from a NaN with a lower learning rate.

    Args:
      config: the new run's config, as config.json would hold it.
      defaults: dotted field name -> the value a config saved without that field meant (the
        typed config's field defaults: fields added after a run was saved read as these).
      may_differ: more dotted fields that may change (beside MAY_DIFFER), e.g. those that only
        choose how the same values are computed.
    """
    saved = self.config()
    if saved is None:
      return
    ignored = MAY_DIFFER + tuple(may_differ)
    saved = _without(saved, ignored)
    config = _without(_json_roundtrip(config), ignored)
    defaults = _json_roundtrip(defaults or {})
    value = lambda tree, key: _lookup(tree, key, defaults.get(key))
    keys = [k for k in MUST_MATCH if k not in WHOLE_SECTIONS]
    # Whole sections field by field, so that a field added later reads as its default.
    for section in WHOLE_SECTIONS:
      fields = set(saved.get(section, {})) | set(config.get(section, {}))
      keys += [f"{section}.{field}" for field in sorted(fields)]
    differing = [key for key in keys if value(saved, key) != value(config, key)]
    if differing:
      details = "; ".join(
        f"{k}: saved {value(saved, k)!r} vs new {value(config, k)!r}" for k in differing
      )
      raise WorkdirError(
        f"workdir {self.path} holds a run with an incompatible config "
        f"({details}). Use a new --workdir; the existing run was left untouched."
      )

  def write_config(self, config: dict) -> None:
    paths.makedirs(self.path)
    write_json(self.file(CONFIG_FILE), config)


# Settings that change what a checkpoint means: resuming under different ones is an error.
MUST_MATCH = (
  "seed",
  "task",
  "model",
  "train.batch_size",
  "sleep.passes",
  "sleep.window",
  "sleep.eviction",
  "sleep.context_len",
  "sleep.predict_chunks",
  "sleep.predict_then_sleep",
  "sleep.conv_state",
  "sleep.grad_passes",
  "sleep.halt",
  "sleep.halt_tol",
  "sleep.ponder_cost",
  "train.trainable",
)
WHOLE_SECTIONS = ("task", "model")  # of MUST_MATCH: every field of these must match
# Evaluation-only task fields inside the sections above: they may change (e.g. to add depths).
MAY_DIFFER = ("task.eval_depths", "task.eval_hops")


def _json_roundtrip(value: Any) -> Any:
  return json.loads(json.dumps(value))  # tuples -> lists, as config.json holds them


def _lookup(tree: Any, dotted: str, default: Any = None) -> Any:
  for key in dotted.split("."):
    tree = tree.get(key, default) if isinstance(tree, dict) else default
  return tree


def _without(config: dict, dotted_fields: tuple[str, ...]) -> dict:
  config = copy.deepcopy(config)
  for dotted in dotted_fields:
    *parents, field = dotted.split(".")
    section = _lookup(config, ".".join(parents))
    if isinstance(section, dict):
      section.pop(field, None)
  return config
