"""Task registry and the grain pipelines every task shares.

A `Task` binds a generator to its static sequence layout. Training batches come from a grain
`MapDataset`: global batch b is made of blocks of `EXAMPLES_PER_BLOCK` examples, block i a pure
function of (seed, i) drawn by one vectorised call of the task's numpy generator (per-example
calls cost ~0.3 s per 512-example Rule 110 batch, slower than a GPU step). In a multi-process
job every process makes only the blocks of its own rows of each batch, and the global batch is
the same whatever the number of processes or devices. The iterator state is just the next
batch index, so it checkpoints and resumes exactly. The held-out set comes from an
independent numpy stream.

A task may also declare evaluation slices: extra held-out sets at one setting of its difficulty
knob (Rule 110 at depth t, Depo with every query at k hops), each from its own stream keyed by
that setting, reported under flat keys such as "depth4/exact_accuracy" or "hops8/loss".
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import grain
import numpy as np

from sleep_jax.data import depo, gsm_task, rule110
from sleep_jax.data.config import (
  DepoTaskConfig,
  GsmInfiniteTaskConfig,
  Rule110TaskConfig,
  TaskConfig,
)
from sleep_jax.data.config import task_config as typed_task_config

Batch = dict[str, np.ndarray]
EXAMPLES_PER_BLOCK = 8  # training examples per generator call; a process's rows are whole blocks
_TRAIN_STREAM = 0  # [seed, 0, block] seeds training block `block`
_EVAL_STREAM = 1  # the held-out stream's key
_SLICE_STREAM = 2  # under _EVAL_STREAM: [seed, 1, 2, setting] seeds the slice at that setting


@dataclasses.dataclass(frozen=True)
class EvalSlice:
  """A held-out set at one setting of a task's difficulty knob.

  Attributes:
    name: the key prefix of its metrics, e.g. "depth4" or "hops8".
    setting: the knob's value (depth t, hops k); it also keys the slice's random stream, so
      adding or removing a slice leaves the others' examples unchanged.
    generate: (rng, num) -> dict of numpy arrays, with the same keys as the task's batches.
    metrics: reported name -> name in `sleep_jax.train.metrics.summarize`'s output.
  """

  name: str
  setting: int
  generate: Callable[[np.random.Generator, int], Batch]
  metrics: Mapping[str, str]


@dataclasses.dataclass(frozen=True)
class Task:
  """A task's static layout and its generator.

  Attributes:
    name: the task name (config.task.name).
    seq_len: tokens per example.
    context_len: tokens before the prediction chunk (slept on).
    vocab_size: token ids are in [0, vocab_size).
    generate: (rng, num) -> dict of numpy arrays [num, seq_len]: tokens, targets, loss_mask
      (and optionally "answer_id", grouping loss-carrying positions into answer words).
    eval_slices: extra held-out sets evaluated beside the main one.
  """

  name: str
  seq_len: int
  context_len: int
  vocab_size: int
  generate: Callable[[np.random.Generator, int], Batch]
  eval_slices: tuple[EvalSlice, ...] = ()


def _rule110(cfg: Rule110TaskConfig) -> Task:
  metrics = {"exact_accuracy": "exact_accuracy", "loss": "loss", "accuracy": "accuracy"}
  slices = tuple(
    EvalSlice(
      name=f"depth{t}",
      setting=t,
      metrics=metrics,
      generate=(
        functools.partial(rule110.generate_marked, depth=t, depths=cfg.depths)
        if cfg.depths  # in the depth's own alphabet, as the model was trained
        else functools.partial(rule110.generate, depth=t)
      ),
    )
    for t in dict.fromkeys(cfg.eval_depths)
  )  # drop repeats, keep order
  return Task(
    name="rule110",
    seq_len=rule110.SEQ_LEN,
    context_len=rule110.CONTEXT_LEN,
    vocab_size=(rule110.mixed_vocab_size(len(cfg.depths)) if cfg.depths else rule110.VOCAB_SIZE),
    generate=(
      functools.partial(rule110.generate_mixed, depths=cfg.depths)
      if cfg.depths
      else functools.partial(rule110.generate, depth=cfg.depth)
    ),
    eval_slices=slices,
  )


def _depo(cfg: DepoTaskConfig) -> Task:
  nodes = {"min_nodes": cfg.min_nodes, "max_nodes": cfg.max_nodes}
  # Per k: answer-token loss and exact answer-word accuracy (every symbol of the word right).
  metrics = {"loss": "loss", "accuracy": "answer_accuracy"}
  slices = tuple(
    EvalSlice(
      name=f"hops{k}",
      setting=k,
      metrics=metrics,
      generate=functools.partial(depo.generate, hops=k, **nodes),
    )
    for k in dict.fromkeys(cfg.eval_hops)
  )
  return Task(
    name="depo",
    seq_len=depo.SEQ_LEN,
    context_len=depo.CONTEXT_LEN,
    vocab_size=depo.VOCAB_SIZE,
    generate=functools.partial(depo.generate, hops=cfg.hops, **nodes),
    eval_slices=slices,
  )


def _gsm_infinite(cfg: GsmInfiniteTaskConfig) -> Task:
  path = gsm_task.tokenizer_path(cfg.tokenizer)
  problems = dict(
    family=cfg.family,
    target_length=cfg.target_length,
    distractors=cfg.distractors,
    modulus=cfg.modulus,
    count_length=gsm_task.token_counter(path),
  )
  make = functools.partial(gsm_task.generate, tokenizer_path=path, seq_len=cfg.seq_len)
  slices = tuple(
    EvalSlice(
      name=f"ops{k}",
      setting=k,
      metrics={"loss": "loss", "accuracy": "answer_accuracy"},
      generate=functools.partial(make, problem_settings=dict(problems, ops=k)),
    )
    for k in dict.fromkeys(cfg.eval_ops)
  )
  return Task(
    name="gsm_infinite",
    seq_len=cfg.seq_len,
    context_len=cfg.seq_len - cfg.predict_len,
    vocab_size=gsm_task.load_tokenizer(path).get_vocab_size(),
    generate=functools.partial(make, problem_settings=dict(problems, ops=tuple(cfg.ops))),
    eval_slices=slices,
  )


TASKS: dict[str, Callable[[Any], Task]] = {
  "rule110": _rule110,
  "depo": _depo,
  "gsm_infinite": _gsm_infinite,
}


def get_task(task_config: Mapping[str, Any] | TaskConfig) -> Task:
  """The `Task` of `config.task` (a ConfigDict section, a mapping or a typed task config)."""
  cfg = typed_task_config(task_config)
  return TASKS[cfg.name](cfg)


def train_block(task: Task, *, seed: int, block: int) -> Batch:
  """Training examples [block * EXAMPLES_PER_BLOCK, (block + 1) * EXAMPLES_PER_BLOCK)."""
  return task.generate(np.random.default_rng([seed, _TRAIN_STREAM, block]), EXAMPLES_PER_BLOCK)


def train_dataset(
  task: Task, *, seed: int, batch_size: int, rows: slice | None = None
) -> grain.MapDataset:
  """An (effectively endless) dataset of training batches; element b is batch b.

  Args:
    task: the task.
    seed: the run's seed.
    batch_size: the global batch size, a multiple of EXAMPLES_PER_BLOCK.
    rows: this process's rows of every batch (default all), whole blocks
      (`sleep_jax.parallel.mesh.process_batch_rows`).
  """
  rows = rows or slice(0, batch_size)
  for name, value in (
    ("batch size", batch_size),
    ("first row", rows.start),
    ("row end", rows.stop),
  ):
    if value % EXAMPLES_PER_BLOCK:
      raise ValueError(
        f"training data comes in blocks of {EXAMPLES_PER_BLOCK} examples; the "
        f"{name} {value} is not a multiple of it"
      )
  blocks_per_batch = batch_size // EXAMPLES_PER_BLOCK
  first = rows.start // EXAMPLES_PER_BLOCK
  count = (rows.stop - rows.start) // EXAMPLES_PER_BLOCK

  def local_rows(batch_index: int) -> Batch:
    start = batch_index * blocks_per_batch + first
    blocks = [train_block(task, seed=seed, block=start + j) for j in range(count)]
    return {name: np.concatenate([block[name] for block in blocks]) for name in blocks[0]}

  return grain.MapDataset.range(2**40).map(local_rows)


def heldout_set(task: Task, *, seed: int, num: int) -> Batch:
  """The fixed evaluation set: `num` examples from a stream independent of training."""
  return task.generate(np.random.default_rng([seed, _EVAL_STREAM]), num)


def heldout_slices(task: Task, *, seed: int, num: int) -> dict[str, Batch]:
  """The fixed evaluation set of every slice of `task` (by slice name), `num` examples each."""
  return {
    s.name: s.generate(np.random.default_rng([seed, _EVAL_STREAM, _SLICE_STREAM, s.setting]), num)
    for s in task.eval_slices
  }


def iterate_batches(examples: Batch, batch_size: int):
  """Consecutive batches of a dict of equally long arrays (the last may be smaller)."""
  num = len(next(iter(examples.values())))
  for start in range(0, num, batch_size):
    yield {k: v[start : start + batch_size] for k, v in examples.items()}
