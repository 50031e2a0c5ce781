"""The Rule 110 task (PAPER.md section 4): predict cells of four strings after t steps.

One example, 100 tokens:
  tokens[24*i : 24*(i+1)]  string i, cells as tokens 0/1 (i = 0..3)   -> four sleep chunks
  tokens[96 + i]           query token Q(i+1) = 2 + i                  -> the prediction chunk
  targets[96 + i]          cell 0 of string i after `depth` Rule 110 steps (periodic boundary)
  loss_mask                1 exactly at positions 96..99

Rule 110 (ours: periodic boundary, cell 0 leftmost): new[i] = bit p of the number 110 where
p = 4*old[i-1] + 2*old[i] + old[i+1], indices mod the string length.
"""

from __future__ import annotations

import functools

import numpy as np

NUM_STRINGS = 4
STRING_LEN = 24
CONTEXT_LEN = NUM_STRINGS * STRING_LEN  # 96
SEQ_LEN = CONTEXT_LEN + NUM_STRINGS  # 100
QUERY_TOKENS = tuple(range(2, 2 + NUM_STRINGS))  # Q1..Q4 = 2..5
VOCAB_SIZE = 2 + NUM_STRINGS  # 6
NUM_LABEL_CLASSES = 2  # answers are cells: token 0 or 1 (guessing all four: 1/16; see
# majority_baseline for the floor that counts)
RULE = 110


def step(cells: np.ndarray) -> np.ndarray:
  """One Rule 110 step along the last axis (periodic boundary); any leading shape."""
  cells = np.asarray(cells)
  pattern = 4 * np.roll(cells, 1, axis=-1) + 2 * cells + np.roll(cells, -1, axis=-1)
  return ((RULE >> pattern) & 1).astype(cells.dtype)


def rollout(cells: np.ndarray, depth: int) -> np.ndarray:
  """The cells after `depth` steps of Rule 110 (depth 0 returns the input)."""
  _check_depth(depth)
  for _ in range(depth):
    cells = step(cells)
  return np.asarray(cells)


def _check_depth(depth: int) -> None:
  if depth < 0:
    raise ValueError(f"rule110 depth must be >= 0, got {depth}")


def _draw_strings(rng: np.random.Generator, num: int) -> np.ndarray:
  return rng.integers(0, 2, size=(num, NUM_STRINGS, STRING_LEN), dtype=np.int32)


def mixed_vocab_size(num_depths: int) -> int:
  """Tokens of a mixed-depth task: the 6 of one depth and a pair of cell tokens per depth."""
  return VOCAB_SIZE + 2 * num_depths


def cells_of(tokens: np.ndarray) -> np.ndarray:
  """The strings [num, 4, 24] (cells 0/1) of examples' tokens, in any depth's alphabet."""
  return (tokens[:, :CONTEXT_LEN] % 2).reshape(len(tokens), NUM_STRINGS, STRING_LEN)


def _examples(
  strings: np.ndarray, labels: np.ndarray, alphabet: np.ndarray | None = None
) -> dict[str, np.ndarray]:
  """The token layout of the module docstring: strings [num, 4, 24] and labels [num, 4].

  With `alphabet` [num] (mixed depths: the index of each example's depth in `task.depths`),
  cell c of an example is written as token VOCAB_SIZE + 2 * alphabet + c, so every window the
  model sleeps on shows the depth its labels are at; labels stay the tokens 0 and 1."""
  num = len(strings)
  tokens = np.empty((num, SEQ_LEN), np.int32)
  context = strings.reshape(num, CONTEXT_LEN)
  if alphabet is not None:
    context = context + VOCAB_SIZE + 2 * np.asarray(alphabet, np.int32)[:, None]
  tokens[:, :CONTEXT_LEN] = context
  tokens[:, CONTEXT_LEN:] = QUERY_TOKENS
  targets = np.zeros((num, SEQ_LEN), np.int32)
  targets[:, CONTEXT_LEN:] = labels
  loss_mask = np.zeros((num, SEQ_LEN), np.float32)
  loss_mask[:, CONTEXT_LEN:] = 1.0
  return {"tokens": tokens, "targets": targets, "loss_mask": loss_mask}


def generate(rng: np.random.Generator, num: int, depth: int) -> dict[str, np.ndarray]:
  """`num` independent examples at reasoning depth `depth`.

  Args:
    rng: the random generator (the only source of randomness).
    num: number of examples.
    depth: t, the number of Rule 110 steps between the strings and their labels.

  Returns:
    dict of numpy arrays [num, 100]: "tokens" int32, "targets" int32, "loss_mask" float32.
  """
  _check_depth(depth)
  strings = _draw_strings(rng, num)
  return _examples(strings, rollout(strings, depth)[..., 0])


