"""The gated delta rule fuzzer (bench/fuzz_gated_delta.py): a few cases in the default suite, so
its code path stays exercised, and the full 1000 cases of every implementation under -m slow."""

import pytest

from bench import fuzz_gated_delta as fuzzer


def _assert_passed(report):
  failures = [
    f"{r['impl']}/{r['dtype']}: cases {r['failing_cases'][:10]}"
    for r in report["rows"]
    if not r["passed"]
  ]
  crashes = [
    f"{c['impl']} crashed (exit {c['returncode']}) on cases {c['cases'][:10]}: {c['repro']}"
    for c in report["crashes"]
  ]
  repro = "\n".join(report["repro"].values())
  assert report["passed"], "\n".join(failures + crashes) + "\nrepro:\n" + repro


def test_a_few_cases_pass():
  # The code path, not the coverage: one implementation, two tiny shape classes (T=1 in float32,
  # T=16 in two chunks in bfloat16), in this process. Four compiles, seconds.
  report = fuzzer.fuzz(
    cases=6,
    seed=10,
    impls=("chunked",),
    shapes=2,
    max_tokens=48,
    max_len=24,
    isolate=False,
    log=lambda line: None,
  )
  assert [(r["impl"], r["dtype"], r["cases"]) for r in report["rows"]] == [
    ("chunked", "float32", 4),
    ("chunked", "bfloat16", 2),
  ]
  for row in report["rows"]:
    assert row["nonfinite"] == 0 and row["crashed"] == 0, row
    assert 0 < row["worst_value"]["err"] <= row["value_tol"], row
  _assert_passed(report)
  assert "| chunked | bfloat16 | 2 |" in fuzzer.format_table(report["rows"])


def test_cases_are_reproducible_by_index():
  plan = fuzzer.make_plan(50, 7, 8, 8192, 4096)
  alone = fuzzer.make_plan(31, 7, 8, 8192, 4096)[30]
  assert plan[30] == alone
  first, second = fuzzer.make_arrays(alone, 7), fuzzer.make_arrays(plan[30], 7)
  for name in fuzzer.INPUT_NAMES:
    assert (first[0][name] == second[0][name]).all(), name


@pytest.mark.slow
def test_1000_cases_of_every_implementation_pass():
  # ~1300 s of CPU: ~11 minutes on 2 idle cores, far longer on busy ones. Worker processes, so
  # an XLA crash fails the test with the crashing cases instead of killing pytest.
  report = fuzzer.fuzz(cases=1000)
  print(fuzzer.format_table(report["rows"]))
  assert sum(r["cases"] for r in report["rows"] if r["impl"] == "chunked") >= 1000
  for row in report["rows"]:
    assert row["nonfinite"] == 0 and row["crashed"] == 0, row
  assert not report["crashes"], report["crashes"]
  _assert_passed(report)
