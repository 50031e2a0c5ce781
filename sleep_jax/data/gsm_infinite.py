"""GSM-Infinite-style problems (the paper's experiment 3), generated from the benchmark's description.

Written from the published description of GSM-Infinite (graded arithmetic problems whose
reasoning depth is the number of operations the answer depends on, padded with irrelevant
statements to any length); none of its code is used. Two families:

  symbolic   sentences "assign V<n> = <expr>." where <expr> is an integer, a variable, or
             variables and integers joined by "+", "-", "*"; the question asks for one variable,
             named last. "ops" counts the operators in the statements the answer depends on;
             the other statements (distractor chains) are shuffled in with them.
  realistic  iGSM-style word problems over a dependency graph of quantities, each "the number
             of <item> in <place>" (animals in zoos, teachers in schools, films at festivals):
             a quantity is given, or equals a sum, a difference, a product, or "k more than"
             another; the record carries the graph.

Every problem is a dict: "question", "context" (the statements, shuffled, then noise up to a
target length), "answer" (int), "ops" (int), "family", "modulus" (int or None: with a modulus,
every value is reduced modulo it, and the context says so first), and for "realistic" the
"graph" ({quantity: {"op": ..., "args": [...], "value": int}}). `heldout_problems` is a fixed
evaluation set (1,600 by default) that `training_problems` never repeats.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

FAMILIES = ("symbolic", "realistic")
OPERATORS = ("+", "-", "*")
HELDOUT_SIZE = 1_600
SYMBOLIC_NAMES = [f"V{i}" for i in range(100, 100_000)]
MAX_ABS_VALUE = 10**6  # without a modulus, a product that would exceed this becomes a sum
_HELDOUT_STREAM, _TRAIN_STREAM = 7, 8

REALISTIC_WORLDS = {
  "zoo": (
    ("Riverside Zoo", "Oak Zoo", "Harbor Zoo", "Summit Zoo", "Maple Zoo", "Desert Zoo", "Elm Zoo"),
    (
      "adult lions",
      "adult eagles",
      "young zebras",
      "adult otters",
      "young pandas",
      "adult owls",
      "young foxes",
    ),
  ),
  "school": (
    (
      "Lincoln School",
      "Hill School",
      "Bay School",
      "Cedar School",
      "Pine School",
      "Lake School",
      "Park School",
    ),
    (
      "math teachers",
      "art teachers",
      "music teachers",
      "science teachers",
      "coaches",
      "tutors",
      "librarians",
    ),
  ),
  "festival": (
    (
      "Cannes Week",
      "Dune Fest",
      "North Fest",
      "Coast Fest",
      "Valley Fest",
      "River Fest",
      "Bright Fest",
    ),
    ("comedies", "dramas", "documentaries", "thrillers", "cartoons", "musicals", "westerns"),
  ),
}
NOISE_SUBJECTS = ("The old bridge", "A quiet street", "The morning train", "The city library")
NOISE_PREDICATES = (
  "was repainted last spring.",
  "is busy on weekends.",
  "opened before the war.",
  "has a small garden nearby.",
)


def word_count(text: str) -> int:
  """The default length measure: whitespace-separated words (pass a tokenizer's for tokens)."""
  return len(text.split())


def _reduce(value: int, modulus: int | None) -> int:
  return value % modulus if modulus else value


def _apply(op: str, a: int, b: int, modulus: int | None) -> int:
  value = a + b if op == "+" else a - b if op == "-" else a * b
  return _reduce(value, modulus)


class _Namer:
  """Distinct names drawn at random from a pool (rejection sampling: pools are large)."""

  def __init__(self, rng: np.random.Generator, pool: list):
    self.rng, self.pool, self.used = rng, pool, set()

  def __call__(self):
    if len(self.used) == len(self.pool):
      raise ValueError("ran out of distinct names: ask for fewer operations or distractors")
    while True:
      name = self.pool[self.rng.integers(len(self.pool))]
      if name not in self.used:
        self.used.add(name)
        return name


# --- symbolic ------------------------------------------------------------------------------------


def evaluate(operands: list[int], operators: list[str]) -> int:
  """a op b op c ... with the usual precedence: products first, then + and - left to right."""
  terms, signs, product = [], ["+"], operands[0]
  for op, value in zip(operators, operands[1:]):
    if op == "*":
      product *= value
    else:
      terms.append(product)
      signs.append(op)
      product = value
  terms.append(product)
  return sum(t if sign == "+" else -t for sign, t in zip(signs, terms))


def _symbolic_chain(rng, ops: int, name, modulus, values: dict, statements: list) -> str:
  """Appends statements computing a variable that depends on exactly `ops` operators.

  Each statement uses the previous one's variable, so every statement is in the result's
  dependency closure; other operands are fresh leaf variables or integer literals.
  """

  def leaf() -> str:
    var = name()
    literal = int(rng.integers(0, 10))
    values[var] = _reduce(literal, modulus)
    statements.append(f"assign {var} = {literal}.")
    return var

  current, used = leaf(), 0
  while used < ops:
    count = int(min(rng.integers(1, 3), ops - used))
    operands = [current]
    for _ in range(count):
      operands.append(leaf() if rng.random() < 0.6 else str(int(rng.integers(1, 10))))
    operators = [OPERATORS[rng.integers(len(OPERATORS))] for _ in range(count)]
    numbers = [values[x] if x in values else int(x) for x in operands]
    value = evaluate(numbers, operators)
    if not modulus and abs(value) > MAX_ABS_VALUE:  # keep plain integers small
      operators = ["+" if op == "*" else op for op in operators]
      value = evaluate(numbers, operators)
    expression = " ".join([operands[0], *(f"{op} {x}" for op, x in zip(operators, operands[1:]))])
    var = name()
    values[var] = _reduce(value, modulus)
    statements.append(f"assign {var} = {expression}.")
    current, used = var, used + count
  return current


def _symbolic(rng, ops, modulus, distractors: int) -> dict:
  name = _Namer(rng, SYMBOLIC_NAMES)
  values, core = {}, []
  target = _symbolic_chain(rng, ops, name, modulus, values, core)
  noise = []
  for _ in range(distractors):
    _symbolic_chain(rng, int(rng.integers(1, ops + 2)), name, modulus, values, noise)
  return dict(
    statements=core + noise,
    question=f"Question: what is the value of {target}",
    answer=values[target],
    ops=ops,
    noise_source=lambda: _symbolic_noise(rng, name, modulus, values),
  )


def _symbolic_noise(rng, name, modulus, values) -> list[str]:
  """A short distractor chain: padding that reads like the problem's own statements."""
  statements: list[str] = []
  _symbolic_chain(rng, int(rng.integers(1, 3)), name, modulus, values, statements)
  return statements


# --- realistic -----------------------------------------------------------------------------------


def _realistic(rng, ops, modulus, distractors: int) -> dict:
  world = list(REALISTIC_WORLDS)[rng.integers(len(REALISTIC_WORLDS))]
  places, items = REALISTIC_WORLDS[world]
  quantity = _Namer(rng, [f"the number of {i} in {p}" for p in places for i in items])
  graph: dict[str, dict] = {}

  def given(text_list: list) -> str:
    q = quantity()
    literal = int(rng.integers(1, 10))
    graph[q] = dict(op="given", args=[], value=_reduce(literal, modulus))
    text_list.append(f"{q[0].upper()}{q[1:]} is {literal}.")
    return q

  def chain(num_ops: int, text_list: list) -> str:
    current = given(text_list)
    for _ in range(num_ops):
      kind = ("sum", "difference", "product", "more")[rng.integers(4)]
      a = graph[current]["value"]
      q = quantity()
      if kind == "more":
        k = int(rng.integers(1, 10))
        graph[q] = dict(op="more", args=[current, k], value=_reduce(a + k, modulus))
        sentence = f"{q} equals {k} more than {current}."
      else:
        other = given(text_list)
        b = graph[other]["value"]
        if kind == "product" and not modulus and abs(a * b) > MAX_ABS_VALUE:
          kind = "sum"
        op = {"sum": "+", "difference": "-", "product": "*"}[kind]
        graph[q] = dict(op=kind, args=[current, other], value=_apply(op, a, b, modulus))
        phrase = {
          "sum": "the sum of",
          "difference": "the difference of",
          "product": "the product of",
        }
        sentence = f"{q} equals {phrase[kind]} {current} and {other}."
      text_list.append(sentence[0].upper() + sentence[1:])
      current = q
    return current

  core: list[str] = []
  target = chain(ops, core)
  noise: list[str] = []
  for _ in range(distractors):
    try:
      chain(int(rng.integers(0, 2)), noise)
    except ValueError:  # the world has no names left: enough distractors
      break
  return dict(
    statements=core + noise,
    question=f"Question: what is {target}",
    answer=graph[target]["value"],
    ops=ops,
    graph=graph,
    noise_source=lambda: _filler(rng),
  )


def _filler(rng) -> list[str]:
  """One irrelevant sentence (no quantity in it): padding for the word problems."""
  subject = NOISE_SUBJECTS[rng.integers(len(NOISE_SUBJECTS))]
  return [f"{subject} {NOISE_PREDICATES[rng.integers(len(NOISE_PREDICATES))]}"]


# --- problems ------------------------------------------------------------------------------------


def generate_problems(
  rng: np.random.Generator,
  num: int,
  *,
  family: str,
  ops: int | tuple[int, int],
  distractors: int = 4,
  target_length: int | None = None,
  count_length: Callable[[str], int] = word_count,
  modulus: int | None = None,
) -> list[dict]:
  """`num` problems of a family.

  Args:
    rng: the random generator (the only source of randomness).
    num: problems to make.
    family: "symbolic" or "realistic".
    ops: operations the answer depends on, or an inclusive range (lo, hi) drawn uniformly.
    distractors: distractor chains (statements the answer does not depend on).
    target_length: pad the context with noise statements until `count_length(question +
      context)` reaches this (the paper: 2,000-3,300 tokens); None: no padding.
    count_length: the length measure (default words; a tokenizer's token count for tokens).
    modulus: reduce every value modulo this (None: plain integers, kept below 10**6).

  Returns:
    Dicts with "question", "context", "answer", "ops", "family", "modulus" (and "graph").
  """
  if family not in FAMILIES:
    raise ValueError(f"unknown family {family!r}; use one of {FAMILIES}")
  lo, hi = (ops, ops) if isinstance(ops, int) else ops
  if not 1 <= lo <= hi:
    raise ValueError(f"ops must be >= 1 (or a range lo <= hi of such), got {ops}")
  if modulus is not None and modulus < 2:
    raise ValueError(f"modulus must be >= 2 or None, got {modulus}")
  make = _symbolic if family == "symbolic" else _realistic
  problems = []
  for _ in range(num):
    parts = make(rng, int(rng.integers(lo, hi + 1)), modulus, distractors)
    statements = [parts["statements"][i] for i in rng.permutation(len(parts["statements"]))]
    if target_length is not None:
      _pad(rng, statements, parts, target_length, count_length, modulus)
    if modulus:
      statements.insert(0, f"All values are computed modulo {modulus}.")
    context = " ".join(statements)
    record = dict(
      question=parts["question"],
      context=context,
      answer=int(parts["answer"]),
      ops=parts["ops"],
      family=family,
      modulus=modulus,
    )
    if "graph" in parts:
      record["graph"] = parts["graph"]
    problems.append(record)
  return problems


def _pad(rng, statements: list, parts: dict, target: int, count_length, modulus) -> None:
  """Inserts noise statements at random places until the text reaches `target` in length."""
  overhead = count_length(parts["question"]) + (8 if modulus else 0)
  length = overhead + sum(count_length(s) for s in statements)
  while True:
    while length < target:  # cheap running total; the exact count below decides
      for sentence in parts["noise_source"]():
        statements.insert(int(rng.integers(len(statements) + 1)), sentence)
        length += count_length(sentence)
    exact = count_length(parts["question"] + " " + " ".join(statements)) + (8 if modulus else 0)
    if exact >= target:
      return
    length = exact


def problem_key(problem: dict) -> str:
  """What makes two problems the same: the text a model reads."""
  return problem["question"] + "\n" + problem["context"]


def heldout_problems(seed: int = 0, num: int = HELDOUT_SIZE, **kwargs) -> list[dict]:
  """The fixed evaluation set: `num` problems from a stream no training draw uses."""
  return generate_problems(np.random.default_rng([seed, _HELDOUT_STREAM]), num, **kwargs)


def training_problems(
  seed: int, block: int, num: int, heldout_keys: set[str], **kwargs
) -> list[dict]:
  """`num` training problems of block `block`, none of them a held-out problem."""
  rng = np.random.default_rng([seed, _TRAIN_STREAM, block])
  problems: list[dict] = []
  while len(problems) < num:
    fresh = generate_problems(rng, num - len(problems), **kwargs)
    problems += [p for p in fresh if problem_key(p) not in heldout_keys]
  return problems
