"""GSM-Infinite problems are solved from their text alone by a parser written here, independently.

The parser reads the statements with its own regular expressions, evaluates expressions with
Python's own arithmetic (so operator precedence is Python's, not the generator's), follows the
asked quantity's dependencies and counts their operators.
"""

import re

import numpy as np
import pytest

from sleep_jax.data import gsm_infinite as gsm

ASSIGN = re.compile(r"assign (V\d+) = ([^.]+)\.")
GIVEN = re.compile(r"(the number of .+?) is (\d+)$")
MORE = re.compile(r"(the number of .+?) equals (\d+) more than (the number of .+)$")
PAIR = re.compile(
  r"(the number of .+?) equals the (sum|difference|product) of (the number of .+?) "
  r"and (the number of .+)$"
)


def modulus_of(context):
  found = re.match(r"All values are computed modulo (\d+)\.", context)
  return int(found.group(1)) if found else None


def solve_symbolic(problem):
  """(answer, ops) from the text: evaluate the asked variable, count its closure's operators."""
  definitions = dict(ASSIGN.findall(problem["context"]))
  asked = re.search(r"(V\d+)$", problem["question"]).group(1)
  modulus, values, closure = modulus_of(problem["context"]), {}, set()

  def value(var):
    if var not in values:
      closure.add(var)
      expression = definitions[var]
      names = re.findall(r"V\d+", expression)
      env = {name: value(name) for name in names}
      result = eval(expression, {"__builtins__": {}}, env)  # only names, integers, + - *
      values[var] = result % modulus if modulus else result
    return values[var]

  answer = value(asked)
  ops = sum(len(re.findall(r"[-+*]", definitions[var])) for var in closure)
  return answer, ops


def solve_realistic(problem):
  sentences = [s.strip() for s in problem["context"].split(".") if s.strip()]
  definitions = {}
  for sentence in sentences:
    sentence = sentence[0].lower() + sentence[1:]
    for pattern, kind in ((PAIR, "pair"), (MORE, "more"), (GIVEN, "given")):
      found = pattern.match(sentence)
      if found:
        definitions[found.group(1)] = (kind, found.groups()[1:])
        break
  asked = re.search(r"what is (the number of .+)$", problem["question"]).group(1)
  modulus, values, closure = modulus_of(problem["context"]), {}, set()

  def value(quantity):
    if quantity not in values:
      closure.add(quantity)
      kind, args = definitions[quantity]
      if kind == "given":
        result = int(args[0])
      elif kind == "more":
        result = int(args[0]) + value(args[1])
      else:
        a, b = value(args[1]), value(args[2])
        result = {"sum": a + b, "difference": a - b, "product": a * b}[args[0]]
      values[quantity] = result % modulus if modulus else result
    return values[quantity]

  answer = value(asked)
  ops = sum(definitions[q][0] != "given" for q in closure)
  return answer, ops


SOLVERS = {"symbolic": solve_symbolic, "realistic": solve_realistic}


@pytest.mark.parametrize("family", gsm.FAMILIES)
@pytest.mark.parametrize("modulus", [None, 5])
def test_every_problem_is_solved_from_its_text(family, modulus):
  rng = np.random.default_rng(0)
  for ops in (1, 2, 3, 4, 5, 6, 7, 8, 11):
    for problem in gsm.generate_problems(rng, 25, family=family, ops=ops, modulus=modulus):
      assert (problem["family"], problem["modulus"], problem["ops"]) == (family, modulus, ops)
      assert SOLVERS[family](problem) == (problem["answer"], ops), problem
      if modulus:
        assert 0 <= problem["answer"] < modulus


def test_the_question_names_the_asked_variable_last_and_distractors_are_present():
  for problem in gsm.generate_problems(
    np.random.default_rng(1), 20, family="symbolic", ops=3, distractors=4
  ):
    asked = problem["question"].split()[-1]
    assert re.fullmatch(r"V\d+", asked)
    defined = ASSIGN.findall(problem["context"])
    names = [name for name, _ in defined]
    assert len(names) == len(set(names))  # every variable is assigned once
    # Statements the answer does not depend on are there too (four distractor chains).
    _, ops = solve_symbolic(problem)
    assert sum(len(re.findall(r"[-+*]", e)) for _, e in defined) > ops


def test_realistic_records_carry_the_dependency_graph_the_text_states():
  for problem in gsm.generate_problems(
    np.random.default_rng(2), 20, family="realistic", ops=(1, 8), modulus=7
  ):
    graph = problem["graph"]
    asked = re.search(r"what is (the number of .+)$", problem["question"]).group(1)
    assert graph[asked]["value"] == problem["answer"]
    for quantity, node in graph.items():
      assert quantity.lower() in problem["context"].lower()
      if node["op"] == "given":
        assert node["args"] == []
      else:
        assert all(arg in graph for arg in node["args"] if isinstance(arg, str))


@pytest.mark.parametrize("family", gsm.FAMILIES)
def test_noise_pads_to_the_target_length_without_changing_the_answer(family):
  measure = lambda text: len(text.split())  # a stand-in for a tokenizer's count
  for problem in gsm.generate_problems(
    np.random.default_rng(3), 5, family=family, ops=4, target_length=2_000, count_length=measure
  ):
    length = measure(problem["question"] + " " + problem["context"])
    assert 2_000 <= length < 2_100
    assert SOLVERS[family](problem) == (problem["answer"], 4)


def test_the_heldout_set_is_fixed_and_training_never_repeats_it():
  settings = dict(family="symbolic", ops=(1, 8))
  heldout = gsm.heldout_problems(seed=0, num=200, **settings)
  assert heldout == gsm.heldout_problems(seed=0, num=200, **settings)
  assert len(gsm.heldout_problems(seed=0, **settings)) == gsm.HELDOUT_SIZE == 1_600
  keys = {gsm.problem_key(p) for p in heldout}
  training = gsm.training_problems(0, block=0, num=50, heldout_keys=keys, **settings)
  assert len(training) == 50 and not keys & {gsm.problem_key(p) for p in training}
  # The filter works: declare the first training problems held out, and they are skipped.
  blocked = {gsm.problem_key(p) for p in training[:10]}
  again = gsm.training_problems(0, block=0, num=50, heldout_keys=blocked, **settings)
  assert len(again) == 50 and not blocked & {gsm.problem_key(p) for p in again}


@pytest.mark.parametrize(
  "kwargs, message",
  [
    (dict(family="algebra", ops=2), "unknown family"),
    (dict(family="symbolic", ops=0), "ops must be >= 1"),
    (dict(family="symbolic", ops=(5, 2)), "ops must be >= 1"),
    (dict(family="symbolic", ops=2, modulus=1), "modulus must be >= 2"),
  ],
)
def test_bad_settings_are_clear_errors(kwargs, message):
  with pytest.raises(ValueError, match=message):
    gsm.generate_problems(np.random.default_rng(0), 1, **kwargs)
