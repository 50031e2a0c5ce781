"""Task registry and the grain pipelines every task shares.

A `Task` binds a generator to its static sequence layout. Training batches come from a grain
`MapDataset`: batch b is a pure function of (seed, b), drawn by one vectorised call of the
task's numpy generator (per-example Python calls cost ~0.3 s per 512-example Rule 110 batch,
slower than a GPU step). The iterator state is just the next batch index, so it checkpoints
and resumes exactly. The held-out set comes from an independent numpy stream.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import grain
import numpy as np

from sleep_jax.data import rule110

Batch = dict[str, np.ndarray]
_EVAL_STREAM = 1  # the held-out stream's key; the training stream is grain's own seeding


@dataclasses.dataclass(frozen=True)
class Task:
  """A task's static layout and its generator.

  Attributes:
    name: the task name (config.task.name).
    seq_len: tokens per example.
    context_len: tokens before the prediction chunk (slept on).
    vocab_size: token ids are in [0, vocab_size).
    generate: (rng, num) -> dict of numpy arrays [num, seq_len]: tokens, targets, loss_mask.
  """

  name: str
  seq_len: int
  context_len: int
  vocab_size: int
  generate: Callable[[np.random.Generator, int], Batch]


def _rule110(task_config: Mapping[str, Any]) -> Task:
  depth = task_config["depth"]
  if depth < 0:
    raise ValueError(f"task.depth (Rule 110 steps) must be >= 0, got {depth}")
  return Task(name="rule110", seq_len=rule110.SEQ_LEN, context_len=rule110.CONTEXT_LEN,
              vocab_size=rule110.VOCAB_SIZE,
              generate=lambda rng, num: rule110.generate(rng, num, depth))


TASKS: dict[str, Callable[[Mapping[str, Any]], Task]] = {"rule110": _rule110}


def get_task(task_config: Mapping[str, Any]) -> Task:
  """The `Task` named by `config.task.name`, bound to the rest of `config.task`."""
  name = task_config["name"]
  if name not in TASKS:
    raise ValueError(f"unknown task.name={name!r}; known tasks: {sorted(TASKS)}")
  return TASKS[name](task_config)


def train_dataset(task: Task, *, seed: int, batch_size: int) -> grain.MapDataset:
  """An (effectively endless) dataset of training batches; element b is batch b."""
  return (grain.MapDataset.range(2**40).seed(seed)
          .random_map(lambda _, rng: task.generate(rng, batch_size)))


def heldout_set(task: Task, *, seed: int, num: int) -> Batch:
  """The fixed evaluation set: `num` examples from a stream independent of training."""
  return task.generate(np.random.default_rng([seed, _EVAL_STREAM]), num)


def iterate_batches(examples: Batch, batch_size: int):
  """Consecutive batches of a dict of equally long arrays (the last may be smaller)."""
  num = len(next(iter(examples.values())))
  for start in range(0, num, batch_size):
    yield {k: v[start:start + batch_size] for k, v in examples.items()}
