"""The Depo task (PAPER.md section 4): k-hop retrieval on a random directed cycle.

One example, 360 tokens (DESIGN.md section 3):
  tokens[:300]   PAD left-padding, then the cycle's edges in random order, each edge written
                 as the source word then the target word          -> four sleep chunks of 75
  tokens[300:]   10 queries `HOP_k start-word ANS answer-word`, PAD right-padded to 60 tokens
                                                                   -> the prediction chunk
  targets        the answer-word tokens at the positions that predict them (next token: the
                 ANS position predicts the answer's first symbol, and so on)
  loss_mask      1 exactly at those positions
  hops           [10] the k of every query
  answer_id      (extra) the query index 0..9 at every loss-carrying position, -1 elsewhere,
                 so metrics can score whole answer words with a static layout

Token ids: a word is 1-2 symbols out of 50; a symbol s is written s (0..49) when another symbol
of the word follows and 50+s when it is the word's last, so word boundaries are visible.
HOP_k = 99+k (k = 1..16), ANS = 116, PAD = 117. Words are distinct within an example; the
cycle has `min_nodes..max_nodes` nodes (default 10..75; 75 nodes of 2-symbol words fill the
300 context tokens exactly).

The 10 queries of an example start at 10 distinct nodes (so a cycle has at least 10): with a
repeated (k, start) the earlier answer would sit in the same prediction chunk for attention to
copy. With a fixed k (the per-k evaluation slices, or `hops=k` in training) only cycles of more
than k nodes are drawn, so that every query is exactly k hops deep; with k ~ U{1..16} (training)
the full node range stays, and a query of k >= n hops on a cycle of n nodes wraps around.
"""

from __future__ import annotations

import numpy as np

NUM_SYMBOLS = 50
LAST_SYMBOL = NUM_SYMBOLS  # symbol s ending a word is written LAST_SYMBOL + s
MAX_WORD_LEN = 2
MAX_HOPS = 16
HOP_BASE = 2 * NUM_SYMBOLS - 1  # HOP_k = 99 + k
ANS = HOP_BASE + MAX_HOPS + 1  # 116
PAD = ANS + 1  # 117
VOCAB_SIZE = PAD + 1  # 118
MIN_NODES, MAX_NODES = 10, 75  # default node range per example
NUM_QUERIES = 10
QUERY_SLOTS = 2 + 2 * MAX_WORD_LEN  # HOP_k, start word, ANS, answer word
CONTEXT_LEN = 300
QUERY_LEN = NUM_QUERIES * QUERY_SLOTS  # 60
SEQ_LEN = CONTEXT_LEN + QUERY_LEN  # 360
EVAL_HOPS = (1, 2, 4, 8, 16)  # the paper's per-k evaluation (Fig. 3)

# The largest cycle must fit the context: every node is written twice (as a source and as a
# target), each time as a word of at most 2 symbols.
assert MAX_NODES * 2 * MAX_WORD_LEN == CONTEXT_LEN
assert QUERY_LEN == 60 and SEQ_LEN == 360 and VOCAB_SIZE == 118


def _word_table() -> tuple[np.ndarray, np.ndarray]:
  """Every possible word as (first, last) token slots; the first slot is unused for 1-symbol words.

  Word w < 50 is the single symbol w; word w >= 50 is the symbol pair divmod(w - 50, 50).
  """
  singles = np.stack([np.zeros(NUM_SYMBOLS, np.int32), LAST_SYMBOL + np.arange(NUM_SYMBOLS)], -1)
  first, last = np.divmod(np.arange(NUM_SYMBOLS**2), NUM_SYMBOLS)
  pairs = np.stack([first, LAST_SYMBOL + last], -1)
  tokens = np.concatenate([singles, pairs]).astype(np.int32)
  lengths = np.concatenate([np.ones(NUM_SYMBOLS), np.full(NUM_SYMBOLS**2, 2)]).astype(np.int32)
  return tokens, lengths


