"""Rule 110 generator and the grain pipeline follow the DESIGN.md contract."""

import numpy as np
import pytest

from sleep_jax.data import config as config_lib
from sleep_jax.data import rule110, tasks


def rule110_by_definition(cells):
  """One step, cell by cell, straight from the rule table of 110 = 0b01101110."""
  n = len(cells)
  table = {
    (1, 1, 1): 0,
    (1, 1, 0): 1,
    (1, 0, 1): 1,
    (1, 0, 0): 0,
    (0, 1, 1): 1,
    (0, 1, 0): 1,
    (0, 0, 1): 1,
    (0, 0, 0): 0,
  }
  return [table[(cells[(i - 1) % n], cells[i], cells[(i + 1) % n])] for i in range(n)]


def test_step_matches_the_rule_table_on_random_states():
  rng = np.random.default_rng(0)
  for _ in range(50):
    cells = rng.integers(0, 2, size=24)
    assert rule110.step(cells).tolist() == rule110_by_definition(cells.tolist())


def test_rollout_works_on_any_leading_shape_and_depth_zero_is_identity():
  cells = np.random.default_rng(1).integers(0, 2, size=(3, 5, 24))
  expected = cells.copy()
  for _ in range(7):
    expected = np.array(
      [[rule110_by_definition(row) for row in block] for block in expected.tolist()]
    )
  np.testing.assert_array_equal(rule110.rollout(cells, 7), expected)
  np.testing.assert_array_equal(rule110.rollout(cells, 0), cells)


def test_generate_follows_the_token_contract():
  depth = 5
  ex = rule110.generate(np.random.default_rng(2), 64, depth)
  assert {k: (v.shape, v.dtype) for k, v in ex.items()} == {
    "tokens": ((64, 100), np.int32),
    "targets": ((64, 100), np.int32),
    "loss_mask": ((64, 100), np.float32),
  }
  assert set(np.unique(ex["tokens"][:, :96])) <= {0, 1}
  np.testing.assert_array_equal(ex["tokens"][:, 96:], np.tile([2, 3, 4, 5], (64, 1)))
  np.testing.assert_array_equal(ex["loss_mask"][:, 96:], 1.0)
  np.testing.assert_array_equal(ex["loss_mask"][:, :96], 0.0)
  for b in range(64):
    for i in range(4):
      string = ex["tokens"][b, 24 * i : 24 * (i + 1)].tolist()
      for _ in range(depth):
        string = rule110_by_definition(string)
      assert ex["targets"][b, 96 + i] == string[0]


def test_labels_are_balanced_enough_to_make_chance_one_sixteenth():
  labels = rule110.generate(np.random.default_rng(3), 4096, 32)["targets"][:, 96:]
  assert 0.3 < labels.mean() < 0.7


def test_negative_depth_and_unknown_task_are_clear_errors():
  with pytest.raises(ValueError, match="depth"):
    rule110.generate(np.random.default_rng(0), 1, -1)
  with pytest.raises(ValueError, match="depth"):
    tasks.get_task({"name": "rule110", "depth": -2})
  with pytest.raises(ValueError, match="unknown task.name='rule111'"):
    tasks.get_task({"name": "rule111", "depth": 2})


def test_training_batches_are_pure_functions_of_seed_and_index():
  task = tasks.get_task({"name": "rule110", "depth": 3})
  a = tasks.train_dataset(task, seed=7, batch_size=8)
  b = tasks.train_dataset(task, seed=7, batch_size=8)
  np.testing.assert_array_equal(a[5]["tokens"], b[5]["tokens"])
  assert not np.array_equal(a[5]["tokens"], a[6]["tokens"])
  assert not np.array_equal(
    a[5]["tokens"], tasks.train_dataset(task, seed=8, batch_size=8)[5]["tokens"]
  )


def test_iterator_state_restores_the_exact_position():
  task = tasks.get_task({"name": "rule110", "depth": 3})
  it = iter(tasks.train_dataset(task, seed=0, batch_size=8))
  next(it), next(it)
  saved = it.get_state()
  expected = [next(it)["tokens"] for _ in range(2)]
  fresh = iter(tasks.train_dataset(task, seed=0, batch_size=8))
  fresh.set_state(saved)
  for want in expected:
    np.testing.assert_array_equal(next(fresh)["tokens"], want)


