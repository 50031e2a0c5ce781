"""GSM-Infinite as a token task: question first, then the context, then the answer (no chain of thought).

An example is the text "<question> <context> Answer:" followed by " <answer>" and the end token,
tokenised with a checkpoint's own tokenizer (its tokenizer.json, read by the `tokenizers`
library), left-padded to a fixed length, so the answer always ends the sequence and lies in the
last window (the prediction chunk; everything before it is slept on). Loss falls on the answer
tokens and the end token only; accuracy is the whole answer right (one answer word per example,
`answer_id` 0 at its positions). Problems whose text does not fit are skipped and redrawn, so
a batch is still a pure function of its random stream.

`word_level_tokenizer` builds a small whitespace tokenizer over the generator's own vocabulary,
for training from scratch where no checkpoint tokenizer is at hand (and for tests).
"""

from __future__ import annotations

import functools
import os
import tempfile

import numpy as np

from sleep_jax import paths
from sleep_jax.data import gsm_infinite

PAD, END = "<pad>", "</s>"
ANSWER_CUE = " Answer:"


@functools.lru_cache(maxsize=8)
def load_tokenizer(path: str):
  """A `tokenizers.Tokenizer` from a tokenizer.json, local or gs:// (cached per path)."""
  from tokenizers import Tokenizer

  if paths.is_remote(path):
    return Tokenizer.from_str(paths.read_text(path))
  return Tokenizer.from_file(path)


def tokenizer_path(spec: str) -> str:
  """The tokenizer.json of `task.tokenizer`: a path, or "word_level" (built once, cached)."""
  if spec != "word_level":
    return spec
  path = os.path.join(tempfile.gettempdir(), "sleep_jax_gsm_word_level_v1.json")
  if not os.path.exists(path):
    partial = f"{path}.{os.getpid()}.partial"
    word_level_tokenizer(partial)
    os.replace(partial, path)  # atomic: concurrent processes write the same content
  return path


def token_counter(path: str):
  """len(tokens) of a text under the tokenizer at `path` (the length measure for padding)."""
  tokenizer = load_tokenizer(path)
  return lambda text: len(tokenizer.encode(text, add_special_tokens=False).ids)


def special_ids(tokenizer) -> tuple[int, int]:
  """(pad id, end id): the tokenizer's own pad and end-of-sequence tokens, by common names."""

  def first(names):
    for name in names:
      token_id = tokenizer.token_to_id(name)
      if token_id is not None:
        return token_id
    return None

  end = first((END, "<|endoftext|>", "<|im_end|>", "<eos>", "[SEP]"))
  pad = first((PAD, "<|endoftext|>", "[PAD]", "<unk>"))
  if end is None or pad is None:
    raise ValueError(
      "the tokenizer has no end-of-sequence or pad token among the usual names "
      f"({END}, <|endoftext|>, <eos>, {PAD}, ...)"
    )
  return pad, end


def encode(tokenizer, problem: dict) -> tuple[list[int], list[int]]:
  """(prompt ids, answer ids + end id) of one problem."""
  prompt = problem["question"] + " " + problem["context"] + ANSWER_CUE
  _, end = special_ids(tokenizer)
  answer = tokenizer.encode(f" {problem['answer']}", add_special_tokens=False).ids
  return tokenizer.encode(prompt, add_special_tokens=False).ids, [*answer, end]


def generate(
  rng: np.random.Generator,
  num: int,
  *,
  tokenizer_path: str,
  seq_len: int,
  problem_settings: dict,
) -> dict[str, np.ndarray]:
  """`num` tokenised examples [num, seq_len]: tokens, targets, loss_mask, answer_id.

  Args:
    rng: the random stream.
    num: examples.
    tokenizer_path: the tokenizer.json to tokenise with.
    seq_len: fixed length; examples are left-padded to it, longer ones redrawn.
    problem_settings: keyword arguments of `gsm_infinite.generate_problems` (family, ops, ...).
  """
  tokenizer = load_tokenizer(tokenizer_path)
  pad, _ = special_ids(tokenizer)
  tokens = np.full((num, seq_len), pad, np.int32)
  answer_id = np.full((num, seq_len), -1, np.int32)
  row, tries = 0, 0
  while row < num:
    (problem,) = gsm_infinite.generate_problems(rng, 1, **problem_settings)
    prompt, answer = encode(tokenizer, problem)
    tries += 1
    if len(prompt) + len(answer) > seq_len:
      if tries > 20 * num + 100:
        raise ValueError(
          f"GSM-Infinite problems do not fit task.seq_len={seq_len} tokens; raise it or "
          "lower task.target_length"
        )
      continue
    ids = prompt + answer
    tokens[row, seq_len - len(ids) :] = ids
    # Position p predicts token p+1: the positions before each answer token (and the end).
    answer_id[row, seq_len - len(answer) - 1 : seq_len - 1] = 0
    row += 1
  targets = np.zeros_like(tokens)
  targets[:, :-1] = np.where(answer_id[:, :-1] >= 0, tokens[:, 1:], 0)
  return dict(
    tokens=tokens,
    targets=targets,
    loss_mask=(answer_id >= 0).astype(np.float32),
    answer_id=answer_id,
  )


def word_level_tokenizer(path: str, *, families=gsm_infinite.FAMILIES) -> str:
  """Writes a small word-level tokenizer.json covering the generator's text; returns the path.

  Words are split off punctuation and numbers into single digits ("V123." is "V", "1", "2",
  "3", "."), so any number and any variable name is in the vocabulary.
  """
  from tokenizers import Tokenizer, models, pre_tokenizers

  split = pre_tokenizers.Sequence(
    [pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)]
  )
  words = {PAD, END, *"0123456789", *".:-+*="}
  rng = np.random.default_rng(0)
  for family in families:
    for modulus in (None, 7):
      for problem in gsm_infinite.generate_problems(
        rng, 50, family=family, ops=(1, 8), target_length=400, modulus=modulus
      ):
        text = problem["question"] + " " + problem["context"] + ANSWER_CUE
        words.update(word for word, _ in split.pre_tokenize_str(text))
  ordered = [PAD, END, *sorted(words - {PAD, END})]
  tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(ordered)}, unk_token=PAD))
  tokenizer.pre_tokenizer = split
  tokenizer.save(path)
  return path
