"""Sweep reports: a sweep directory -> report.md, PNG figures and TensorBoard summaries.

  python -m sleep_jax.experiments.report runs/sweeps/rule110_cpu [--out docs/results/rule110_cpu]

Reads every run workdir below the sweep dir (see `load_runs`). Rule 110: exact accuracy by arm
and depth (a run trained on mixed depths, task.depths, is one group "t∈{0,2,4}"), accuracy vs N,
learning curves, per-depth evaluations; when any run halts adaptively (sleep.halt), accuracy and
passes used per evaluated depth, accuracy against passes used, and the passes histograms. Depo and GSM-Infinite: loss
and accuracy by arm and hop count k or operation count. The paper's published numbers
(PAPER.md section 4) sit beside ours, marked "not comparable" where the depth or scale differs. Partial sweeps work: a cell averages the
finished runs only and says how many of the expected runs that is. The sweep dir and --out may
be gs:// paths (sleep_jax.paths): runs are read from, and the report written to, cloud storage.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import numpy as np

from sleep_jax import console, paths, rundir
from sleep_jax.data import rule110
from sleep_jax.data.depo import EVAL_HOPS as DEPO_HOPS
from sleep_jax.experiments import report_figures as figures

# Fig. 2 at t=32, read off the plot (PAPER.md section 4); N -> exact accuracy.
PAPER_RULE110_T32 = {1: "~10%", 2: "~20%", 3: ">30%", 4: ">30%"}
PAPER_RULE110_SCALE = "d_model 256, AGAG, batch 512, ~5B tokens"
PAPER_GSM = (
  "Paper (sections 6.3-6.4, pretrained models fine-tuned; accuracy, N=1 -> best N): "
  "Jet-Nemotron-2B, hard L=2000: 6 ops 0.742 -> 0.812, 8 ops 0.351 -> 0.388; Ouro-1.4B + 6 Jet "
  "layers, hard L=2000: 6 ops 0.419 -> 0.615, 8 ops 0.210 -> 0.272; Ouro, sliding L=512 (N=1 -> "
  "N=4): 2 ops 0.596 -> 0.905, 4 ops 0.839 -> 0.926, 6 ops 0.251 -> 0.320, 8 ops 0.116 -> 0.137."
)
PAPER_DEPO = (
  "Paper (Fig. 3, test loss only, 100k steps, qualitative): all N learn k = 1, 2; "
  "N=1 barely moves for k >= 4; N=2 stalls at k >= 8; only N=4 starts to improve at "
  "k = 16."
)


@dataclasses.dataclass
class RunRecord:
  """What one run directory holds. `results` is None until its first evaluation."""

  workdir: str
  arm: str
  seed: int
  depth: figures.Depth
  task: str
  passes: int
  num_steps: int | None
  config: dict
  results: rundir.Results | None
  train_log: list[dict]
  eval_log: list[dict]

  @property
  def finished(self) -> bool:
    return self.results is not None and self.results.step == self.num_steps

  @property
  def halt(self) -> str:
    """sleep.halt: "never" (every window gets N passes), "converge" or "learned" (adaptive)."""
    return self.config.get("sleep", {}).get("halt", "never")


def load_runs(sweep_dir: str) -> list[RunRecord]:
  """Every run below `sweep_dir`: a directory holding config.json (written when a run starts).

  Args:
    sweep_dir: the sweep directory (launch/sweep.py's --sweep_dir).

  Returns:
    One record per run; a run not started by a sweep (no sweep_run.json) is named "n<passes>",
    or "n<passes>_<halt>" when it halts adaptively (N is then the most passes).
  """
  records = []
  for root, dirs, files in paths.walk(sweep_dir):
    dirs[:] = sorted(d for d in dirs if d not in (rundir.CHECKPOINT_DIR, "report_tb"))
    run = rundir.RunDir(root)
    config = run.config() if rundir.CONFIG_FILE in files else None
    if config is None:
      continue
    coords = rundir.read_json(run.file(rundir.SWEEP_RUN_FILE)) or {}
    task = config["task"]
    depth = None
    if task["name"] == "rule110":  # a mixed-depth run (task.depths) groups as the tuple
      depth = tuple(int(t) for t in task["depths"]) if task.get("depths") else task.get("depth")
    passes = int(config["sleep"]["passes"])
    halt = config["sleep"].get("halt", "never")
    records.append(
      RunRecord(
        workdir=root,
        arm=coords.get("arm", f"n{passes}" if halt == "never" else f"n{passes}_{halt}"),
        seed=int(config["seed"]),
        depth=depth,
        task=task["name"],
        passes=passes,
        num_steps=int(config["train"]["num_steps"]),
        config=config,
        results=run.results(),
        train_log=run.train_log(),
        eval_log=run.eval_log(),
      )
    )
  return records


def _arm_order(grid: dict | None, runs: list[RunRecord]) -> list[str]:
  """The sweep config's arm order, else n1, n2, ... then the rest alphabetically."""
  if grid:
    return list(grid["arms"])

  def key(arm):
    match = re.fullmatch(r"n(\d+)", arm)
    return (0, int(match.group(1)), "") if match else (1, 0, arm)

  return sorted({r.arm for r in runs}, key=key)


def _expected(grid: dict | None, runs: list[RunRecord], arm: str, depth: figures.Depth) -> int:
  if grid:  # a grid without a depth axis runs every arm at one depth (or mix): any matches
    return sum(1 for r in grid["runs"] if r["arm"] == arm and r.get("depth", depth) == depth)
  return sum(1 for r in runs if r.arm == arm and r.depth == depth)


def summarize(values: list[float]) -> tuple[float, float, int]:
  """(mean, sample std (0 for one value), n) of the finished runs' values."""
  arr = np.asarray(values, dtype=np.float64)
  std = float(arr.std(ddof=1)) if arr.size > 1 else 0.0
  return (float(arr.mean()) if arr.size else float("nan")), std, int(arr.size)


def _cell(values: list[float], expected: int, percent: bool) -> str:
  if not values:
    return f"- (0/{expected})"
  mean, std, n = summarize(values)
  scale, digits = (100.0, 1) if percent else (1.0, 3)
  text = f"{mean * scale:.{digits}f}"
  if n > 1:
    text += f" ± {std * scale:.{digits}f}"
  return f"{text} ({n}/{expected})"


def _values(runs: list[RunRecord], key: str, **where) -> list[float]:
  return [
    r.results.eval[key]
    for r in runs
    if r.finished and key in r.results.eval and all(getattr(r, k) == v for k, v in where.items())
  ]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
  return [
    "| " + " | ".join(header) + " |",
    "|" + "---|" * len(header),
    *("| " + " | ".join(row) + " |" for row in rows),
    "",
  ]


def _paper_scale_gaps(config: dict, depth: figures.Depth) -> list[str]:
  """Why a Rule 110 run is not comparable with the paper's Fig. 2 (empty: comparable)."""
  gaps = [] if depth == 32 else [f"depth {figures.depth_text(depth)} (paper: 32)"]
  model, train = config.get("model", {}), config.get("train", {})
  tokens = train.get("num_steps", 0) * train.get("batch_size", 0) * 100
  if (
    model.get("d_model") != 256 or model.get("pattern") != "AGAG" or train.get("batch_size") != 512
  ):
    gaps.append(
      f"model/batch (d_model {model.get('d_model')}, {model.get('pattern')}, batch "
      f"{train.get('batch_size')})"
    )
  if tokens < 4e9:
    gaps.append(f"{tokens:.2g} training tokens (paper: ~5B)")
  return gaps


def _rule110_sections(runs, grid, arms, figs) -> list[str]:
  depths = sorted(
    {r.depth for r in runs if r.depth is not None} | set((grid or {}).get("depths", ())),
    key=figures.depth_order,
  )
  depths = depths or [None]
  lines = ["## Exact accuracy (%), mean ± std over seeds (finished/expected runs)", ""]
  header = ["arm", *(figures.depth_label(d) for d in depths), "paper, t=32 (Fig. 2)"]
  rows = []
  for arm in arms:
    match = re.fullmatch(r"n(\d+)", arm)  # the plain N-pass arms; baselines have no paper number
    paper = PAPER_RULE110_T32.get(int(match.group(1)), "-") if match else "-"
    rows.append(
      [
        arm,
        *(
          _cell(
            _values(runs, "exact_accuracy", arm=arm, depth=d), _expected(grid, runs, arm, d), True
          )
          for d in depths
        ),
        paper,
      ]
    )
  # The floor a model sits on when it has learnt only the label marginals (not 1/16: labels
  # are unbalanced). The paper's N=1 at t=32 (~10%) is on it.
  majority = {d: rule110.majority_baseline(d) for d in depths if d is not None}
  rows.append(
    [
      "majority label (best constant answer)",
      *(f"{100 * majority[d]:.1f}" if d in majority else "-" for d in depths),
      f"{100 * rule110.majority_baseline(32):.1f}",
    ]
  )
  lines += _table(header, rows)
  lines += ["## Eval loss, mean ± std over seeds", ""]
  lines += _table(
    ["arm", *(figures.depth_label(d) for d in depths)],
    [
      [
        arm,
        *(
          _cell(_values(runs, "loss", arm=arm, depth=d), _expected(grid, runs, arm, d), False)
          for d in depths
        ),
      ]
      for arm in arms
    ],
  )
  lines += [
    "## Against the paper",
    "",
    f"Paper, Fig. 2 ({PAPER_RULE110_SCALE}, one seed): at t=32 N=1 is about 10% exact "
    f"accuracy (the majority-label answer gets {100 * rule110.majority_baseline(32):.1f}%; "
    "guessing 6.25%), N=2 about 20%, N=3 and N=4 above 30%.",
    "",
  ]
  for d in depths:
    # Compare the sleeping arms with the paper (not the attention-only or no-eviction baselines).
    configs = [
      r.config
      for r in runs
      if r.depth == d
      and r.config
      and r.config.get("sleep", {}).get("eviction") != "none"
      and "G" in r.config.get("model", {}).get("pattern", "G")
    ]
    gaps = _paper_scale_gaps(configs[0], d) if configs else ["no config.json"]
    verdict = "comparable" if not gaps else "not comparable: " + "; ".join(gaps)
    lines.append(f"- {figures.depth_label(d)}: {verdict}.")
  lines.append("")
  if any(r.halt != "never" for r in runs):
    lines += _adaptive_sections(runs, grid, arms, figs)

  lines += ["## Figures", ""]
  # Adaptive arms sit on the figures of passes used (above), not at their most passes N.
  fixed_n = [r for r in runs if r.halt == "never"]
  figs["accuracy_vs_passes"] = figures.accuracy_vs_passes(
    fixed_n, [a for a in arms if any(r.arm == a for r in fixed_n)], depths, _values, majority
  )
  for d in depths:
    suffix, label = figures.depth_suffix(d), figures.depth_label(d)
    group = [r for r in runs if r.depth == d]
    figs[f"train_loss{suffix}"] = figures.learning_curves(
      group, arms, "loss", f"train loss, {label}", log="train_log"
    )
    if any(len(r.eval_log) > 1 for r in group):
      figs[f"eval_exact_accuracy{suffix}"] = figures.learning_curves(
        group, arms, "exact_accuracy", f"eval exact accuracy, {label}", log="eval_log"
      )
    if any(k.startswith("depth") for r in group if r.results for k in r.results.eval):
      figs[f"per_depth_eval{suffix}"] = figures.per_depth_eval(group, arms, f"trained at {label}")
  return lines


# --- Adaptive sleep (sleep.halt != "never"): accuracy and passes used, per evaluated depth. ---


def _evaluated_depths(runs: list[RunRecord]) -> list[int]:
  """The depths t of the evaluation slices any finished run reports ("depth{t}/...")."""
  pattern = re.compile(r"^depth(\d+)/exact_accuracy$")
  return sorted(
    {
      int(m.group(1))
      for r in runs
      if r.finished
      for key in r.results.eval
      if (m := pattern.match(key))
    }
  )


def passes_used(run: RunRecord, prefix: str = "") -> float | None:
  """Mean passes per slept window on an evaluation set ("" the main set, "depth4/" a slice).

  Fixed-N runs (halt "never") report no passes metrics: every window got `sleep.passes`. An
  adaptive run without the metric (an older run, a slice it did not evaluate) gives None.
  """
  if run.halt == "never":
    return float(run.passes)
  return run.results.eval.get(f"{prefix}passes_mean") if run.results else None


def _paired(runs: list[RunRecord], arm: str, depth, prefix: str) -> tuple[list, list]:
  """Per finished seed of `arm`: (passes used, exact accuracy) on one set, where both exist."""
  pairs = [
    (passes_used(r, prefix), r.results.eval.get(f"{prefix}exact_accuracy"))
    for r in runs
    if r.arm == arm and r.depth == depth and r.finished
  ]
  pairs = [(p, a) for p, a in pairs if p is not None and a is not None]
  return [p for p, _ in pairs], [a for _, a in pairs]


def _passes_cell(run_group: list[RunRecord], expected: int, prefix: str) -> str:
  """Passes used on one set: "4 (fixed)" for fixed-N arms, else mean ± std over seeds."""
  done = [r for r in run_group if r.finished]
  if done and all(r.halt == "never" for r in done):
    return f"{done[0].passes} (fixed)"
  values = [v for r in done if (v := passes_used(r, prefix)) is not None]
  if not values:
    return f"- (0/{expected})"
  mean, std, n = summarize(values)
  return f"{mean:.2f}" + (f" ± {std:.2f}" if n > 1 else "") + f" ({n}/{expected})"


def _deeper_minus_shallower(run_group: list[RunRecord], low: int, high: int) -> str:
  """Passes at the deepest slice minus the shallowest, paired within each seed's run."""
  diffs = []
  for r in run_group:
    if r.finished and r.halt != "never":
      a, b = passes_used(r, f"depth{high}/"), passes_used(r, f"depth{low}/")
      if a is not None and b is not None:
        diffs.append(a - b)
  if not diffs:
    return "-"
  mean, std, n = summarize(diffs)
  return f"{mean:+.2f}" + (f" ± {std:.2f}" if n > 1 else "") + f" ({n})"


def _max_passes(runs: list[RunRecord]) -> int:
  return max((r.passes for r in runs if r.halt != "never"), default=0)


@dataclasses.dataclass(frozen=True)
class _Group:
  """The runs trained at one depth (or mix) and what the adaptive tables need to know of them.

  Attributes:
    runs: every run of the sweep (for the expected counts).
    group: the runs trained at `depth`.
    grid: sweep.json, or None.
    arms: the arm order.
    depth: the training depth, or mix of depths.
    sets: (column name, metric key prefix) of the main held-out set and each depth slice.
  """

  runs: list[RunRecord]
  group: list[RunRecord]
  grid: dict | None
  arms: list[str]
  depth: figures.Depth
  sets: list[tuple[str, str]]

  def of(self, arm: str) -> list[RunRecord]:
    return [r for r in self.group if r.arm == arm]

  def expected(self, arm: str) -> int:
    return _expected(self.grid, self.runs, arm, self.depth)

  @property
  def adaptive(self) -> list[str]:
    return [a for a in self.arms if any(r.halt != "never" for r in self.of(a))]

  @property
  def trained(self) -> str:
    return f"trained at {figures.depth_label(self.depth)}"


def _adaptive_accuracy(g: _Group) -> list[str]:
  """Exact accuracy per evaluated depth and arm, with each set's majority-label floor."""
  floors = [
    rule110.majority_baseline(int(p[len("depth") : -1]) if p else g.depth) for _, p in g.sets
  ]
  rows = [
    [
      arm,
      next((r.halt for r in g.of(arm)), "-"),
      *(
        _cell(_values(g.group, f"{p}exact_accuracy", arm=arm), g.expected(arm), True)
        for _, p in g.sets
      ),
    ]
    for arm in g.arms
  ]
  rows.append(["majority label (best constant answer)", "-", *(f"{100 * f:.1f}" for f in floors)])
  return [
    f"## Adaptive sleep ({g.trained}): exact accuracy (%) per evaluated depth",
    "",
    "Mean ± std over seeds (finished/expected runs); the main set is drawn as the training data.",
    "",
    *_table(["arm", "halt", *(name for name, _ in g.sets)], rows),
  ]


def _adaptive_passes(g: _Group, evaluated: list[int]) -> list[str]:
  """Passes used per evaluated depth and arm: does the model sleep longer where t is larger?"""
  extremes = (evaluated[0], evaluated[-1]) if len(evaluated) > 1 else None
  last = f"t={extremes[1]} − t={extremes[0]}" if extremes else "deeper − shallower"
  rows = [
    [
      arm,
      *(_passes_cell(g.of(arm), g.expected(arm), p) for _, p in g.sets),
      _deeper_minus_shallower(g.of(arm), *extremes) if extremes else "-",
    ]
    for arm in g.arms
  ]
  return [
    f"## Adaptive sleep ({g.trained}): passes used per window, per evaluated depth",
    "",
    "Does the model sleep longer where the task is deeper? Mean passes per slept window, mean ± "
    "std over seeds; fixed-N arms use N everywhere. The last column is the passes at the "
    "deepest slice minus the shallowest, paired within each run (mean ± std (runs)).",
    "",
    *_table(["arm", *(name for name, _ in g.sets), last], rows),
  ]


def _passes_shares(g: _Group, arm: str, prefix: str, max_passes: int) -> list[list[float]]:
  """Per n = 1..max_passes, the finished seeds' shares of windows that took n passes."""
  return [_values(g.group, f"{prefix}passes_hist/{n}", arm=arm) for n in range(1, max_passes + 1)]


def _adaptive_histograms(g: _Group, max_passes: int) -> list[str]:
  rows = []
  for arm in g.adaptive:
    for name, p in g.sets:
      shares = _passes_shares(g, arm, p, max_passes)
      if any(shares):
        rows.append([arm, name, *(f"{100 * np.mean(v):.1f}" if v else "-" for v in shares)])
  return [
    f"## Adaptive sleep ({g.trained}): how many passes the windows took (%)",
    "",
    "Share of slept windows that took exactly n passes, mean over seeds; rows per adaptive "
    "arm and evaluation set.",
    "",
    *_table(["arm", "set", *(f"n={n}" for n in range(1, max_passes + 1))], rows),
  ]


def _adaptive_figures(g: _Group, max_passes: int, figs: dict) -> None:
  """Accuracy against passes used on every set; each adaptive arm's histograms by set."""
  suffix = figures.depth_suffix(g.depth)
  fixed = {arm for arm in g.arms if all(r.halt == "never" for r in g.of(arm))}
  for name, p in g.sets:
    points = {arm: _paired(g.group, arm, g.depth, p) for arm in g.arms}
    figs["pareto" + suffix + (f"_{p.rstrip('/')}" if p else "")] = figures.accuracy_vs_passes_used(
      points, fixed, f"exact accuracy vs passes used ({name}; {g.trained})"
    )
  slices = [(name, p) for name, p in g.sets if p] or g.sets  # by depth where there are slices
  for arm in g.adaptive:
    figs[f"passes_hist_{arm}{suffix}"] = figures.passes_histogram(
      {name: _passes_shares(g, arm, p, max_passes) for name, p in slices},
      f"{arm}: passes per window by evaluated set ({g.trained})",
    )


def _adaptive_sections(runs, grid, arms, figs) -> list[str]:
  """Does the model sleep longer where the task is deeper, and what do the passes buy?"""
  evaluated = _evaluated_depths(runs)
  sets = [("main set", ""), *((f"t={t}", f"depth{t}/") for t in evaluated)]
  max_passes = _max_passes(runs)
  lines = []
  for d in sorted({r.depth for r in runs}, key=figures.depth_order):
    g = _Group(runs, [r for r in runs if r.depth == d], grid, arms, d, sets)
    lines += _adaptive_accuracy(g) + _adaptive_passes(g, evaluated)
    lines += _adaptive_histograms(g, max_passes)
    _adaptive_figures(g, max_passes, figs)
  return lines


@dataclasses.dataclass(frozen=True)
class Sliced:
  """A task evaluated per setting: Depo per hop count k, GSM-Infinite per operation count."""

  prefix: str  # metric keys "{prefix}{k}/loss", "{prefix}{k}/accuracy"
  label: str  # what k counts, for headings and axes
  symbol: str  # column headers "{symbol}={k}"
  paper: str  # the paper's numbers, for "Against the paper"
  settings: tuple[int, ...] = ()  # always these columns; empty: those any run evaluated


SLICED_TASKS = {
  "depo": Sliced("hops", "hop count k", "k", PAPER_DEPO, settings=tuple(DEPO_HOPS)),
  "gsm_infinite": Sliced("ops", "operation count", "ops", PAPER_GSM),
}


def _settings(runs: list[RunRecord], sliced: Sliced) -> list[int]:
  """The settings k of the columns: the task's fixed ones, or those any run evaluated."""
  if sliced.settings:
    return list(sliced.settings)
  pattern = re.compile(rf"^{sliced.prefix}(\d+)/accuracy$")
  found = {
    int(m.group(1))
    for r in runs
    if r.results
    for key in r.results.eval
    if (m := pattern.match(key))
  }
  return sorted(found)


def _sliced_sections(runs, grid, arms, figs, sliced: Sliced) -> list[str]:
  lines = []
  settings = _settings(runs, sliced)
  # {prefix}{k}/accuracy scores whole answers; its mixed-k counterpart is answer_accuracy (the
  # trainer's plain "accuracy" is per token).
  for metric, overall, percent in (("loss", "loss", False), ("accuracy", "answer_accuracy", True)):
    unit = " (%)" if percent else ""
    lines += [f"## Eval {metric}{unit} per {sliced.label}, mean ± std over seeds", ""]
    lines += _table(
      ["arm", *(f"{sliced.symbol}={k}" for k in settings), f"all {sliced.symbol}"],
      [
        [
          arm,
          *(
            _cell(
              _values(runs, f"{sliced.prefix}{k}/{metric}", arm=arm),
              _expected(grid, runs, arm, None),
              percent,
            )
            for k in settings
          ),
          _cell(_values(runs, overall, arm=arm), _expected(grid, runs, arm, None), percent),
        ]
        for arm in arms
      ],
    )
  caveat = (
    " Our numbers are comparable only in shape (which settings each N learns), and only for a "
    "run at the paper's scale; not comparable otherwise."
  )
  lines += ["## Against the paper", "", sliced.paper + caveat, "", "## Figures", ""]
  for metric in ("loss", "accuracy"):
    figs[f"{metric}_vs_{sliced.prefix}"] = figures.metric_vs_setting(
      runs, arms, metric, settings, _values, prefix=sliced.prefix, label=sliced.label
    )
  figs["train_loss"] = figures.learning_curves(runs, arms, "loss", "train loss", log="train_log")
  if any(len(r.eval_log) > 1 for r in runs):
    figs["eval_loss"] = figures.learning_curves(runs, arms, "loss", "eval loss", log="eval_log")
  return lines


def _runs_table(runs: list[RunRecord], sweep_dir: str, metric: str) -> list[str]:
  rows = []
  for r in sorted(runs, key=lambda r: (r.arm, figures.depth_order(r.depth), r.seed)):
    value = r.results.eval.get(metric) if r.results else None
    step, wall_s = (r.results.step, r.results.wall_s) if r.results else (0, 0.0)
    rows.append(
      [
        paths.relative(r.workdir, sweep_dir),
        r.arm,
        str(r.seed),
        figures.depth_text(r.depth),
        f"{step}/{r.num_steps}",
        "-" if value is None else f"{value:.4f}",
        f"{wall_s / 60:.1f}",
      ]
    )
  return [
    "## Runs",
    "",
    *_table(["workdir", "arm", "seed", "depth", "step", metric, "wall min"], rows),
  ]


def _log_tensorboard(tb_dir: str, figs: dict, runs: list[RunRecord], arms: list[str], task: str):
  """Figures and per-arm summary scalars (x axis: depth for Rule 110, k for Depo)."""
  from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top

  staged = paths.StagedDir(tb_dir)  # tensorboardX writes local files; copied to a gs:// sweep
  writer = SummaryWriter(staged.local)
  for name, fig in figs.items():
    writer.add_figure(f"report/{name}", fig, close=False)
  sliced = SLICED_TASKS.get(task)
  settings = _settings(runs, sliced) if sliced else []
  for arm in arms:
    if sliced:
      for k in settings:
        for metric in ("loss", "accuracy"):
          values = _values(runs, f"{sliced.prefix}{k}/{metric}", arm=arm)
          if values:
            writer.add_scalar(f"{sliced.prefix}_{metric}/{arm}", summarize(values)[0], k)
    else:
      single = {r.depth for r in runs if r.arm == arm and isinstance(r.depth, int)}
      for depth in sorted(single):  # a depth is the x axis: mixed-depth runs have none
        values = _values(runs, "exact_accuracy", arm=arm, depth=depth)
        if values:
          writer.add_scalar(f"exact_accuracy_by_depth/{arm}", summarize(values)[0], depth)
  writer.close()
  staged.close()


def _task_of_base(grid: dict | None) -> str:
  """The task of a sweep with no run yet, from its base config's file name."""
  base = (grid or {}).get("base", "")
  return next((task for task in SLICED_TASKS if task in base), "rule110")


def write_report(sweep_dir: str, out_dir: str | None = None, *, tensorboard: bool = True) -> str:
  """Writes report.md and its PNG figures for a (possibly partial) sweep.

  Args:
    sweep_dir: the sweep directory, holding one workdir per run (and sweep.json if launched by
      launch/sweep.py).
    out_dir: where report.md and the PNGs go (default: `sweep_dir`), e.g. docs/results/<name>.
    tensorboard: also log the figures and summary scalars to `<sweep_dir>/report_tb`.

  Returns:
    The path of report.md.
  """
  out_dir = out_dir or sweep_dir
  paths.makedirs(out_dir)
  grid = rundir.read_json(paths.join(sweep_dir, rundir.SWEEP_FILE))
  runs = load_runs(sweep_dir)
  arms = _arm_order(grid, runs)
  task = runs[0].task if runs else _task_of_base(grid)
  expected = len(grid["runs"]) if grid else len(runs)
  name = grid["name"] if grid else sweep_dir.rstrip("/").rsplit("/", 1)[-1]
  status = (
    f"Task {task}; base config `{grid['base'] if grid else '?'}`; "
    f"{sum(r.finished for r in runs)}/{expected} runs finished, "
    f"{sum(not r.finished for r in runs)} in progress or failed, "
    f"{max(expected - len(runs), 0)} not started. "
    "Cells average finished runs only: value (finished/expected)."
  )
  lines = [f"# Sweep report: {name}", "", status, ""]
  figs: dict[str, Any] = {}
  if task in SLICED_TASKS:
    lines += _sliced_sections(runs, grid, arms, figs, SLICED_TASKS[task])
  else:
    lines += _rule110_sections(runs, grid, arms, figs)
  for fig_name, fig in figs.items():
    with paths.open_atomic(paths.join(out_dir, f"{fig_name}.png"), "wb") as f:
      fig.savefig(f, format="png", dpi=figures.DPI)
    lines += [f"![{fig_name}]({fig_name}.png)", ""]
  lines += _runs_table(runs, sweep_dir, "loss" if task in SLICED_TASKS else "exact_accuracy")
  if tensorboard:
    _log_tensorboard(paths.join(sweep_dir, "report_tb"), figs, runs, arms, task)
  for fig in figs.values():
    plt.close(fig)
  path = paths.join(out_dir, "report.md")
  paths.write_text(path, "\n".join(lines))
  return path


def summary_table(sweep_dir: str) -> str:
  """The sweep's arms side by side, as a console table: finished runs, then mean ± std (over
  seeds) of the main metrics of the finished runs, per depth for Rule 110."""
  runs = load_runs(sweep_dir)
  grid = rundir.read_json(paths.join(sweep_dir, rundir.SWEEP_FILE))
  arms = _arm_order(grid, runs)
  if runs and runs[0].task in SLICED_TASKS:
    sliced = SLICED_TASKS[runs[0].task]
    columns = [
      ("loss", "loss", False),
      ("answer acc %", "answer_accuracy", True),
      *(
        (f"{sliced.symbol}={k} acc %", f"{sliced.prefix}{k}/accuracy", True)
        for k in _settings(runs, sliced)
      ),
    ]
    groups = [(arm, None) for arm in arms]
  else:
    columns = [
      ("exact acc %", "exact_accuracy", True),
      ("acc %", "accuracy", True),
      ("loss", "loss", False),
    ]
    depths = sorted({r.depth for r in runs}, key=figures.depth_order)
    groups = [(arm, d) for d in depths for arm in arms]
  rows = []
  for arm, depth in groups:
    where = {"arm": arm} if depth is None else {"arm": arm, "depth": depth}
    done = [r for r in runs if r.finished and all(getattr(r, k) == v for k, v in where.items())]
    row = [arm if depth is None else f"{arm} ({figures.depth_label(depth)})", str(len(done))]
    for _, key, percent in columns:
      values = _values(runs, key, **where)
      if not values:
        row.append("-")
        continue
      mean, std, n = summarize(values)
      scale = 100.0 if percent else 1.0
      row.append(
        f"{mean * scale:.{1 if percent else 3}f}" + (f" ± {std * scale:.1f}" if n > 1 else "")
      )
    rows.append(row)
  return console.format_table(["arm", "runs", *(name for name, _, _ in columns)], rows)


def _main():
  from absl import app, flags  # pylint: disable=g-import-not-at-top  CLI only

  out = flags.DEFINE_string(
    "out", None, "Directory for report.md and the PNGs (default: the sweep dir)."
  )

  def main(argv):
    if len(argv) != 2:
      raise app.UsageError("usage: python -m sleep_jax.experiments.report <sweep_dir> [--out DIR]")
    print(write_report(argv[1], out.value))

  app.run(main)


if __name__ == "__main__":
  _main()