def labels_at_depths(strings: np.ndarray, depths: np.ndarray) -> np.ndarray:
  """Cell 0 of each example's strings after that example's own number of steps.

  One rollout of the whole block up to the deepest depth, keeping each row's labels at the
  step it asked for: max(depths) vectorised steps, not one rollout per example.

  Args:
    strings: [num, 4, 24] cells.
    depths: [num] steps per example (>= 0).

  Returns:
    [num, 4] labels.
  """
  depths = np.asarray(depths)
  labels = strings[..., 0].copy()  # depth 0
  cells = strings
  for t in range(1, int(depths.max(initial=0)) + 1):
    cells = step(cells)
    at_t = depths == t
    labels[at_t] = cells[at_t, :, 0]
  return labels


def sample_mixed(
  rng: np.random.Generator, num: int, depths: tuple[int, ...]
) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """`num` examples, each at a depth drawn uniformly from `depths`, and the depth each drew.

  The depth is not a hidden variable: each example's cells are written in its depth's own
  pair of tokens (`_examples`), so a model can tell, while it sleeps on the strings, how deep
  the question will be (without that the labels of one string would be a mixture of depths,
  and no amount of sleep could choose between them). The strings are drawn as `generate`
  draws them, then every example's depth by one more call of `rng`.

  Args:
    rng: the random generator (the only source of randomness).
    num: number of examples.
    depths: the distinct depths t (>= 0) to draw from.

  Returns:
    (the examples as `generate` returns them, int32 [num] the depth of each).
  """
  depths = tuple(int(t) for t in depths)
  if not depths or len(set(depths)) != len(depths):
    raise ValueError(f"rule110 mixed depths must be distinct and non-empty, got {depths}")
  for t in depths:
    _check_depth(t)
  strings = _draw_strings(rng, num)
  alphabet = rng.integers(0, len(depths), size=num)
  drawn = np.asarray(depths, np.int32)[alphabet]
  return _examples(strings, labels_at_depths(strings, drawn), alphabet), drawn


def generate_marked(
  rng: np.random.Generator, num: int, depth: int, depths: tuple[int, ...]
) -> dict[str, np.ndarray]:
  """`num` examples at depth `depth`, one of a mixed task's `depths`, written in its alphabet
  (a mixed-depth model's per-depth evaluation set)."""
  depths = tuple(int(t) for t in depths)
  if depth not in depths:
    raise ValueError(f"rule110 depth {depth} is not one of the mixed depths {depths}")
  strings = _draw_strings(rng, num)
  alphabet = np.full((num,), depths.index(depth))
  return _examples(strings, rollout(strings, depth)[..., 0], alphabet)


def generate_mixed(
  rng: np.random.Generator, num: int, depths: tuple[int, ...]
) -> dict[str, np.ndarray]:
  """`sample_mixed`'s examples alone: the task's generator when `task.depths` is set."""
  return sample_mixed(rng, num, depths)[0]


def majority_exact_accuracy(labels: np.ndarray) -> float:
  """Exact accuracy of the best constant answer: the majority label at each of the 4 queries.

  Rule 110's labels are unbalanced (about 56% ones at t=32), so this floor sits above the 1/16
  of guessing: a model at it has learnt the label marginals, nothing about the strings.

  Args:
    labels: [num, 4] labels (0/1) of a set of examples.
  """
  majority = (2 * labels.sum(axis=0) >= labels.shape[0]).astype(labels.dtype)  # ties: 1
  return float(np.mean(np.all(labels == majority, axis=1)))


@functools.cache  # a report asks for a depth's floor in its tables and again in its figures
def majority_baseline(depth: int | tuple[int, ...], num: int = 50_000, seed: int = 0) -> float:
  """`majority_exact_accuracy` at depth t, on `num` fresh examples (50k: +-0.15% at 10%).

  A tuple of depths is a mixed-depth set (`generate_mixed`), the floor of a run trained on
  `task.depths`: one constant answer for every depth, so it may lie below each depth's own.
  """
  if isinstance(depth, tuple):
    examples = generate_mixed(np.random.default_rng([seed, len(depth), *depth]), num, depth)
  else:
    examples = generate(np.random.default_rng([seed, depth]), num, depth)
  return majority_exact_accuracy(examples["targets"][:, CONTEXT_LEN:])
