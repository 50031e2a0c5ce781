"""Sweeps: expand a sweep config (configs/sweeps/*.py) into runs, and run them one after another.

A sweep config is an ml_collections ConfigDict:
  name       the sweep's name (reports and job names).
  base       the experiment config, "path.py:variant" (a path relative to the cwd or the repo root).
  arms       tuple of dicts {"name": str, "overrides": {dotted key: value}, "step_ratio": float}.
             step_ratio (default 1) scales the sweep's num_steps for that arm (compute matching).
  seeds      tuple of ints; each sets the run's `seed` (parameters and data order).
  depths     tuple of Rule 110 depths (`task.depth`), or () for no depth axis (e.g. Depo).
  num_steps  train.num_steps of an arm with step_ratio 1 (None: the base config's).
  overrides  nested ConfigDict of overrides common to every run (e.g. overrides.eval.every_steps).

A run is arm x seed (x depth) in `<sweep_dir>/<arm>[/depth<t>]/seed<s>`. Precedence, last wins:
base < common overrides < scaled num_steps < the arm's overrides < depth < seed.
"""

from __future__ import annotations

import dataclasses
import logging
import traceback
from collections.abc import Callable
from typing import Any

from ml_collections import config_dict

from sleep_jax import paths, rundir
from sleep_jax.experiments.config_files import apply_overrides, flatten, load_config