WORD_TOKENS, WORD_LENGTHS = _word_table()  # [2550, 2], [2550]
# Sampling weights: the 50 one-symbol words together weigh as much as the 2500 two-symbol words,
# so about half of the words (fewer on large cycles, which use the singles up) have one symbol.
_WORD_WEIGHTS = np.where(WORD_LENGTHS == 1, NUM_SYMBOLS, 1).astype(np.float64)


def _used_slots(words: np.ndarray) -> np.ndarray:
  """[..., 2] bool: which of a word's (first, last) token slots it uses."""
  return np.stack([WORD_LENGTHS[words] == 2, np.ones(words.shape, bool)], -1)


def check_args(hops, min_nodes: int, max_nodes: int) -> None:
  """Raises ValueError unless the arguments of `generate` are valid."""
  if hops is not None and (
    isinstance(hops, bool) or not isinstance(hops, (int, np.integer)) or not 1 <= hops <= MAX_HOPS
  ):
    raise ValueError(
      f"depo hops must be None (k ~ U{{1..{MAX_HOPS}}}) or an int in 1..{MAX_HOPS}, got {hops!r}"
    )
  if not NUM_QUERIES <= min_nodes <= max_nodes <= MAX_NODES:
    raise ValueError(
      f"depo node range must satisfy {NUM_QUERIES} <= min_nodes <= max_nodes <= {MAX_NODES} "
      f"(the {NUM_QUERIES} queries start at distinct nodes; {MAX_NODES} is the largest cycle "
      f"that fits {CONTEXT_LEN} context tokens); got min_nodes={min_nodes}, max_nodes={max_nodes}"
    )
  if hops is not None and max_nodes <= hops:
    raise ValueError(
      f"depo queries of a fixed k={hops} hops need cycles of more than {hops} nodes, but "
      f"max_nodes={max_nodes}; raise task.max_nodes or drop k={hops} from task.eval_hops"
    )


def _first_by_key(keys: np.ndarray, valid: np.ndarray) -> np.ndarray:
  """Per row, the indices of the valid entries in increasing key order, then the invalid ones."""
  return np.argsort(np.where(valid, keys, np.inf), axis=1, kind="stable")


def _pack(tokens: np.ndarray, valid: np.ndarray, *, right: bool):
  """Moves the valid slots of every row to one end, keeping their order; returns the permutation.

  right=True packs them to the end (left padding), right=False to the start (right padding).
  """
  order = np.argsort(valid if right else ~valid, axis=1, kind="stable")
  return np.take_along_axis(tokens, order, 1), np.take_along_axis(valid, order, 1), order


