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

import copy
import dataclasses
import importlib.util
import json
import os
import traceback
from collections.abc import Callable
from typing import Any

from absl import logging
from ml_collections import config_dict

from sleep_jax.train import loop

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEP_FILE = "sweep.json"  # in the sweep dir: the grid, so reports know which runs are missing
SWEEP_RUN_FILE = "sweep_run.json"  # in each run's workdir: its coordinates in the grid


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


def load_config(spec: str) -> config_dict.ConfigDict:
  """Loads an experiment config from "path.py[:variant]" the way `--config=` does.

  Args:
    spec: a config file path, optionally followed by ":variant" (passed to get_config).

  Returns:
    The ConfigDict that the file's get_config returns.
  """
  path, _, variant = spec.partition(":")
  if not os.path.isabs(path) and not os.path.exists(path):
    path = os.path.join(REPO_ROOT, path)  # so sweeps work from any cwd
  if not os.path.exists(path):
    raise FileNotFoundError(f"config file {spec.partition(':')[0]!r} not found (cwd or {REPO_ROOT})")
  module_name = "_sweep_config_" + os.path.splitext(os.path.basename(path))[0]
  module_spec = importlib.util.spec_from_file_location(module_name, path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(variant) if variant else module.get_config()


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  """Nested dict / ConfigDict -> {dotted key: leaf value}."""
  if isinstance(tree, config_dict.ConfigDict):
    tree = tree.to_dict()
  out = {}
  for key, value in tree.items():
    if isinstance(value, (dict, config_dict.ConfigDict)):
      out.update(flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def apply_overrides(config: config_dict.ConfigDict, overrides: dict[str, Any]) -> config_dict.ConfigDict:
  """Returns a locked copy of `config` with dotted-key overrides applied.

  Args:
    config: the base experiment config.
    overrides: {"sleep.passes": 2, ...}; every key must already exist in `config`, so a typo
      in a sweep config fails at expansion time instead of silently training the wrong arm.

  Returns:
    A new, locked ConfigDict.
  """
  config = copy.deepcopy(config)  # keeps the field types, so a wrong-typed value is refused
  config.unlock()
  known = set(flatten(config))
  for key, value in overrides.items():
    if key not in known:
      raise KeyError(f"override {key}={value!r}: the base config has no field {key!r}")
    parent, _, field = key.rpartition(".")
    section = config
    for part in parent.split(".") if parent else ():
      section = section[part]
    section[field] = value
  config.lock()
  return config


def expand_runs(sweep_config: config_dict.ConfigDict, sweep_dir: str,
                only: str | None = None) -> list[Run]:
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
        run = Run(sweep=sweep_config.name, arm=arm["name"], seed=int(seed), depth=depth,
                  base=sweep_config.base, overrides=overrides,
                  workdir=os.path.join(sweep_dir, *parts))
        apply_overrides(base, overrides)  # fail now on a bad key, not hours into the sweep
        runs.append(run)
  return runs


def is_finished(workdir: str, num_steps: int) -> bool:
  """True when the run's results.json reports its final step (an interrupted run is not)."""
  try:
    with open(os.path.join(workdir, loop.RESULTS_FILE)) as f:
      return json.load(f).get("step") == num_steps
  except (OSError, ValueError):
    return False


def write_sweep_file(sweep_config: config_dict.ConfigDict, sweep_dir: str, runs: list[Run]) -> str:
  """Writes `<sweep_dir>/sweep.json`: the grid, so a report can count the missing runs."""
  os.makedirs(sweep_dir, exist_ok=True)
  path = os.path.join(sweep_dir, SWEEP_FILE)
  grid = {"name": sweep_config.name, "base": sweep_config.base,
          "arms": [arm["name"] for arm in sweep_config.arms],
          "seeds": list(sweep_config.seeds), "depths": list(sweep_config.get("depths") or ()),
          "runs": [dict(run.coordinates(), workdir=os.path.relpath(run.workdir, sweep_dir))
                   for run in runs]}
  with open(path, "w") as f:
    json.dump(grid, f, indent=2)
  return path


def write_run_file(run: Run) -> str:
  """Writes `<workdir>/sweep_run.json` with the run's coordinates."""
  os.makedirs(run.workdir, exist_ok=True)
  path = os.path.join(run.workdir, SWEEP_RUN_FILE)
  with open(path, "w") as f:
    json.dump(run.coordinates(), f, indent=2)
  return path


def run_sweep(sweep_config: config_dict.ConfigDict, sweep_dir: str, *, only: str | None = None,
              train_fn: Callable[[config_dict.ConfigDict, str], Any] | None = None,
              ) -> list[tuple[Run, str]]:
  """Runs every unfinished run of a sweep in this process, one after another.

  A finished run (results.json at its last step) is skipped; an interrupted one resumes from
  its checkpoint (train_and_evaluate does that by itself). A run that raises is logged and the
  sweep goes on with the next one.

  Args:
    sweep_config: a ConfigDict from configs/sweeps/*.py.
    sweep_dir: where the run workdirs go.
    only: run only this arm.
    train_fn: (config, workdir) -> results; default sleep_jax.train.loop.train_and_evaluate.

  Returns:
    The failed runs with their error text (empty when every run finished).
  """
  if train_fn is None:
    train_fn = loop.train_and_evaluate
  runs = expand_runs(sweep_config, sweep_dir, only=only)
  all_runs = runs if only is None else expand_runs(sweep_config, sweep_dir)
  write_sweep_file(sweep_config, sweep_dir, all_runs)
  base = load_config(sweep_config.base)
  failures = []
  for index, run in enumerate(runs, 1):
    where = f"[{index}/{len(runs)}] {os.path.relpath(run.workdir, sweep_dir)}"
    if is_finished(run.workdir, run.num_steps):
      logging.info("%s: finished already, skipped", where)
      continue
    logging.info("%s: training %s", where, run.overrides)
    try:
      config = apply_overrides(base, run.overrides)
      write_run_file(run)
      train_fn(config, run.workdir)
    except Exception:  # noqa: BLE001  one bad run must not cost the rest of the sweep
      error = traceback.format_exc()
      logging.error("%s failed:\n%s", where, error)
      failures.append((run, error))
  return failures


def arm(name: str, overrides: dict[str, Any] | None = None, *, step_ratio: float = 1.0) -> dict:
  """One arm of a sweep config: `arm("n2", {"sleep.passes": 2})`."""
  return {"name": name, "overrides": dict(overrides or {}), "step_ratio": float(step_ratio)}


ENTRYPOINT = ("python", "launch/main.py")  # relative to the repository root


@dataclasses.dataclass(frozen=True)
class Job:
  """One run of a sweep as a `launch/main.py` command (what launch/xm_launch.py submits).

  Attributes:
    name: unique within the sweep: the run's workdir relative to the sweep dir.
    args: flag name -> value, e.g. {"config": "configs/rule110.py:paper", "workdir": ...,
      "config.sleep.passes": "2"}; each becomes `--name=value`.
  """

  name: str
  args: dict[str, str]

  def command(self) -> list[str]:
    return [*ENTRYPOINT, *(f"--{key}={value}" for key, value in self.args.items())]


def flag_value(value: Any) -> str:
  """Formats a config value the way config_flags parses it back (tuples as "(a, b)")."""
  if isinstance(value, (tuple, list)):
    inner = ", ".join(flag_value(v) for v in value)
    return f"({inner},)" if len(value) == 1 else f"({inner})"
  return str(value)


def make_jobs(sweep_config: config_dict.ConfigDict, sweep_dir: str,
              only: str | None = None) -> list[Job]:
  """The sweep's runs as `launch/main.py` jobs, in expand_runs order.

  Args:
    sweep_config: a ConfigDict from configs/sweeps/*.py.
    sweep_dir: the sweep directory; each job gets its run's workdir inside it.
    only: keep only this arm.

  Returns:
    One Job per run: --config=<base> --workdir=<run dir> --config.<key>=<value> per override.
  """
  jobs = []
  for run in expand_runs(sweep_config, sweep_dir, only=only):
    args = {"config": run.base, "workdir": run.workdir}
    args.update({f"config.{key}": flag_value(value) for key, value in run.overrides.items()
                 if value is not None})
    jobs.append(Job(name=os.path.relpath(run.workdir, sweep_dir).replace(os.sep, "/"), args=args))
  return jobs
