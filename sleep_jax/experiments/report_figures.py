"""The figures of a sweep report (sleep_jax.experiments.report): small matplotlib figures, 600x400 px.

Every function takes run records (report.RunRecord) and the arm order and returns a Figure;
the caller saves, logs and closes it. Means are over seeds; bands and error bars are one
sample standard deviation.
"""

from __future__ import annotations

import re

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from sleep_jax.data import rule110

DPI = 100
FIGSIZE = (6, 4)  # inches: 600x400 px at DPI


Depth = int | tuple[int, ...] | None  # a run's training depth: t, a mix of t (task.depths), none


def depth_text(depth: Depth) -> str:
  """ "4", "{0,2,4}" for a mixed-depth run, "None" for a run with no depth."""
  if isinstance(depth, tuple):
    return "{" + ",".join(str(t) for t in depth) + "}"
  return str(depth)


def depth_label(depth: Depth) -> str:
  """ "t=4", or "t∈{0,2,4}" for a run trained on a mix of depths."""
  return ("t∈" if isinstance(depth, tuple) else "t=") + depth_text(depth)


def depth_suffix(depth: Depth) -> str:
  """A file-name suffix: "_depth4", "_depths0-2-4", "" for no depth."""
  if isinstance(depth, tuple):
    return "_depths" + "-".join(str(t) for t in depth)
  return "" if depth is None else f"_depth{depth}"


def depth_order(depth: Depth) -> tuple:
  """A sort key over the three kinds: no depth, then single depths, then mixes."""
  if depth is None:
    return (0,)
  return (2, *depth) if isinstance(depth, tuple) else (1, depth)


def _passes_of(arm: str) -> int | None:
  """N for the plain N-pass arms ("n4" -> 4); None for baselines (compute-matched, ...)."""
  match = re.fullmatch(r"n(\d+)", arm)
  return int(match.group(1)) if match else None


def _mean_std(values: list[float]) -> tuple[float, float]:
  arr = np.asarray(values, dtype=np.float64)
  return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def _mean_curve(logs: list[list[dict]], key: str):
  """Steps, mean and std over runs of `key`, at every step that at least one run logged."""
  by_step: dict[int, list[float]] = {}
  for log in logs:
    for entry in log:
      if key in entry:
        by_step.setdefault(entry["step"], []).append(entry[key])
  steps = sorted(by_step)
  stats = [_mean_std(by_step[s]) for s in steps]
  return np.array(steps), np.array([m for m, _ in stats]), np.array([s for _, s in stats])


def _new(title: str, xlabel: str, ylabel: str):
  fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
  ax.set_title(title, fontsize=10)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.grid(alpha=0.3)
  return fig, ax


def _finish(fig, ax):
  if ax.get_legend_handles_labels()[0]:
    ax.legend(fontsize=7)
  fig.tight_layout()
  return fig


def accuracy_vs_passes(runs, arms, depths, values_fn, majority=None):
  """Rule 110: exact accuracy vs N, one line per depth; baselines as labelled markers; the
  majority-label floor of each depth ({depth: accuracy}) as a dotted line."""
  fig, ax = _new("Rule 110: exact accuracy vs passes N", "passes N", "exact accuracy")
  for depth, floor in sorted((majority or {}).items(), key=lambda item: depth_order(item[0])):
    ax.axhline(floor, color="gray", ls=":", lw=1, label=f"majority label, {depth_label(depth)}")
  markers = iter("s^Dv<>PX*")
  for depth in depths:
    points = [
      (_passes_of(arm), values_fn(runs, "exact_accuracy", arm=arm, depth=depth))
      for arm in arms
      if _passes_of(arm) is not None
    ]
    points = [(n, _mean_std(v)) for n, v in points if v]
    if points:
      line = ax.errorbar(
        [n for n, _ in points],
        [m for _, (m, _) in points],
        yerr=[s for _, (_, s) in points],
        marker="o",
        capsize=3,
        label=depth_label(depth),
      )
      color = line[0].get_color()
    else:
      color = None
    for arm in arms:
      vals = values_fn(runs, "exact_accuracy", arm=arm, depth=depth)
      if _passes_of(arm) is None and vals:
        passes = next(r.passes for r in runs if r.arm == arm)
        mean, std = _mean_std(vals)
        ax.errorbar(
          [passes],
          [mean],
          yerr=[std],
          marker=next(markers, "o"),
          ls="none",
          capsize=3,
          color=color,
          label=f"{arm}, {depth_label(depth)}",
        )
  ax.set_ylim(0, 1.02)
  ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))  # N is a count
  return _finish(fig, ax)


