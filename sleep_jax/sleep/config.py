"""Typed sleep configuration and the static chunk schedule it implies for a sequence length.

All checks run in plain Python on static values, so bad settings fail before any compilation.
"""

from __future__ import annotations

import dataclasses

from sleep_jax.model.config import FAST_WEIGHT_KINDS, mixer_kind
from sleep_jax.typed_config import dataclass_from_section

EVICTIONS = ("hard", "sliding", "none")
HALTS = ("never", "converge", "learned")
# halt="learned": a row halts once its halting probabilities add up to 1 - HALT_EPSILON (ACT's
# epsilon: a single pass can halt a row without a probability of exactly one).
HALT_EPSILON = 0.01
CONV_STATES = ("reset", "carry")


@dataclasses.dataclass(frozen=True)
class Chunk:
  """One chunk of the schedule: tokens [start, stop); `predict`: it carries loss (logits)."""

  start: int
  stop: int
  predict: bool

  @property
  def length(self) -> int:
    return self.stop - self.start


@dataclasses.dataclass(frozen=True)
class SleepConfig:
  """How a sequence is consolidated. See configs/rule110.py for every field.

  The sequence is cut into chunks of L tokens from its start (the last may be shorter). A chunk
  without loss is slept on: N passes of the stack from the incoming state. A chunk with loss is
  predicted: one pass ("wake") gives its logits. What crosses into the next chunk is the fast
  state (and with conv_state="carry" the convolutions' tails) after the chunk's last pass; with
  predict_then_sleep, a predicted chunk is also slept on (N passes from the same incoming
  state), and the slept state crosses.

  Attributes:
    passes: N, recurrent passes of the block stack over every slept chunk (N=1: plain hybrid).
    window: L, the attention window and chunk length.
    eviction: "hard" (attention sees its own chunk only; after a chunk its KV is dropped),
      "sliding" (paper section 6.4: the KV of a chunk's last L-1 tokens, from its last pass,
      stays visible to every pass over the next chunk, under a sliding causal mask of width L;
      older tokens leave) or "none" (the full-attention reference: one pass over the whole
      sequence, attention sees everything; `window` is unused and `passes` must be 1).
    context_len: tokens before the first predicted token; a multiple of `window` (with "none":
      the positions before the first whose logits are reported).
    predict_chunks: indices of the chunks with loss; None: every chunk from context_len on.
      When given, the first must start at context_len (interleave sleep and prediction chunks).
    predict_then_sleep: also sleep on every predicted chunk (language-model training with loss
      on every chunk: context_len=0).
    conv_state: "reset" (the short convolutions start from zeros in every chunk and pass, the
      paper's convention) or "carry" (every pass over a chunk starts from the tails of the
      previous chunk's last pass).
    grad_passes: backprop through the last k passes of every slept chunk only (None: all).
    remat: wrap every sleep pass in `jax.checkpoint` (recompute activations in the backward).
    unroll: run the loops over chunks and over passes as straight-line code (`lax.scan`
      unrolled) instead of XLA while loops. Same values; on a GPU the step launches far fewer
      kernels (XLA fuses across chunks and passes, and no loop sums parameter gradients, stacks
      saved activations or copies per iteration): the paper's Rule 110 step 2,214 -> 1,394
      kernels with remat off (bench/train_step.py). The program, and its compile time, grow
      with chunks x passes.
    halt: when a row stops sleeping on a window. "never": every window gets `passes` passes
      (the paper). "converge": after pass n a row stops once r_n < halt_tol, r_n the largest,
      over gated-delta blocks, of ||S_n - S_(n-1)||_F / max(||S_(n-1)||_F, 1e-12); `passes` is
      then the most a window may get, and every window gets at least one. Rows halt
      independently; a halted row keeps its state. "learned": adaptive computation time
      (Graves 2016) with the model's halting unit (model.halting_unit): after pass n a row's
      unit gives a halting probability; the row stops at the first pass where these add up to
      1 - HALT_EPSILON (or at `passes`), and what crosses the window is the probability-weighted
      mean of its passes' states (the last one weighted by what remains). The same rule in
      training and at inference, so inference may stop where every row halted.
    halt_tol: the relative state change below which halt="converge" stops a row (0: never
      stops; inf: stops after the first pass).
    ponder_cost: under halt="learned", the training loss adds this times the expected number
      of passes per slept window (sum over n of n times pass n's weight, mean over windows).
  """

  passes: int = 1
  window: int = 24
  eviction: str = "hard"
  context_len: int = 96
  predict_chunks: tuple[int, ...] | None = None
  predict_then_sleep: bool = False
  conv_state: str = "reset"
  grad_passes: int | None = None
  remat: bool = True
  unroll: bool = False
  halt: str = "never"
  halt_tol: float = 0.0
  ponder_cost: float = 0.0

  def __post_init__(self):
    if self.predict_chunks is not None:  # config files give lists
      object.__setattr__(self, "predict_chunks", tuple(int(i) for i in self.predict_chunks))
    if self.passes < 1:
      raise ValueError(f"sleep.passes (N) must be >= 1, got {self.passes}")
    if self.window < 1:
      raise ValueError(f"sleep.window (L) must be >= 1, got {self.window}")
    if self.eviction not in EVICTIONS:
      raise ValueError(f"unknown sleep.eviction={self.eviction!r}; use one of {EVICTIONS}")
    if self.conv_state not in CONV_STATES:
      raise ValueError(f"unknown sleep.conv_state={self.conv_state!r}; use one of {CONV_STATES}")
    if self.halt not in HALTS:
      raise ValueError(f"unknown sleep.halt={self.halt!r}; use one of {HALTS}")
    if not self.halt_tol >= 0:  # also refuses NaN
      raise ValueError(f"sleep.halt_tol must be >= 0, got {self.halt_tol}")
    if not self.ponder_cost >= 0:
      raise ValueError(f"sleep.ponder_cost must be >= 0, got {self.ponder_cost}")
    if self.halt != "never" and self.grad_passes is not None:
      raise ValueError(
        f"sleep.halt={self.halt!r} runs every pass with gradients: leave sleep.grad_passes=None"
      )
    if self.halt != "never" and not self.evicts:
      raise ValueError(
        f"sleep.halt={self.halt!r} decides how long to sleep on a window, but "
        "sleep.eviction='none' sleeps on nothing: use halt='never'"
      )
    if self.eviction == "none":
      if self.passes != 1:
        raise ValueError(
          f"sleep.eviction='none' sleeps on nothing (one pass over the whole "
          f"sequence), so sleep.passes must be 1, got {self.passes}"
        )
      if self.predict_chunks is not None or self.predict_then_sleep:
        raise ValueError(
          "sleep.eviction='none' has no chunks: leave sleep.predict_chunks=None and "
          "sleep.predict_then_sleep=False"
        )
    if self.context_len < 0:
      raise ValueError(f"sleep.context_len must be >= 0, got {self.context_len}")
    if self.evicts and self.context_len % self.window:
      raise ValueError(
        f"sleep.window={self.window} does not tile sleep.context_len="
        f"{self.context_len}: the context must be a whole number of windows"
      )
    chunks = self.predict_chunks
    if chunks is not None:
      if not chunks or list(chunks) != sorted(set(chunks)) or chunks[0] < 0:
        raise ValueError(
          f"sleep.predict_chunks={chunks} must be distinct chunk indices >= 0 in increasing order"
        )
      if chunks[0] * self.window != self.context_len:
        raise ValueError(
          f"sleep.predict_chunks starts at chunk {chunks[0]} (token "
          f"{chunks[0] * self.window}), but sleep.context_len={self.context_len}: set "
          f"sleep.context_len={chunks[0] * self.window}"
        )
    if self.grad_passes is not None and not 1 <= self.grad_passes <= self.passes:
      raise ValueError(
        f"sleep.grad_passes={self.grad_passes} must be in [1, passes={self.passes}] "
        "or None (all passes)"
      )

  def check_model(self, model_cfg) -> None:
    """Raises unless the model (a `ModelConfig`) can sleep by this halting rule."""
    if self.halt == "never":
      return
    if not any(mixer_kind(letter) in FAST_WEIGHT_KINDS for letter in model_cfg.pattern):
      raise ValueError(
        f"sleep.halt={self.halt!r} halts on the fast state, but model.pattern="
        f"{model_cfg.pattern!r} has no gated-delta block: use sleep.halt='never'"
      )
    if self.halt == "learned" and not model_cfg.halting_unit:
      raise ValueError(
        "sleep.halt='learned' reads the model's halting unit: set model.halting_unit=True"
      )

  @property
  def evicts(self) -> bool:
    """Whether the sequence is cut into chunks that are slept on and evicted."""
    return self.eviction != "none"

  @property
  def frozen_passes(self) -> int:
    """Leading passes of every slept chunk that gradients do not flow through."""
    return 0 if self.grad_passes is None else self.passes - self.grad_passes

  def check_sequence(self, seq_len: int) -> None:
    """Raises unless a sequence of `seq_len` tokens fits the schedule."""
    if seq_len <= self.context_len:
      raise ValueError(
        f"a sequence of {seq_len} tokens leaves no prediction positions after "
        f"sleep.context_len={self.context_len}"
      )
    num_chunks = -(-seq_len // self.window)
    if self.evicts and self.predict_chunks and self.predict_chunks[-1] >= num_chunks:
      raise ValueError(
        f"sleep.predict_chunks={self.predict_chunks} names chunk {self.predict_chunks[-1]}, "
        f"but a sequence of {seq_len} tokens has {num_chunks} chunks of {self.window}"
      )

  def chunks(self, seq_len: int) -> tuple[Chunk, ...]:
    """The static chunk schedule of a `seq_len`-token sequence (one chunk without eviction)."""
    self.check_sequence(seq_len)
    if not self.evicts:
      return (Chunk(0, seq_len, predict=True),)
    starts = range(0, seq_len, self.window)
    predicted = (
      set(self.predict_chunks)
      if self.predict_chunks is not None
      else {i for i, start in enumerate(starts) if start >= self.context_len}
    )
    return tuple(
      Chunk(start, min(start + self.window, seq_len), predict=i in predicted)
      for i, start in enumerate(starts)
    )

  def predicted_spans(self, seq_len: int) -> tuple[tuple[int, int], ...]:
    """[start, stop) of the positions that get logits, adjacent chunks merged, in order."""
    if not self.evicts:
      return ((self.context_len, seq_len),)
    spans: list[list[int]] = []
    for chunk in self.chunks(seq_len):
      if not chunk.predict:
        continue
      if spans and spans[-1][1] == chunk.start:
        spans[-1][1] = chunk.stop
      else:
        spans.append([chunk.start, chunk.stop])
    return tuple((start, stop) for start, stop in spans)

  @classmethod
  def from_config(cls, config) -> SleepConfig:
    """Builds from `config.sleep` as it comes out of a config file (unknown keys are an error)."""
    return dataclass_from_section(cls, config, "sleep")


def training_flops_ratio(passes: int, context_len: int, window: int, seq_len: int) -> float:
  """Tokens pushed through the block stack per example, relative to N=1 (hard eviction).

  A sleeping model runs N passes over each of the context's windows and one over the
  prediction chunk, so a compute-matched N=1 baseline trains this many times more steps.

  Args:
    passes: N.
    context_len: tokens slept on before the prediction chunk.
    window: L (checked to tile the context).
    seq_len: tokens per example.

  Returns:
    (passes * context_len + predict_len) / (context_len + predict_len).
  """
  SleepConfig(passes=passes, window=window, context_len=context_len).check_sequence(seq_len)
  predict_len = seq_len - context_len
  return (passes * context_len + predict_len) / (context_len + predict_len)
