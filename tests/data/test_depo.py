"""Depo generator: every label follows from the token stream alone (DESIGN.md section 3)."""

import numpy as np
import pytest

from sleep_jax.data import depo, tasks


def read_word(tokens, at):
  """The word starting at `at` (symbols < 50 continue it, 50..99 end it) and the next position."""
  symbols = []
  while True:
    token = int(tokens[at])
    assert 0 <= token < 2 * depo.NUM_SYMBOLS, f"expected a word symbol at {at}, got {token}"
    at += 1
    if token >= depo.LAST_SYMBOL:
      return tuple(symbols + [token - depo.LAST_SYMBOL]), at
    symbols.append(token)


def parse(tokens):
  """(successor map of the cycle, [(k, start, answer, answer positions)]) read off one example."""
  at = 0
  while tokens[at] == depo.PAD:
    at += 1
  words = []
  while at < depo.CONTEXT_LEN:
    word, at = read_word(tokens, at)
    words.append(word)
  assert at == depo.CONTEXT_LEN and len(words) % 2 == 0
  successor = dict(zip(words[0::2], words[1::2]))
  assert len(successor) == len(words) // 2, "a node has two outgoing edges"
  queries = []
  while at < depo.SEQ_LEN and tokens[at] != depo.PAD:
    k = int(tokens[at]) - depo.HOP_BASE
    assert 1 <= k <= depo.MAX_HOPS
    start, at = read_word(tokens, at + 1)
    assert tokens[at] == depo.ANS
    answer_start = at + 1
    answer, at = read_word(tokens, answer_start)
    queries.append((k, start, answer, list(range(answer_start, at))))
  assert np.all(tokens[at:] == depo.PAD)
  return successor, queries


def follow(successor, node, hops):
  for _ in range(hops):
    node = successor[node]
  return node


def check_example(ex, b, min_nodes=depo.MIN_NODES, max_nodes=depo.MAX_NODES):
  tokens = ex["tokens"][b]
  successor, queries = parse(tokens)
  nodes = set(successor)
  # The 10 queries start at distinct nodes: no answer can be copied from an earlier query.
  assert len({start for _, start, _, _ in queries}) == depo.NUM_QUERIES
  # One cycle through every node, and every word is a distinct node of 1-2 symbols.
  assert set(successor.values()) == nodes and min_nodes <= len(nodes) <= max_nodes
  assert follow(successor, next(iter(nodes)), len(nodes)) == next(iter(nodes))
  assert len({follow(successor, next(iter(nodes)), i) for i in range(len(nodes))}) == len(nodes)
  assert all(1 <= len(word) <= 2 for word in nodes)
  assert len(queries) == depo.NUM_QUERIES
  expected_mask = np.zeros(depo.SEQ_LEN, np.float32)
  for index, (k, start, answer, positions) in enumerate(queries):
    assert start in nodes and answer == follow(successor, start, k)
    assert ex["hops"][b, index] == k
    for p in positions:  # next-token layout: position p - 1 predicts the symbol at p
      expected_mask[p - 1] = 1.0
      assert ex["targets"][b, p - 1] == tokens[p] and ex["answer_id"][b, p - 1] == index
  np.testing.assert_array_equal(ex["loss_mask"][b], expected_mask)
  np.testing.assert_array_equal(ex["answer_id"][b][expected_mask == 0], -1)
  np.testing.assert_array_equal(ex["targets"][b][expected_mask == 0], 0)
  return len(nodes), [len(word) for word in nodes]


def test_shapes_dtypes_and_token_ranges():
  ex = depo.generate(np.random.default_rng(0), 64)
  assert {k: (v.shape, v.dtype) for k, v in ex.items()} == {
    "tokens": ((64, 360), np.int32),
    "targets": ((64, 360), np.int32),
    "loss_mask": ((64, 360), np.float32),
    "answer_id": ((64, 360), np.int32),
    "hops": ((64, 10), np.int32),
  }
  assert ex["tokens"].min() >= 0 and ex["tokens"].max() < depo.VOCAB_SIZE == 118
  assert depo.SEQ_LEN == 360 and depo.CONTEXT_LEN == 300 and depo.QUERY_LEN == 60
  assert (depo.HOP_BASE + 1, depo.ANS, depo.PAD) == (100, 116, 117)
  # Nothing is predicted inside the context, so the sleep chunks carry no loss.
  assert not ex["loss_mask"][:, : depo.CONTEXT_LEN - 1].any()