def accuracy_vs_passes_used(points, fixed, title):
  """Adaptive sleep: exact accuracy against mean passes used per window, the accuracy bought
  per pass. `points`: arm -> (passes used, exact accuracy), one value per seed; arms in `fixed`
  (every window N passes) are joined by a line in order of N, the adaptive arms are separate
  markers; error bars are one std over seeds on both axes."""
  fig, ax = _new(title, "passes used per window (mean)", "exact accuracy")
  line = sorted(
    (_mean_std(p), _mean_std(a)) for arm, (p, a) in points.items() if arm in fixed and p
  )
  if line:
    ax.errorbar(
      [p for (p, _), _ in line],
      [a for _, (a, _) in line],
      xerr=[s for (_, s), _ in line],
      yerr=[s for _, (_, s) in line],
      marker="o",
      color="gray",
      capsize=3,
      label="fixed N",
    )
  markers = iter("s^Dv<>PX*")
  for arm, (p, a) in points.items():
    if arm not in fixed and p:
      (pm, ps), (am, as_) = _mean_std(p), _mean_std(a)
      ax.errorbar(
        [pm],
        [am],
        xerr=[ps],
        yerr=[as_],
        marker=next(markers, "o"),
        ls="none",
        capsize=3,
        label=arm,
      )
  ax.set_ylim(0, 1.02)
  return _finish(fig, ax)


def passes_histogram(series, title):
  """Adaptive sleep: the share of slept windows that took n passes, as grouped bars.
  `series`: name (an evaluation set) -> per n = 1, 2, ... the values over seeds of the share at
  n; the bars are the seed means."""
  fig, ax = _new(title, "passes n", "share of windows")
  names = [name for name, shares in series.items() if any(shares)]
  width = 0.8 / max(len(names), 1)
  for i, name in enumerate(names):
    ns = np.arange(1, len(series[name]) + 1)
    means = [_mean_std(v)[0] if v else 0.0 for v in series[name]]
    ax.bar(ns + (i - (len(names) - 1) / 2) * width, means, width=width, label=name)
  ax.set_ylim(0, 1.02)
  ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
  return _finish(fig, ax)


def learning_curves(runs, arms, key, title, *, log):
  """`key` vs step from each run's `log` ("train_log" or "eval_log"), mean over seeds with a
  std band, one line per arm; evaluations (few points) are marked."""
  fig, ax = _new(title, "step", key)
  for arm in arms:
    steps, mean, std = _mean_curve([getattr(r, log) for r in runs if r.arm == arm], key)
    if steps.size:
      ax.plot(steps, mean, marker="." if log == "eval_log" else None, label=arm)
      ax.fill_between(steps, mean - std, mean + std, alpha=0.2)
  return _finish(fig, ax)


def per_depth_eval(runs, arms, title):
  """Rule 110: final exact accuracy vs the depth it is evaluated at (`depth{t}/...` keys)."""
  fig, ax = _new(
    f"exact accuracy vs evaluated depth ({title})", "evaluated depth t", "exact accuracy"
  )
  for arm in arms:
    by_depth: dict[int, list[float]] = {}
    for r in runs:
      if r.arm == arm and r.finished:
        for key, value in r.results.eval.items():
          match = re.fullmatch(r"depth(\d+)/exact_accuracy", key)
          if match:
            by_depth.setdefault(int(match.group(1)), []).append(value)
    if by_depth:
      depths = sorted(by_depth)
      stats = [_mean_std(by_depth[d]) for d in depths]
      ax.errorbar(
        depths, [m for m, _ in stats], yerr=[s for _, s in stats], marker="o", capsize=3, label=arm
      )
  evaluated = sorted({d for r in runs for d in _evaluated_depths(r)})
  if evaluated:  # the majority-label floor at each evaluated depth
    floors = [rule110.majority_baseline(d) for d in evaluated]
    ax.plot(evaluated, floors, color="gray", ls=":", marker=".", label="majority label")
  return _finish(fig, ax)


def _evaluated_depths(run) -> list[int]:
  if not (run.finished and run.results):
    return []
  keys = (re.fullmatch(r"depth(\d+)/exact_accuracy", key) for key in run.results.eval)
  return [int(match.group(1)) for match in keys if match]


def metric_vs_setting(runs, arms, metric, settings, values_fn, *, prefix="hops", label="hops k"):
  """Depo or GSM-Infinite: eval `metric` vs the slice setting (hop or operation count) per arm
  (log2 x axis)."""
  fig, ax = _new(f"eval {metric} vs {label}", label, metric)
  for arm in arms:
    points = [(k, values_fn(runs, f"{prefix}{k}/{metric}", arm=arm)) for k in settings]
    points = [(k, _mean_std(v)) for k, v in points if v]
    if points:
      ax.errorbar(
        [k for k, _ in points],
        [m for _, (m, _) in points],
        yerr=[s for _, (_, s) in points],
        marker="o",
        capsize=3,
        label=arm,
      )
  if settings:
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(settings), [str(k) for k in settings])
  return _finish(fig, ax)
