"""Masked cross-entropy and accuracies over the prediction chunk.

`prediction_sums` returns additive sums so that metrics over many batches (and devices) are
exact: summarise the element-wise total with `summarize`.
  loss           mean cross-entropy over loss-carrying tokens
  accuracy       fraction of loss-carrying tokens predicted right (argmax)
  exact_accuracy fraction of examples with every loss-carrying token right (Rule 110: all 4 labels)
  label_accuracy/i  accuracy at the i-th position of the prediction chunk (Rule 110: label i)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax


def prediction_sums(logits_bpv: jax.Array, targets_bp: jax.Array, mask_bp: jax.Array) -> dict:
  """Additive sums of the masked loss and correctness over a batch.

  Args:
    logits_bpv: float32 logits of the prediction chunk [B, P, vocab].
    targets_bp: int targets at the same positions [B, P].
    mask_bp: loss mask [B, P] (1 where a token carries loss).

  Returns:
    dict of float32 sums: loss, tokens, correct, exact, examples, and per-position
    position_correct [P] and position_tokens [P].
  """
  mask = mask_bp.astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits_bpv, targets_bp)
  right = (jnp.argmax(logits_bpv, axis=-1) == targets_bp).astype(jnp.float32) * mask
  has_loss = jnp.sum(mask, axis=1) > 0
  all_right = jnp.all((right > 0) | (mask == 0), axis=1) & has_loss
  return {
      "loss": jnp.sum(ce * mask),
      "tokens": jnp.sum(mask),
      "correct": jnp.sum(right),
      "exact": jnp.sum(all_right.astype(jnp.float32)),
      "examples": jnp.sum(has_loss.astype(jnp.float32)),
      "position_correct": jnp.sum(right, axis=0),
      "position_tokens": jnp.sum(mask, axis=0),
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
  for i, (right, count) in enumerate(zip(sums["position_correct"], sums["position_tokens"])):
    if count > 0:
      out[f"label_accuracy/{i}"] = float(right / count)
  return out


def add_sums(a: dict | None, b: dict) -> dict:
  return b if a is None else jax.tree.map(lambda x, y: x + y, a, b)