def test_every_label_follows_from_the_parsed_cycle():
  ex = depo.generate(np.random.default_rng(1), 200)
  sizes, lengths = zip(*(check_example(ex, b) for b in range(200)))
  lengths = np.concatenate(lengths)
  assert 0.2 < np.mean(lengths == 1) < 0.8  # both word lengths are common
  assert max(sizes) > 60 and min(sizes) < 20
  assert set(np.unique(ex["hops"])) == set(range(1, 17))  # k ~ U{1..16}


@pytest.mark.parametrize(
  "hops, min_nodes, max_nodes", [(1, 10, 10), (16, 75, 75), (5, 10, 12), (16, 10, 20)]
)
def test_fixed_hops_and_node_ranges(hops, min_nodes, max_nodes):
  ex = depo.generate(
    np.random.default_rng(2), 40, hops=hops, min_nodes=min_nodes, max_nodes=max_nodes
  )
  np.testing.assert_array_equal(ex["hops"], hops)
  for b in range(40):
    num_nodes, _ = check_example(ex, b, min_nodes, max_nodes)
    # Exactly k hops deep: the walk from the start never comes back round the cycle.
    assert num_nodes > hops


def test_generation_is_a_pure_function_of_the_rng():
  a = depo.generate(np.random.default_rng(3), 16)
  b = depo.generate(np.random.default_rng(3), 16)
  c = depo.generate(np.random.default_rng(4), 16)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])
  assert not np.array_equal(a["tokens"], c["tokens"])


@pytest.mark.parametrize(
  "kwargs, message",
  [
    (dict(hops=0), "hops"),
    (dict(hops=17), "hops"),
    (dict(hops=2.0), "hops"),
    (dict(hops=True), "hops"),
    (dict(min_nodes=9), "node range"),
    (dict(hops=16, max_nodes=16), "more than 16 nodes"),
    (dict(max_nodes=76), "node range"),
    (dict(min_nodes=20, max_nodes=10), "node range"),
  ],
)
def test_bad_arguments_are_clear_errors(kwargs, message):
  with pytest.raises(ValueError, match=message):
    depo.generate(np.random.default_rng(0), 1, **kwargs)


def test_task_registry_binds_the_config_and_the_per_hop_slices():
  task = tasks.get_task(
    {"name": "depo", "hops": None, "min_nodes": 10, "max_nodes": 75, "eval_hops": (1, 4, 4)}
  )
  assert (task.seq_len, task.context_len, task.vocab_size) == (360, 300, 118)
  assert [s.name for s in task.eval_slices] == ["hops1", "hops4"]
  slices = tasks.heldout_slices(task, seed=0, num=8)
  np.testing.assert_array_equal(slices["hops4"]["hops"], 4)
  again = tasks.heldout_slices(task, seed=0, num=8)
  np.testing.assert_array_equal(slices["hops4"]["tokens"], again["hops4"]["tokens"])
  # Each slice has its own stream, independent of the mixed held-out set and of training.
  heldout = tasks.heldout_set(task, seed=0, num=8)["tokens"]
  train = tasks.train_dataset(task, seed=0, batch_size=8)[0]["tokens"]
  rows = lambda a: {r.tobytes() for r in a}
  others = rows(heldout) | rows(train) | rows(slices["hops4"]["tokens"])
  assert not rows(slices["hops1"]["tokens"]) & others
  with pytest.raises(ValueError, match="hops"):
    tasks.get_task({"name": "depo", "eval_hops": (1, 32)})
  with pytest.raises(ValueError, match="node range"):
    tasks.get_task({"name": "depo", "max_nodes": 80})
