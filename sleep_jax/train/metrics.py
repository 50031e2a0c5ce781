"""Masked cross-entropy and accuracies over the prediction chunk.

`prediction_sums` returns additive sums so that metrics over many batches (and devices) are
exact: summarise the element-wise total with `summarize`.
  loss           mean cross-entropy over loss-carrying tokens
  accuracy       fraction of loss-carrying tokens predicted right (argmax)
  exact_accuracy fraction of examples with every loss-carrying token right (Rule 110: all 4 labels)
  label_accuracy/i  accuracy at the i-th position of the prediction chunk (Rule 110: label i);
                 with answer ids, the fraction of i-th answers right as whole words (Depo: query i)
  answer_accuracy  (with answer ids) fraction of answer words with every symbol right
  passes_mean    (adaptive halting, `window_sums`) mean passes taken per slept window
  passes_hist/n  (adaptive halting) fraction of slept windows that took exactly n passes

Answer ids group loss-carrying positions into answer words with a static layout: an int array
like the mask holding the answer's index (0 <= id < P) at its positions and -1 elsewhere.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax


def prediction_sums(
  logits_bpv: jax.Array,
  targets_bp: jax.Array,
  mask_bp: jax.Array,
  answer_ids_bp: jax.Array | None = None,
) -> dict:
  """Additive sums of the masked loss and correctness over a batch.

  Args:
    logits_bpv: float32 logits of the prediction chunk [B, P, vocab].
    targets_bp: int targets at the same positions [B, P].
    mask_bp: loss mask [B, P] (1 where a token carries loss).
    answer_ids_bp: optional int [B, P]: which answer word each loss-carrying position belongs
      to (0 <= id < P), -1 elsewhere.

  Returns:
    dict of float32 sums: loss, tokens, correct, exact, examples, and per-position
    position_correct [P] and position_tokens [P]; with answer ids also answers, answers_right
    and per answer index answer_slot_right [P] and answer_slot_count [P].
  """
  mask = mask_bp.astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits_bpv, targets_bp)
  right = (jnp.argmax(logits_bpv, axis=-1) == targets_bp).astype(jnp.float32) * mask
  has_loss = jnp.sum(mask, axis=1) > 0
  all_right = jnp.all((right > 0) | (mask == 0), axis=1) & has_loss
  sums = {
    "loss": jnp.sum(ce * mask),
    "tokens": jnp.sum(mask),
    "correct": jnp.sum(right),
    "exact": jnp.sum(all_right.astype(jnp.float32)),
    "examples": jnp.sum(has_loss.astype(jnp.float32)),
    "position_correct": jnp.sum(right, axis=0),
    "position_tokens": jnp.sum(mask, axis=0),
  }
  if answer_ids_bp is not None:
    # [B, P, A] membership with A = P answer slots (ids of -1 one-hot to zeros); an answer is
    # right when none of its loss-carrying positions is wrong.
    member = jax.nn.one_hot(answer_ids_bp, answer_ids_bp.shape[1]) * mask[..., None]
    answer_tokens = jnp.sum(member, axis=1)
    answer_wrong = jnp.einsum("bpa,bp->ba", member, mask - right)
    present = (answer_tokens > 0).astype(jnp.float32)
    answer_right = present * (answer_wrong == 0)
    sums.update(
      answers=jnp.sum(present),
      answers_right=jnp.sum(answer_right),
      answer_slot_right=jnp.sum(answer_right, axis=0),
      answer_slot_count=jnp.sum(present, axis=0),
    )
  return sums


def window_sums(passes_bw: jax.Array, expected_bw: jax.Array, max_passes: int) -> dict:
  """Additive sums of how slept windows were slept on (adaptive halting).

  Args:
    passes_bw: int passes taken per row and slept window [B, W].
    expected_bw: float expected passes per row and window [B, W] (the ponder cost's).
    max_passes: N, the most a window may get.

  Returns:
    dict of float32 sums: windows (rows x windows), window_passes, expected_passes, and
    passes_count [N] (windows that took exactly n = 1..N passes).
  """
  counts = jax.nn.one_hot(passes_bw - 1, max_passes, dtype=jnp.float32)
  return {
    "windows": jnp.asarray(passes_bw.size, jnp.float32),
    "window_passes": jnp.sum(passes_bw.astype(jnp.float32)),
    "expected_passes": jnp.sum(expected_bw),
    "passes_count": jnp.sum(counts, axis=(0, 1)),
  }


def mean_loss(sums: dict) -> jax.Array:
  return sums["loss"] / jnp.maximum(sums["tokens"], 1.0)


def summarize(sums: dict) -> dict[str, float]:
  """Turns (host) sums into named metrics."""
  sums = jax.tree.map(np.asarray, sums)
  out = {
    "loss": float(sums["loss"] / max(sums["tokens"], 1.0)),
    "accuracy": float(sums["correct"] / max(sums["tokens"], 1.0)),
    "exact_accuracy": float(sums["exact"] / max(sums["examples"], 1.0)),
  }
  per_label = ("position_correct", "position_tokens")
  if "answers" in sums:
    out["answer_accuracy"] = float(sums["answers_right"] / max(sums["answers"], 1.0))
    per_label = ("answer_slot_right", "answer_slot_count")
  for i, (right, count) in enumerate(zip(*(sums[k] for k in per_label))):
    if count > 0:
      out[f"label_accuracy/{i}"] = float(right / count)
  if "windows" in sums:  # adaptive halting: passes used per slept window
    windows = max(float(sums["windows"]), 1.0)
    out["passes_mean"] = float(sums["window_passes"] / windows)
    for n, count in enumerate(sums["passes_count"], start=1):
      out[f"passes_hist/{n}"] = float(count / windows)
  return out


def add_sums(a: dict | None, b: dict) -> dict:
  return b if a is None else jax.tree.map(lambda x, y: x + y, a, b)
