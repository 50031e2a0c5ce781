"""The adaptive-sleep sweep (configs/sweeps/rule110_adaptive.py) is the grid its docstring says."""

import os

import pytest

from sleep_jax.experiments import config_files, sweeps
from sleep_jax.train.config import ExperimentConfig

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SWEEP = os.path.join(REPO, "configs", "sweeps", "rule110_adaptive.py")
ARMS = ["n1", "n2", "n3", "n4", "converge_a", "converge_b", "learned_a", "learned_b"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  return sweeps.expand_runs(config_files.load_config(SWEEP), str(tmp_path_factory.mktemp("s")))


def test_eight_arms_three_seeds_equal_steps_on_mixed_depths(runs):
  assert [r.arm for r in runs[:8]] == ARMS and len(runs) == 8 * 3
  assert {r.seed for r in runs} == {0, 1, 2} and {r.num_steps for r in runs} == {600}
  assert all(r.depth is None and "task.depth" not in r.overrides for r in runs)
  assert all(r.workdir.endswith(os.path.join(r.arm, f"seed{r.seed}")) for r in runs)
  for r in runs:
    assert r.overrides["task.depths"] == (0, 2, 4) == r.overrides["task.eval_depths"]
    assert r.overrides["model.d_model"] == 64 and r.overrides["train.batch_size"] == 32


def test_arm_overrides_are_the_docstrings(runs):
  from configs.sweeps import rule110_adaptive as sweep  # pylint: disable=g-import-not-at-top

  by_arm = {r.arm: r.overrides for r in runs if r.seed == 0}
  for n in (1, 2, 3, 4):
    assert by_arm[f"n{n}"]["sleep.passes"] == n and "sleep.halt" not in by_arm[f"n{n}"]
  for tag, tol, cost in zip("ab", sweep.CONVERGE_TOLS, sweep.PONDER_COSTS, strict=True):
    converge, learned = by_arm[f"converge_{tag}"], by_arm[f"learned_{tag}"]
    assert (converge["sleep.passes"], converge["sleep.halt"]) == (4, "converge")
    assert converge["sleep.halt_tol"] == tol
    assert (learned["sleep.passes"], learned["sleep.halt"]) == (4, "learned")
    assert learned["sleep.ponder_cost"] == cost
  assert sweep.CONVERGE_TOLS[0] < sweep.CONVERGE_TOLS[1]  # a and b differ, a the stricter
  assert sweep.PONDER_COSTS[0] < sweep.PONDER_COSTS[1]


@pytest.mark.parametrize("arm", ARMS)
def test_every_arm_builds_a_valid_experiment_config(runs, arm):
  run = next(r for r in runs if r.arm == arm)
  config = config_files.apply_overrides(config_files.load_config(run.base), run.overrides)
  try:
    typed = ExperimentConfig.from_config(config)
  except ValueError as e:
    if arm.startswith("learned") and "not implemented" in str(e):
      pytest.skip(f"sleep.halt='learned' has not landed yet: {e}")
    raise
  assert typed.task.depths == (0, 2, 4) and typed.sleep.passes == int(run.overrides["sleep.passes"])
  assert typed.sleep.halt == run.overrides.get("sleep.halt", "never")


def test_the_ponder_variant_reruns_learned_halting_at_lighter_costs_only(runs, tmp_path):
  from configs.sweeps import rule110_adaptive as sweep  # pylint: disable=g-import-not-at-top

  follow_up = sweeps.expand_runs(config_files.load_config(SWEEP + ":ponder"), str(tmp_path))
  assert [r.arm for r in follow_up[:2]] == ["learned_c", "learned_0"] and len(follow_up) == 6
  learned_a = next(r.overrides for r in runs if (r.arm, r.seed) == ("learned_a", 0))
  for r in follow_up:
    cost = sweep.FOLLOW_UP_PONDER_COSTS[r.arm]
    assert cost < min(sweep.PONDER_COSTS) and r.num_steps == 600
    # everything but the cost (and the seed) is learned_a's, so the arms compare with it
    assert r.overrides == {**learned_a, "sleep.ponder_cost": cost, "seed": r.seed}
  with pytest.raises(ValueError, match="unknown rule110_adaptive variant 'pondr'"):
    config_files.load_config(SWEEP + ":pondr")