logger = logging.getLogger(__name__)
TrainFn = Callable[[config_dict.ConfigDict, str], Any]  # (config, workdir) -> results


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run of a sweep.

  Attributes:
    sweep: the sweep's name.
    arm: the arm's name (e.g. "n2", "n1_compute_matched").
    seed: the run's `seed`.
    depth: the Rule 110 depth (`task.depth`), or None when the sweep has no depth axis.
    base: the base experiment config, "path.py:variant".
    overrides: every dotted key -> value applied to the base config, seed and depth included.
    workdir: the run's directory.
  """

  sweep: str
  arm: str
  seed: int
  depth: int | None
  base: str
  overrides: dict[str, Any]
  workdir: str

  @property
  def num_steps(self) -> int | None:
    return self.overrides.get("train.num_steps")

  def coordinates(self) -> dict[str, Any]:
    """What `sweep_run.json` holds: where this run sits in the grid."""
    coords = {"sweep": self.sweep, "arm": self.arm, "seed": self.seed}
    if self.depth is not None:
      coords["depth"] = self.depth
    coords["overrides"] = dict(self.overrides)
    return coords


def expand_runs(
  sweep_config: config_dict.ConfigDict, sweep_dir: str, only: str | None = None
) -> list[Run]:
  """Expands a sweep config into its runs, in the order they should run.

  Seeds are the outermost loop and arms the innermost, so a partial sweep has compared every
  arm at the first seed (and every depth) before it spends time on more seeds.

  Args:
    sweep_config: a ConfigDict from configs/sweeps/*.py (see the module docstring).
    sweep_dir: the directory holding one workdir per run.
    only: keep only the arm with this name (None: all arms).

  Returns:
    The runs, with their full overrides and distinct workdirs.
  """
  base = load_config(sweep_config.base)
  num_steps = sweep_config.get("num_steps") or base.train.num_steps
  common = flatten(sweep_config.get("overrides") or {})
  names = [arm["name"] for arm in sweep_config.arms]
  if len(set(names)) != len(names):
    raise ValueError(f"arm names must be distinct, got {names}")
  if only is not None and only not in names:
    raise ValueError(f"--only={only!r} is not an arm of {sweep_config.name}: {names}")
  depths = tuple(sweep_config.get("depths") or ()) or (None,)
  runs = []
  for seed in sweep_config.seeds:
    for depth in depths:
      for arm in sweep_config.arms:
        if only is not None and arm["name"] != only:
          continue
        overrides = dict(common)
        overrides["train.num_steps"] = round(arm.get("step_ratio", 1.0) * num_steps)
        overrides.update(arm.get("overrides", {}))
        parts = [arm["name"]]
        if depth is not None:
          overrides["task.depth"] = int(depth)
          parts.append(f"depth{depth}")
        overrides["seed"] = int(seed)
        parts.append(f"seed{seed}")
        run = Run(
          sweep=sweep_config.name,
          arm=arm["name"],
          seed=int(seed),
          depth=depth,
          base=sweep_config.base,
          overrides=overrides,
          workdir=paths.join(sweep_dir, *parts),
        )
        apply_overrides(base, overrides)  # fail now on a bad key, not hours into the sweep
        runs.append(run)
  return runs


def write_sweep_file(sweep_config: config_dict.ConfigDict, sweep_dir: str, runs: list[Run]) -> str:
  """Writes `<sweep_dir>/sweep.json`: the grid, so a report can count the missing runs."""
  paths.makedirs(sweep_dir)
  path = paths.join(sweep_dir, rundir.SWEEP_FILE)
  grid = {
    "name": sweep_config.name,
    "base": sweep_config.base,
    "arms": [arm["name"] for arm in sweep_config.arms],
    "seeds": list(sweep_config.seeds),
    "depths": list(sweep_config.get("depths") or ()),
    "runs": [
      dict(run.coordinates(), workdir=paths.relative(run.workdir, sweep_dir)) for run in runs
    ],
  }
  rundir.write_json(path, grid)
  return path


def write_run_file(run: Run) -> str:
  """Writes `<workdir>/sweep_run.json` with the run's coordinates."""
  paths.makedirs(run.workdir)
  path = paths.join(run.workdir, rundir.SWEEP_RUN_FILE)
  rundir.write_json(path, run.coordinates())
  return path


def write_sweep_files(
  sweep_config: config_dict.ConfigDict, sweep_dir: str, only: str | None = None
) -> None:
  """sweep.json (the whole grid) and the sweep_run.json of every run (of arm `only`): what a
  launcher that hands the runs to other machines writes first, so reports name the arms."""
  write_sweep_file(sweep_config, sweep_dir, expand_runs(sweep_config, sweep_dir))
  for run in expand_runs(sweep_config, sweep_dir, only=only):
    write_run_file(run)


def run_sweep(
  sweep_config: config_dict.ConfigDict,
  sweep_dir: str,
  *,
  train_fn: TrainFn,
  only: str | None = None,
) -> list[tuple[Run, str]]:
  """Runs every unfinished run of a sweep in this process, one after another.

  A finished run (results.json at its last step) is skipped; an interrupted one resumes from
  its checkpoint (train_and_evaluate does that by itself). A run that raises is logged and the
  sweep goes on with the next one.

  Args:
    sweep_config: a ConfigDict from configs/sweeps/*.py.
    sweep_dir: where the run workdirs go.
    train_fn: (config, workdir) -> results, e.g. sleep_jax.train.loop.train_and_evaluate.
    only: run only this arm.

  Returns:
    The failed runs with their error text (empty when every run finished).
  """
  runs = expand_runs(sweep_config, sweep_dir, only=only)
  all_runs = runs if only is None else expand_runs(sweep_config, sweep_dir)
  write_sweep_file(sweep_config, sweep_dir, all_runs)
  base = load_config(sweep_config.base)
  failures = []
  for index, run in enumerate(runs, 1):
    where = f"[{index}/{len(runs)}] {paths.relative(run.workdir, sweep_dir)}"
    if rundir.RunDir(run.workdir).is_finished(run.num_steps):
      logger.info("%s: finished already, skipped", where)
      continue
    logger.info("%s: training %s", where, run.overrides)
    try:
      config = apply_overrides(base, run.overrides)
      write_run_file(run)
      train_fn(config, run.workdir)
    except Exception:
      error = traceback.format_exc()
      logger.error("%s failed:\n%s", where, error)
      failures.append((run, error))
  return failures


def arm(name: str, overrides: dict[str, Any] | None = None, *, step_ratio: float = 1.0) -> dict:
  """One arm of a sweep config: `arm("n2", {"sleep.passes": 2})`."""
  return {"name": name, "overrides": dict(overrides or {}), "step_ratio": float(step_ratio)}


def passes_arms(passes) -> tuple[dict, ...]:
  """One arm per number of sleep passes N, named n{N}: `passes_arms((1, 2, 4))`."""
  return tuple(arm(f"n{n}", {"sleep.passes": n}) for n in passes)
