"""Typed sleep configuration and the static chunk schedule it implies for a sequence length.

All checks run in plain Python on static values, so bad settings fail before any compilation.
"""

from __future__ import annotations

import dataclasses

from sleep_jax.typed_config import dataclass_from_section

EVICTIONS_IMPLEMENTED = ("hard", "none")
EVICTIONS_PLANNED = ("sliding",)


@dataclasses.dataclass(frozen=True)
class SleepConfig:
  """How a sequence is consolidated. See configs/rule110.py for every field.

  Attributes:
    passes: N, recurrent passes of the block stack over every evicted window (N=1: plain hybrid).
    window: L, the attention window; the context is cut into consecutive chunks of L tokens.
    eviction: "hard" (after sleeping on a window its KV is dropped entirely) or "none" (the
      full-attention reference: no sleep chunks, one pass over the whole sequence, attention
      sees everything; `window` is unused and `passes` must be 1).
    context_len: tokens before the prediction chunk; a multiple of `window` (with "none": the
      positions before the first whose logits are reported).
    grad_passes: backprop through the last k passes of every window only (None: all passes).
    remat: wrap every pass in `jax.checkpoint` (recompute activations in the backward pass).
  """

  passes: int = 1
  window: int = 24
  eviction: str = "hard"
  context_len: int = 96
  grad_passes: int | None = None
  remat: bool = True

  def __post_init__(self):
    if self.passes < 1:
      raise ValueError(f"sleep.passes (N) must be >= 1, got {self.passes}")
    if self.window < 1:
      raise ValueError(f"sleep.window (L) must be >= 1, got {self.window}")
    if self.eviction in EVICTIONS_PLANNED:
      raise ValueError(
        f"sleep.eviction={self.eviction!r} is not implemented yet; "
        f"use one of {EVICTIONS_IMPLEMENTED}"
      )
    if self.eviction not in EVICTIONS_IMPLEMENTED:
      raise ValueError(
        f"unknown sleep.eviction={self.eviction!r}; use one of {EVICTIONS_IMPLEMENTED}"
      )
    if self.eviction == "none" and self.passes != 1:
      raise ValueError(
        f"sleep.eviction='none' sleeps on nothing (one pass over the whole "
        f"sequence), so sleep.passes must be 1, got {self.passes}"
      )
    if self.context_len < 0:
      raise ValueError(f"sleep.context_len must be >= 0, got {self.context_len}")
    if self.evicts and self.context_len % self.window:
      raise ValueError(
        f"sleep.window={self.window} does not tile sleep.context_len="
        f"{self.context_len}: the context must be a whole number of windows"
      )
    if self.grad_passes is not None and not 1 <= self.grad_passes <= self.passes:
      raise ValueError(
        f"sleep.grad_passes={self.grad_passes} must be in [1, passes={self.passes}] "
        "or None (all passes)"
      )

  @property
  def evicts(self) -> bool:
    """Whether the context is cut into windows that are slept on and evicted."""
    return self.eviction != "none"

  @property
  def num_sleep_chunks(self) -> int:
    return self.context_len // self.window if self.evicts else 0

  @property
  def frozen_passes(self) -> int:
    """Leading passes of every window that gradients do not flow through."""
    return 0 if self.grad_passes is None else self.passes - self.grad_passes

  def check_sequence(self, seq_len: int) -> None:
    """Raises unless a sequence of `seq_len` tokens fits the schedule (context + one chunk)."""
    predict_len = seq_len - self.context_len
    if not self.evicts:  # one chunk over the whole sequence: the window does not bound it
      if predict_len < 1:
        raise ValueError(
          f"a sequence of {seq_len} tokens leaves no prediction positions after "
          f"sleep.context_len={self.context_len}"
        )
      return
    if not 1 <= predict_len <= self.window:
      raise ValueError(
        f"a sequence of {seq_len} tokens with sleep.context_len={self.context_len} leaves a "
        f"prediction chunk of {predict_len} tokens; it must hold 1..window={self.window} tokens"
      )

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
    window: L (checked to tile the context and to hold the prediction chunk).
    seq_len: tokens per example.

  Returns:
    (passes * context_len + predict_len) / (context_len + predict_len).
  """
  SleepConfig(passes=passes, window=window, context_len=context_len).check_sequence(seq_len)
  predict_len = seq_len - context_len
  return (passes * context_len + predict_len) / (context_len + predict_len)
