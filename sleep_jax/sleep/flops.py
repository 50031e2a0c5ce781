"""Model FLOPs of a whole sequence and of a training step under the sleep schedule.

The per-chunk counts of the blocks are `sleep_jax.model.flops` (its conventions: matmul work
only, the causal half of attention, the chunked gated delta rule). This module adds what only
the schedule knows: N passes over every slept window, one over every predicted chunk, the head
over predicted positions, and the passes `sleep.grad_passes` runs forward only.

  * A training step is forward + backward = 3x the forward pass of everything gradients flow
    through, and 1x for the passes that `sleep.grad_passes` runs forward only.
    Rematerialisation (`sleep.remat`, and the chunk recomputation inside the gated delta
    rule's custom VJP) is recompute, not model work, and is not counted: hardware FLOPs are
    higher than this by about one more forward pass.
"""

from __future__ import annotations

from sleep_jax.model.config import ModelConfig
from sleep_jax.model.flops import forward_flops_per_chunk, head_flops
from sleep_jax.sleep.config import SleepConfig


def _slept_chunks(sleep_cfg: SleepConfig, seq_len: int) -> list[int]:
  """Lengths of the chunks that are slept on (N passes), predicted ones included with
  predict_then_sleep."""
  return [
    chunk.length
    for chunk in sleep_cfg.chunks(seq_len)
    if not chunk.predict or sleep_cfg.predict_then_sleep
  ]


def _frozen_flops_per_example(model_cfg: ModelConfig, sleep_cfg: SleepConfig, seq_len: int) -> int:
  """Forward FLOPs of the passes `grad_passes` leaves without a backward pass."""
  if not sleep_cfg.evicts:
    return 0
  loop_only = lambda length, passes: (
    forward_flops_per_chunk(model_cfg, length, loop_passes=passes)
    - forward_flops_per_chunk(model_cfg, length, loop_passes=0)
  )
  return sum(
    loop_only(length, sleep_cfg.frozen_passes) for length in _slept_chunks(sleep_cfg, seq_len)
  )


def forward_flops_per_example(
  model_cfg: ModelConfig, sleep_cfg: SleepConfig, *, seq_len: int
) -> int:
  """Forward FLOPs of `sleep_forward` on one sequence of `seq_len` tokens.

  With eviction: N passes of the stack over each slept chunk, one pass over each predicted
  chunk (plus N more with predict_then_sleep), and the head over the predicted positions.
  Under sliding eviction attention also reads the L-1 remembered tokens; that part of the
  attention cost (two [T, L-1] score and value matmuls per head) is not counted. Eviction
  "none": one pass over the whole sequence (attention sees all of it), and the head over the
  positions after `context_len`.

  Every pass counts the whole stack, as the schedule's `lax.scan` over passes runs it. Only
  the fast-state writes of a window's last pass are used, though: with N = 1 and a pattern
  with no repetition (R = 1) both scans have one step, XLA inlines them and drops the rest as
  dead code (the blocks after the last gated-delta block, and that block's q, out_gate and o
  projections and read-out matmuls), so there the step runs less matmul work than this count.
  With R > 1 (the Rule 110 configs' "AGAG" is "AG" twice) the stack is a loop that runs its
  body in full: nothing is dropped.

  Args:
    model_cfg: the model configuration.
    sleep_cfg: the sleep schedule (passes N, window L, eviction, context_len).
    seq_len: tokens per sequence (checked against the schedule).

  Returns:
    Forward FLOPs for one sequence.

  Raises:
    ValueError: `seq_len` does not fit the schedule.
  """
  sleep_cfg.check_sequence(seq_len)
  if not sleep_cfg.evicts:
    predict_len = seq_len - sleep_cfg.context_len
    return forward_flops_per_chunk(model_cfg, seq_len) + head_flops(model_cfg, predict_len)
  sleep = sum(
    forward_flops_per_chunk(model_cfg, length, loop_passes=sleep_cfg.passes)
    for length in _slept_chunks(sleep_cfg, seq_len)
  )
  wake = sum(
    forward_flops_per_chunk(model_cfg, chunk.length) + head_flops(model_cfg, chunk.length)
    for chunk in sleep_cfg.chunks(seq_len)
    if chunk.predict
  )
  return sleep + wake


def train_step_flops(
  model_cfg: ModelConfig, sleep_cfg: SleepConfig, *, seq_len: int, batch_size: int
) -> float:
  """Model FLOPs of one training step (forward + backward) on a batch.

  Forward + backward is 3x the forward pass (the backward costs two matmuls per forward one:
  gradients of the inputs and of the weights), except for the leading N - grad_passes passes
  of every window, which `sleep.grad_passes` runs forward only (1x). Matmul work only (see
  the module docstring); rematerialisation recompute is NOT counted, so with `sleep.remat`
  the hardware does about one more forward pass than this.

  Args:
    model_cfg: the model configuration.
    sleep_cfg: the sleep schedule.
    seq_len: tokens per sequence.
    batch_size: sequences per step (the global batch, for a whole-step count).

  Returns:
    FLOPs of one step, as a float.

  Raises:
    ValueError: `seq_len` does not fit the schedule, or `batch_size` < 1.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  forward = forward_flops_per_example(model_cfg, sleep_cfg, seq_len=seq_len)
  frozen = _frozen_flops_per_example(model_cfg, sleep_cfg, seq_len)
  return float(batch_size * (3 * (forward - frozen) + frozen))
