"""Masked prediction metrics, and whole-word scoring of answers through answer ids."""

import jax.numpy as jnp
import numpy as np
import pytest

from sleep_jax.train.metrics import add_sums, prediction_sums, summarize

VOCAB = 5


def logits_predicting(predictions):
  return jnp.asarray(np.eye(VOCAB, dtype=np.float32)[np.asarray(predictions)] * 10.0)


def test_answer_words_are_right_only_when_every_symbol_is_right():
  # Two examples, P = 6. Example 0: answer 0 at positions 1-2 (one symbol wrong), answer 1 at
  # position 4 (right). Example 1: answer 0 at 0 (right), answer 1 at 2-3 (right).
  targets = np.array([[0, 1, 2, 0, 3, 0], [4, 0, 1, 1, 0, 0]])
  predictions = np.array([[0, 1, 0, 0, 3, 0], [4, 0, 1, 1, 2, 0]])
  answer_ids = np.array([[-1, 0, 0, -1, 1, -1], [0, -1, 1, 1, -1, -1]])
  mask = (answer_ids >= 0).astype(np.float32)
  sums = prediction_sums(
    logits_predicting(predictions), jnp.asarray(targets), jnp.asarray(mask), jnp.asarray(answer_ids)
  )
  metrics = summarize(sums)
  assert metrics["accuracy"] == pytest.approx(5 / 6)  # tokens
  assert metrics["answer_accuracy"] == 3 / 4  # words
  assert metrics["exact_accuracy"] == 1 / 2  # examples with every answer right
  assert metrics["label_accuracy/0"] == 1 / 2 and metrics["label_accuracy/1"] == 1.0
  assert "label_accuracy/2" not in metrics
  # Sums add up exactly across batches.
  doubled = summarize(add_sums(sums, sums))
  assert doubled == metrics


def test_without_answer_ids_labels_are_positions():
  targets = np.array([[1, 2], [1, 3]])
  sums = prediction_sums(
    logits_predicting([[1, 2], [1, 2]]), jnp.asarray(targets), jnp.ones((2, 2), jnp.float32)
  )
  metrics = summarize(sums)
  assert "answer_accuracy" not in metrics
  assert metrics["label_accuracy/0"] == 1.0 and metrics["label_accuracy/1"] == 0.5
  assert metrics["exact_accuracy"] == 0.5