def test_heldout_set_is_fixed_and_independent_of_the_training_stream():
  task = tasks.get_task({"name": "rule110", "depth": 3})
  heldout = tasks.heldout_set(task, seed=0, num=32)
  np.testing.assert_array_equal(
    heldout["tokens"], tasks.heldout_set(task, seed=0, num=32)["tokens"]
  )
  train_rows = {
    row.tobytes() for row in tasks.train_dataset(task, seed=0, batch_size=32)[0]["tokens"]
  }
  assert not train_rows & {row.tobytes() for row in heldout["tokens"]}
  batches = list(tasks.iterate_batches(heldout, 10))
  assert [len(b["tokens"]) for b in batches] == [10, 10, 10, 2]


def test_eval_depths_become_fixed_slices_at_those_depths():
  task = tasks.get_task({"name": "rule110", "depth": 3, "eval_depths": (1, 8, 1)})
  assert [(s.name, s.setting) for s in task.eval_slices] == [("depth1", 1), ("depth8", 8)]
  slices = tasks.heldout_slices(task, seed=0, num=16)
  ex = slices["depth8"]
  strings = ex["tokens"][:, :96].reshape(16, 4, 24)
  np.testing.assert_array_equal(ex["targets"][:, 96:], rule110.rollout(strings, 8)[..., 0])
  again = tasks.heldout_slices(task, seed=0, num=16)["depth8"]
  np.testing.assert_array_equal(ex["tokens"], again["tokens"])
  assert tasks.get_task({"name": "rule110", "depth": 3}).eval_slices == ()
  with pytest.raises(ValueError, match="eval_depths"):
    tasks.get_task({"name": "rule110", "depth": 3, "eval_depths": (2, -1)})


def test_the_majority_baseline_is_the_best_constant_answer_by_direct_count():
  labels = rule110.generate(np.random.default_rng(5), 4_000, 32)["targets"][
    :, rule110.CONTEXT_LEN :
  ]
  # Every one of the 16 constant answers, scored by counting exact matches.
  constants = np.array(np.meshgrid(*[[0, 1]] * 4, indexing="ij")).reshape(4, -1).T
  counts = [np.sum(np.all(labels == answer, axis=1)) for answer in constants]
  assert rule110.majority_exact_accuracy(labels) == max(counts) / len(labels)
  # Unbalanced labels put the floor well above guessing (1/16) at t=32 (the issue measured 10%).
  assert 0.09 < rule110.majority_baseline(32, num=20_000) < 0.11


def test_mixed_depths_label_each_example_at_the_depth_it_drew():
  examples, drawn = rule110.sample_mixed(np.random.default_rng(11), 256, (0, 2, 4))
  strings = rule110.cells_of(examples["tokens"])
  for t in (0, 2, 4):
    rows = drawn == t
    np.testing.assert_array_equal(
      examples["targets"][rows, 96:], rule110.rollout(strings[rows], t)[..., 0]
    )
  # Deeper labels differ from shallower ones, so the check above could fail on a wrong depth.
  assert not np.array_equal(rule110.rollout(strings, 4)[..., 0], strings[..., 0])
  np.testing.assert_array_equal(examples["tokens"][:, 96:], np.tile([2, 3, 4, 5], (256, 1)))
  np.testing.assert_array_equal(examples["loss_mask"][:, 96:], 1.0)


def test_mixed_depths_are_drawn_uniformly_and_reproducibly():
  _, drawn = rule110.sample_mixed(np.random.default_rng(12), 6_000, (1, 3, 7))
  counts = {t: int(np.sum(drawn == t)) for t in (1, 3, 7)}
  assert set(np.unique(drawn)) == {1, 3, 7}
  # 2,000 expected each; the binomial std is ~37, so +-200 fails only on a real bias.
  assert all(abs(n - 2_000) < 200 for n in counts.values()), counts
  a = rule110.generate_mixed(np.random.default_rng(13), 64, (0, 2, 4))
  b = rule110.generate_mixed(np.random.default_rng(13), 64, (0, 2, 4))
  c = rule110.generate_mixed(np.random.default_rng(14), 64, (0, 2, 4))
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])
  assert not np.array_equal(a["tokens"], c["tokens"])


def test_one_mixed_depth_is_the_single_depth_generator_in_its_own_alphabet():
  mixed = rule110.generate_mixed(np.random.default_rng(15), 32, (3,))
  single = rule110.generate(np.random.default_rng(15), 32, 3)
  for key in ("targets", "loss_mask"):
    np.testing.assert_array_equal(mixed[key], single[key])
  np.testing.assert_array_equal(mixed["tokens"][:, :96], single["tokens"][:, :96] + 6)
  np.testing.assert_array_equal(mixed["tokens"][:, 96:], single["tokens"][:, 96:])