def generate(
  rng: np.random.Generator,
  num: int,
  *,
  hops: int | None = None,
  min_nodes: int = MIN_NODES,
  max_nodes: int = MAX_NODES,
) -> dict[str, np.ndarray]:
  """`num` independent Depo examples.

  Args:
    rng: the random generator (the only source of randomness).
    num: number of examples.
    hops: None draws k ~ U{1..16} for every query; an int fixes k for all queries.
    min_nodes: the smallest cycle (nodes drawn uniformly from min_nodes..max_nodes; with a
      fixed k, from max(min_nodes, k + 1)..max_nodes). At least 10.
    max_nodes: the largest cycle (at most 75).

  Returns:
    dict of numpy arrays: "tokens" int32, "targets" int32, "loss_mask" float32 and "answer_id"
    int32, all [num, 360]; "hops" int32 [num, 10].
  """
  check_args(hops, min_nodes, max_nodes)
  if hops is not None:  # every query exactly k hops deep: no cycle of k nodes or fewer
    min_nodes = max(min_nodes, hops + 1)
  rows = np.arange(num)[:, None]
  num_nodes = rng.integers(min_nodes, max_nodes + 1, size=(num, 1))
  node_valid = np.arange(MAX_NODES)[None, :] < num_nodes  # [num, 75]

  # Distinct words: weighted sampling without replacement (smallest exponential keys / weight).
  word_keys = rng.exponential(size=(num, len(_WORD_WEIGHTS))) / _WORD_WEIGHTS
  words = np.argpartition(word_keys, MAX_NODES - 1, axis=1)[:, :MAX_NODES]
  # The first n words of a row form its sample; the cycle visits them in a fresh random order
  # so that word length does not correlate with position on the cycle.
  words = np.take_along_axis(words, np.argsort(word_keys[rows, words], axis=1), 1)
  cycle = np.take_along_axis(words, _first_by_key(rng.random((num, MAX_NODES)), node_valid), 1)
  successor = (np.arange(MAX_NODES)[None, :] + 1) % num_nodes  # cycle index -> next index

  # Context: edge i is (cycle[i], cycle[i+1]); edges in random order; PAD on the left.
  edge_order = _first_by_key(rng.random((num, MAX_NODES)), node_valid)
  edge_valid = np.take_along_axis(node_valid, edge_order, 1)
  edge_sources = np.take_along_axis(cycle, edge_order, 1)
  edge_targets = cycle[rows, np.take_along_axis(successor, edge_order, 1)]
  # [num, 75, 4]: source (first, last) then target (first, last) slots.
  edge_tokens = np.concatenate([WORD_TOKENS[edge_sources], WORD_TOKENS[edge_targets]], -1)
  edge_slots = np.concatenate([_used_slots(edge_sources), _used_slots(edge_targets)], -1)
  edge_slots &= edge_valid[..., None]
  context, context_valid, _ = _pack(
    edge_tokens.reshape(num, CONTEXT_LEN), edge_slots.reshape(num, CONTEXT_LEN), right=True
  )
  context = np.where(context_valid, context, PAD)

  # Queries: `HOP_k start ANS answer`, answer = the k-th successor of start; PAD on the right.
  query_hops = (
    rng.integers(1, MAX_HOPS + 1, size=(num, NUM_QUERIES))
    if hops is None
    else np.full((num, NUM_QUERIES), hops)
  )
  # Distinct start nodes (without replacement): the first 10 of a random order of the cycle.
  start = _first_by_key(rng.random((num, MAX_NODES)), node_valid)[:, :NUM_QUERIES]
  start_words = cycle[rows, start]
  answer_words = cycle[rows, (start + query_hops) % num_nodes]
  specials = lambda token: np.full((num, NUM_QUERIES, 1), token)
  query_tokens = np.concatenate(
    [
      (HOP_BASE + query_hops)[..., None],
      WORD_TOKENS[start_words],
      specials(ANS),
      WORD_TOKENS[answer_words],
    ],
    -1,
  )  # [num, 10, 6]
  always = np.ones((num, NUM_QUERIES, 1), bool)
  query_slots = np.concatenate(
    [always, _used_slots(start_words), always, _used_slots(answer_words)], -1
  )
  # Which query's answer a slot belongs to (-1: not an answer symbol), packed alongside.
  is_answer = np.zeros(QUERY_SLOTS, bool)
  is_answer[-MAX_WORD_LEN:] = True
  slot_answer = np.where(is_answer & query_slots, np.arange(NUM_QUERIES)[None, :, None], -1)
  queries, query_valid, order = _pack(
    query_tokens.reshape(num, QUERY_LEN), query_slots.reshape(num, QUERY_LEN), right=False
  )
  queries = np.where(query_valid, queries, PAD)
  answer_at = np.take_along_axis(slot_answer.reshape(num, QUERY_LEN), order, 1)
  answer_at = np.where(query_valid, answer_at, -1)

  tokens = np.concatenate([context, queries], 1).astype(np.int32)
  # Next-token layout: the symbol at position p is predicted at position p - 1.
  answer_id = np.full((num, SEQ_LEN), -1, np.int32)
  answer_id[:, CONTEXT_LEN - 1 : -1] = answer_at
  loss_mask = (answer_id >= 0).astype(np.float32)
  targets = np.zeros((num, SEQ_LEN), np.int32)
  targets[:, :-1] = np.where(answer_id[:, :-1] >= 0, tokens[:, 1:], 0)
  return {
    "tokens": tokens,
    "targets": targets,
    "loss_mask": loss_mask,
    "hops": query_hops.astype(np.int32),
    "answer_id": answer_id,
  }