def test_each_mixed_depth_writes_its_cells_in_its_own_two_tokens():
  """The strings show the depth (otherwise a string's labels would be a mixture of depths)."""
  depths = (0, 2, 4)
  examples, drawn = rule110.sample_mixed(np.random.default_rng(16), 512, depths)
  for index, t in enumerate(depths):
    context = examples["tokens"][drawn == t, :96]
    assert set(np.unique(context)) == {6 + 2 * index, 7 + 2 * index}
  marked = rule110.generate_marked(np.random.default_rng(17), 64, 2, depths)
  assert set(np.unique(marked["tokens"][:, :96])) == {8, 9}
  cells = rule110.cells_of(marked["tokens"])
  np.testing.assert_array_equal(marked["targets"][:, 96:], rule110.rollout(cells, 2)[..., 0])
  assert rule110.mixed_vocab_size(3) == 12 and examples["tokens"].max() < 12
  with pytest.raises(ValueError, match="not one of the mixed depths"):
    rule110.generate_marked(np.random.default_rng(0), 4, 3, depths)


def test_task_depths_mix_training_and_heldout_data_but_not_the_slices():
  task = tasks.get_task({"name": "rule110", "depth": 9, "depths": (0, 4), "eval_depths": (0, 4)})
  batch = tasks.train_dataset(task, seed=0, batch_size=64)[0]
  strings = rule110.cells_of(batch["tokens"])
  labels = batch["targets"][:, 96:]
  at_0 = np.all(labels == strings[..., 0], axis=1)
  at_4 = np.all(labels == rule110.rollout(strings, 4)[..., 0], axis=1)
  assert np.all(at_0 | at_4)  # every example is at one of the depths, none at task.depth=9
  assert at_0[~at_4].any() and at_4[~at_0].any()  # and both depths occur in one batch
  heldout = tasks.heldout_set(task, seed=0, num=64)
  strings = rule110.cells_of(heldout["tokens"])
  labels = heldout["targets"][:, 96:]
  assert not np.all(labels == strings[..., 0], axis=1).all()
  assert not np.all(labels == rule110.rollout(strings, 4)[..., 0], axis=1).all()
  slice4 = tasks.heldout_slices(task, seed=0, num=16)["depth4"]
  strings = rule110.cells_of(slice4["tokens"])
  np.testing.assert_array_equal(slice4["targets"][:, 96:], rule110.rollout(strings, 4)[..., 0])
  assert set(np.unique(slice4["tokens"][:, :96])) == {8, 9}  # depth 4's alphabet in (0, 4)
  assert task.vocab_size == 10


def test_task_depths_settings_and_bad_values():
  typed = config_lib.task_config({"name": "rule110", "depth": 2, "depths": [0, 2, 4]})
  assert typed.depths == (0, 2, 4) and typed.training_settings == {"depths": [0, 2, 4]}
  assert config_lib.task_config({"name": "rule110", "depth": 2}).training_settings == {"depth": 2}
  with pytest.raises(ValueError, match=r"task\.depths .* must be >= 0"):
    tasks.get_task({"name": "rule110", "depths": (2, -1)})
  with pytest.raises(ValueError, match=r"task\.depths must be distinct"):
    tasks.get_task({"name": "rule110", "depths": (2, 2)})
  with pytest.raises(ValueError, match=r"task\.eval_depths=\(2, 3\) must be among task\.depths"):
    tasks.get_task({"name": "rule110", "depths": (0, 2), "eval_depths": (2, 3)})
  with pytest.raises(ValueError, match="distinct and non-empty"):
    rule110.sample_mixed(np.random.default_rng(0), 4, ())


def test_the_mixed_majority_baseline_is_one_constant_answer_for_all_depths():
  labels = rule110.generate_mixed(np.random.default_rng([0, 2, 0, 4]), 50_000, (0, 4))["targets"][
    :, rule110.CONTEXT_LEN :
  ]
  assert rule110.majority_baseline((0, 4)) == rule110.majority_exact_accuracy(labels)
  # One answer for both depths scores the mean of its per-depth scores, so at most the mean of
  # the per-depth floors (within the sampling noise of the three 50k sets).
  mean_floor = (rule110.majority_baseline(0) + rule110.majority_baseline(4)) / 2
  assert rule110.majority_baseline((0, 4)) <= mean_floor + 0.005
