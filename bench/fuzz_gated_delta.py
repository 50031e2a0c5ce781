"""Random differential testing of every `gated_delta_rule` implementation against the reference.

    python bench/fuzz_gated_delta.py                         # 1000 cases of every impl
    python bench/fuzz_gated_delta.py --cases 200 --impls chunked,pallas_gpu --json out.json
    python bench/fuzz_gated_delta.py --case 17               # one case alone, every tensor's error

Every case draws inputs as the GDN layer makes them (unit-L2 keys, unit-L2 queries times a
norm, g <= 0, beta in (0, 1), an optional float32 initial state) in one of several regimes
(decay near 0, around -1, around -20, or mixed token by token; beta near 0, near 1, uniform or
mixed), float32 or bfloat16, and a random cotangent for o and final_state (zero for
final_state in some cases, as in training). Each implementation's o, final_state and gradients
of all six inputs are compared with `impl="reference"` (the per-token scan) run in float64 on
the same (rounded) inputs, so the measured error is the implementation's own. Error of a tensor:
max |x - ref| / max(max |ref|, FLOOR); a case's value error is the worst of o and final_state,
its gradient error the worst of the six gradients. Any NaN or Inf fails the case.

Cost. Every distinct static shape (T, H, K, V, chunk size, dtype, scale) is one compile per
implementation, so the cases are drawn over a fixed number of shape classes (--shapes) and the
cases of a class run as one batch (they are concatenated along B, which the op never mixes;
errors are measured on each case's own batch rows). Small T is common and T=4096 rare: a
class's share of the cases falls with its size, and a case holds at most --max_tokens B*T*H
tokens and (unless one sequence and head alone has more) 8 chunks of all its sequences and heads.
Interpreted Pallas TPU costs ~20 ms of CPU per grid step (one chunk of one head of one sequence,
forward or backward), and much more wall time when the cores are shared. The default run (1000
cases, 24 classes) took 1300 s of CPU: ~11 minutes with --workers 2 on 2 idle cores, by that
count; 31 minutes measured on 2 cores shared with ~5 other busy processes.

Crashes. By default the batches run in worker processes (`isolate`; --workers at a time): a
crash of XLA or of a kernel (a signal, not an exception) is recorded against the implementation
and the batch it was running, and a new worker carries on. The crashed implementation's later
batches are compiled with `CRASH_WORKAROUND` (XLA CPU's YNNPACK fusions limited to dots, the
cause of the crashes seen so far) so that its numerics are still checked; it fails either way.

`--case N` runs case N on its own (its own B, not batched with its class) in this process and
prints every tensor's error: the one-line repro that the summary prints for each failure.
`--batch N` runs the whole batch holding case N, as the fuzz run did: the repro of a crash.
"No initial state" is an explicit zero state, so that its gradient exists (as in the tests).
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import dataclasses
import functools
import json
import math
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time

# The Pallas kernels are interpreted here: a CPU tool unless the platform is chosen explicitly.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(BENCH_DIR))  # runnable as a plain script from anywhere
from sleep_jax.ops import gated_delta_rule  # noqa: E402
from sleep_jax.ops.gated_delta.chunked import gated_delta_rule_chunked_autodiff  # noqa: E402
from sleep_jax.ops.gated_delta.pallas_gpu import gated_delta_rule_pallas_gpu  # noqa: E402
from sleep_jax.ops.gated_delta.pallas_gpu_staged import (  # noqa: E402
  gated_delta_rule_pallas_gpu_staged,
)
from sleep_jax.ops.gated_delta.pallas_tpu import gated_delta_rule_pallas_tpu  # noqa: E402

IMPLEMENTATIONS = {
  "chunked": functools.partial(gated_delta_rule, impl="chunked"),
  # On a CPU "auto" lowers to the chunked form, through `jax.lax.platform_dependent`.
  "auto": functools.partial(gated_delta_rule, impl="auto"),
  "pallas_gpu": functools.partial(gated_delta_rule_pallas_gpu, interpret=True),
  # What impl="pallas" runs on a GPU, interpreted: the one-chunk kernel for a call of one chunk
  # that fits it (pallas_gpu_chunk.py), the chunk-parallel kernels above otherwise.
  "pallas": functools.partial(gated_delta_rule, impl="pallas"),
  "pallas_gpu_staged": functools.partial(gated_delta_rule_pallas_gpu_staged, interpret=True),
  "pallas_tpu": functools.partial(gated_delta_rule_pallas_tpu, interpret=True),
  "chunked_autodiff": gated_delta_rule_chunked_autodiff,
}
REFERENCE = functools.partial(gated_delta_rule, impl="reference")

INPUT_NAMES = ("q", "k", "v", "g", "beta", "initial_state")
VALUE_NAMES = ("o", "final_state")
GRAD_NAMES = tuple("d" + name for name in INPUT_NAMES)

# Normalised error of a tensor: max |x - ref| / max(max |ref|, FLOOR). Inputs and cotangents are
# O(1), and so are the terms every output and gradient is summed from. A tensor whose whole
# maximum is far below that (dg under strong decay, ~1e-5 to 1e-3; d initial_state after many
# strongly decaying tokens, down to 1e-12) is held to tolerance * FLOOR in absolute terms, a
# fraction ~1e-7 of its terms' scale, rather than relative to its own vanishing size.
FLOOR = 1e-3

# (values, gradients) tolerances on the normalised error, against the float64 reference.
# float32: those of tests/ops/test_gated_delta.py (values 1e-5 against float64 numpy, gradients
#   1e-4), for errors of ~1e-7 to 1e-6 where the chunked form is well conditioned.
# bfloat16: the same float32 computation, then o and the gradients of q, k, v, g and beta are
#   rounded to bfloat16 once; nothing else differs (the reference gets the same bfloat16 inputs
#   and the o cotangent is drawn on the bfloat16 grid). Rounding to nearest with 8 significant
#   bits moves x by at most 2**-8 |x|, so |fl(x) - ref| <= 2**-8 (1 + tol) max|ref| + tol max|ref|
#   for x within the float32 tolerance `tol` of ref: 3.92e-3 for values, 4.0e-3 for gradients.
_FLOAT32_TOLERANCES = (1e-5, 1e-4)
TOLERANCES = {
  "float32": _FLOAT32_TOLERANCES,
  "bfloat16": tuple(2**-8 * (1 + tol) + tol for tol in _FLOAT32_TOLERANCES),
}

# XLA options that a crashed implementation is recompiled with for its remaining batches (see the
# module docstring): jaxlib 0.10's CPU YNNPACK elementwise/reduce fusions segfault
# (slinky::can_fuse in a transpose) on the backward pass of chunked_autodiff's block inversion.
CRASH_WORKAROUND = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}

DEFAULTS = dict(cases=1000, seed=0, shapes=24, max_tokens=8192, max_len=4096, workers=2)

DECAY_REGIMES = ("weak", "moderate", "strong", "log_uniform", "mixed")
BETA_REGIMES = ("low", "high", "uniform", "mixed")
KEY_WIDTHS = (1, 2, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128)
CHUNK_SIZES = (8, 16, 24, 32, 48, 64, 128)
# Interpreted Pallas TPU pays ~20-70 ms per grid step (one chunk of one head of one sequence),
# forward and backward: the run's main cost. Bounds on chunks per sequence and per case.
MAX_CHUNKS = 32
MAX_CASE_CHUNKS = 8
WEIGHT_POWER = 0.35  # a shape class's share of the cases ~ (T * H) ** -WEIGHT_POWER


# --- the cases -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Shape:
  """The static part of a case: one compile per implementation."""

  index: int
  tokens: int
  heads: int
  key_dim: int
  value_dim: int
  chunk_size: int
  dtype: str
  scale: float | None  # None: the default K**-0.5


@dataclasses.dataclass(frozen=True)
class Case:
  """The dynamic part: the inputs' regime and seed, drawn from the case index alone."""

  index: int
  shape: Shape
  batch: int
  decay: str
  beta: str
  q_norm: float
  with_state: bool
  state_cotangent: bool  # False: only o gets a cotangent, as in training


def _log_uniform_int(rng, low, high):
  return int(round(math.exp(rng.uniform(math.log(low), math.log(high)))))


def make_shapes(seed, num_shapes, max_tokens, max_len):
  """`num_shapes` random static shapes. The first three pin corners: T=1, T a multiple of the
  chunk, T = max_len; the rest draw T log-uniformly (75% up to 512, 25% up to max_len)."""
  rng = np.random.default_rng([seed, 0])
  max_len = min(max_len, max_tokens)
  shapes = []
  for index in range(num_shapes):
    if index == 0:
      tokens = 1
    elif index == 2:
      tokens = max_len
    elif rng.uniform() < 0.75:
      tokens = _log_uniform_int(rng, 1, min(512, max_len))
    else:
      tokens = _log_uniform_int(rng, min(512, max_len), max_len)
    heads = int(rng.choice([1, 2, 3, 4], p=[0.4, 0.3, 0.15, 0.15]))
    key_dim = int(rng.choice(KEY_WIDTHS))
    value_dim = key_dim if rng.uniform() < 0.3 else int(rng.choice(KEY_WIDTHS))
    chunks = [c for c in CHUNK_SIZES if -(-tokens // c) <= MAX_CHUNKS] or [max(CHUNK_SIZES)]
    chunk_size = int(rng.choice(chunks))
    if index == 1:  # T a whole number (>= 2) of chunks
      chunk_size = int(rng.choice([c for c in CHUNK_SIZES if 2 * c <= max_len] or [1]))
      tokens = chunk_size * int(rng.integers(2, max(3, min(MAX_CHUNKS, max_len // chunk_size))))
      tokens = min(tokens, max_len)
    num_chunks = -(-tokens // min(chunk_size, tokens))
    heads = max(1, min(heads, max_tokens // tokens, MAX_CASE_CHUNKS // num_chunks))
    dtype = "bfloat16" if rng.uniform() < 0.35 else "float32"
    scale = None if rng.uniform() < 0.7 else float(rng.uniform(0.05, 1.5))
    shapes.append(Shape(index, tokens, heads, key_dim, value_dim, chunk_size, dtype, scale))
  return shapes


def make_case(index, shapes, seed, max_tokens):
  """Case `index`: its shape class (the smaller the class, the likelier) and its regimes."""
  rng = np.random.default_rng([seed, 1, index])
  weights = np.array([(s.tokens * s.heads) ** -WEIGHT_POWER for s in shapes])
  shape = shapes[int(rng.choice(len(shapes), p=weights / weights.sum()))]
  num_chunks = -(-shape.tokens // min(shape.chunk_size, shape.tokens))
  max_batch = max(
    1,
    min(max_tokens // (shape.tokens * shape.heads), MAX_CASE_CHUNKS // (num_chunks * shape.heads)),
  )
  return Case(
    index=index,
    shape=shape,
    batch=min(max_batch, int(rng.choice([1, 2, 3, 4], p=[0.5, 0.25, 0.125, 0.125]))),
    decay=str(rng.choice(DECAY_REGIMES)),
    beta=str(rng.choice(BETA_REGIMES)),
    q_norm=1.0 if rng.uniform() < 0.5 else float(10 ** rng.uniform(-1, 1)),
    with_state=bool(rng.uniform() < 0.5),
    state_cotangent=bool(rng.uniform() < 0.7),
  )


def make_plan(num_cases, seed, num_shapes, max_tokens, max_len):
  shapes = make_shapes(seed, num_shapes, max_tokens, max_len)
  return [make_case(index, shapes, seed, max_tokens) for index in range(num_cases)]


def _log_decay(rng, regime, size):
  if regime == "mixed":  # each token its own regime: strong and weak decay inside one chunk
    pick = rng.integers(0, 4, size)
    return np.choose(pick, [_log_decay(rng, r, size) for r in DECAY_REGIMES[:4]])
  if regime == "weak":  # near 0, some exactly 0 (no decay at all)
    return np.where(rng.uniform(size=size) < 0.1, 0.0, -(10 ** rng.uniform(-6, -2, size)))
  if regime == "moderate":
    return -rng.uniform(0.01, 1.0, size)
  if regime == "strong":  # exp(g) ~ 2e-9 per token: the state forgets almost at once
    return -rng.uniform(10.0, 25.0, size)
  return -(10 ** rng.uniform(-3, 1.5, size))  # log_uniform: a GDN layer's range


def _beta(rng, regime, size):
  if regime == "mixed":
    pick = rng.integers(0, 3, size)
    return np.choose(pick, [_beta(rng, r, size) for r in BETA_REGIMES[:3]])
  if regime == "low":
    return rng.uniform(1e-4, 0.05, size)
  if regime == "high":
    return 1.0 - rng.uniform(1e-4, 0.05, size)
  return rng.uniform(1e-4, 1.0 - 1e-4, size)


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _to_dtype(x, dtype):
  """numpy float64 -> numpy float64 holding exactly the values `dtype` represents."""
  return np.asarray(x).astype(jnp.dtype(dtype)).astype(np.float64)


def make_arrays(case, seed):
  """Inputs and cotangents of one case as float64 numpy arrays, already rounded to its dtype.

  Returns:
    (inputs: dict of INPUT_NAMES, cotangents: (d o, d final_state)).
  """
  s = case.shape
  rng = np.random.default_rng([seed, 2, case.index])
  bth = (case.batch, s.tokens, s.heads)
  inputs = {
    "q": case.q_norm * _unit(rng.normal(size=bth + (s.key_dim,))),
    "k": _unit(rng.normal(size=bth + (s.key_dim,))),
    "v": rng.normal(size=bth + (s.value_dim,)),
    "g": _log_decay(rng, case.decay, bth),
    "beta": _beta(rng, case.beta, bth),
  }
  inputs = {name: _to_dtype(x, s.dtype) for name, x in inputs.items()}
  state_shape = (case.batch, s.heads, s.key_dim, s.value_dim)
  inputs["initial_state"] = (
    _to_dtype(rng.normal(size=state_shape), "float32") if case.with_state else np.zeros(state_shape)
  )
  # The o cotangent on o's own grid: the implementations receive it in o's dtype.
  d_out = _to_dtype(rng.normal(size=bth + (s.value_dim,)), s.dtype)
  d_state = (
    _to_dtype(rng.normal(size=state_shape), "float32")
    if case.state_cotangent
    else np.zeros(state_shape)
  )
  return inputs, (d_out, d_state)


def group_by_shape(cases):
  groups = collections.defaultdict(list)
  for case in cases:
    groups[case.shape.index].append(case)
  return [groups[index] for index in sorted(groups)]


# --- running one batch of cases ------------------------------------------------------------------


def _outputs_and_grads(fn, shape):
  """(inputs, cotangents) -> ((o, final_state), gradients of the six inputs)."""

  def run(inputs, cotangents):
    def forward(q, k, v, g, beta, initial_state):
      return fn(
        q,
        k,
        v,
        g,
        beta,
        initial_state=initial_state,
        chunk_size=shape.chunk_size,
        scale=shape.scale,
      )

    outputs, vjp = jax.vjp(forward, *inputs)
    return outputs, vjp(cotangents)

  return jax.jit(run)


def make_batch(cases, seed):
  """The cases' arrays concatenated along B (float64 numpy), and each case's rows."""
  per_case = [make_arrays(case, seed) for case in cases]
  inputs = [np.concatenate([c[0][name] for c in per_case]) for name in INPUT_NAMES]
  cotangents = [np.concatenate([c[1][i] for c in per_case]) for i in range(2)]
  bounds = np.cumsum([0] + [case.batch for case in cases])
  return inputs, cotangents, list(zip(bounds[:-1], bounds[1:]))


def _to_numpy(result):
  (out, state), grads = result
  return [np.asarray(x).astype(np.float64) for x in (out, state, *grads)]


def run_reference(batch, shape):
  """float64 outputs and gradients of a batch: 8 arrays, VALUE_NAMES + GRAD_NAMES."""
  inputs, cotangents, _ = batch
  with jax.enable_x64(True):
    fn = _outputs_and_grads(REFERENCE, shape)
    result = fn(
      [jnp.asarray(x, jnp.float64) for x in inputs],
      tuple(jnp.asarray(x, jnp.float64) for x in cotangents),
    )
    return _to_numpy(jax.block_until_ready(result))


def run_impl(impl, batch, shape, workaround=False):
  """An implementation's outputs and gradients of a batch in the shape's dtype (initial state
  and its cotangent float32, as the contract has them), returned as float64 numpy arrays."""
  inputs, cotangents, _ = batch
  dtype = jnp.dtype(shape.dtype)
  inputs = [
    jnp.asarray(x, jnp.float32 if name == "initial_state" else dtype)
    for name, x in zip(INPUT_NAMES, inputs)
  ]
  cotangents = (jnp.asarray(cotangents[0], dtype), jnp.asarray(cotangents[1], jnp.float32))
  lowered = _outputs_and_grads(IMPLEMENTATIONS[impl], shape).lower(inputs, cotangents)
  compiled = lowered.compile(compiler_options=CRASH_WORKAROUND if workaround else None)
  return _to_numpy(jax.block_until_ready(compiled(inputs, cotangents)))


def normalised_error(actual, expected):
  return float(np.abs(actual - expected).max() / max(np.abs(expected).max(), FLOOR))


def compare(impl, cases, rows, got, expected, workaround=False):
  """Per-case records of an implementation's batch against the reference's."""
  records = []
  for case, (lo, hi) in zip(cases, rows):
    errors, nonfinite = {}, []
    for name, x, ref in zip(VALUE_NAMES + GRAD_NAMES, got, expected):
      x, ref = x[lo:hi], ref[lo:hi]
      if not np.isfinite(x).all():
        nonfinite.append(name)
      errors[name] = normalised_error(x, ref) if np.isfinite(ref).all() else math.nan
    records.append(
      dict(
        impl=impl,
        case=case.index,
        dtype=case.shape.dtype,
        status="ok",
        workaround=workaround,
        value_err=max(errors[n] for n in VALUE_NAMES),
        grad_err=max(errors[n] for n in GRAD_NAMES),
        errors=errors,
        nonfinite=nonfinite,
        reference_finite=all(np.isfinite(ref[lo:hi]).all() for ref in expected),
      )
    )
  return records


def all_steps(cases, impls):
  """(batch position, impl) for every shape class's batch and implementation, in run order."""
  return [(position, impl) for position in range(len(group_by_shape(cases))) for impl in impls]


def run_steps(cases, seed, steps, *, workaround=(), emit=None):
  """Runs `steps` [(batch position, impl)] in this process, the reference once per batch.
  Calls emit(event) before and after every step (the reference's too); returns all records."""
  emit = emit or (lambda event: None)
  batches = group_by_shape(cases)
  records, current = [], None
  for position, impl in steps:
    batch_cases = batches[position]
    shape = batch_cases[0].shape
    if current is None or current[0] != position:
      emit(dict(event="start", batch=position, impl="reference"))
      began = time.perf_counter()
      batch = make_batch(batch_cases, seed)
      current = (position, batch, run_reference(batch, shape))
      emit(
        dict(
          event="done",
          batch=position,
          impl="reference",
          seconds=time.perf_counter() - began,
          records=[],
        )
      )
    _, batch, expected = current
    emit(dict(event="start", batch=position, impl=impl))
    began = time.perf_counter()
    got = run_impl(impl, batch, shape, workaround=impl in workaround)
    step_records = compare(
      impl, batch_cases, batch[2], got, expected, workaround=impl in workaround
    )
    records.extend(step_records)
    emit(
      dict(
        event="done",
        batch=position,
        impl=impl,
        seconds=time.perf_counter() - began,
        records=step_records,
      )
    )
  return records


# --- isolation: worker processes, restarted after a crash ----------------------------------------


def _worker_main(spec):
  """Runs `run_steps` for the plan and steps in `spec`, one JSON line per event on stdout."""
  cases = make_plan(
    spec["cases"], spec["seed"], spec["shapes"], spec["max_tokens"], spec["max_len"]
  )

  def emit(event):
    print(json.dumps(event), flush=True)

  run_steps(
    cases,
    spec["seed"],
    [tuple(step) for step in spec["steps"]],
    workaround=set(spec["workaround"]),
    emit=emit,
  )


def _run_isolated(spec, cases, steps, log):
  """`run_steps` in worker processes, one at a time. A worker's crash (killed by a signal) is
  recorded against the step it was running; a new worker goes on with the steps after it, with
  the crashed implementation compiled under CRASH_WORKAROUND from then on, and dropped if it
  crashes even so (a crash of the reference skips its batch). A Python exception is re-raised.

  Returns:
    (records, crashes, seconds per impl).
  """
  batches = group_by_shape(cases)
  records, crashes = [], []
  seconds = collections.Counter()
  workaround = set()
  while steps:
    worker_spec = dict(spec, steps=steps, workaround=sorted(workaround))
    running, finished = None, 0
    with tempfile.TemporaryFile("w+") as err:
      proc = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--_worker", json.dumps(worker_spec)],
        stdout=subprocess.PIPE,
        stderr=err,
        text=True,
      )
      for line in proc.stdout:  # progress as it comes
        if not line.startswith("{"):
          continue
        event = json.loads(line)
        if event["event"] == "start":
          running = event
          continue
        running = None
        seconds[event["impl"]] += event["seconds"]
        records.extend(event["records"])
        if event["impl"] != "reference":
          finished += 1
          log(
            f"  batch {event['batch'] + 1}/{len(batches)} {event['impl']:17s} "
            f"{event['seconds']:6.1f}s"
          )
      proc.wait()
      err.seek(0)
      stderr_tail = err.read()[-3000:]
    if proc.returncode == 0:
      break
    if running is None or proc.returncode > 0:  # not a crash: a Python error or a kill
      raise RuntimeError(f"fuzz worker exited with {proc.returncode}:\n{stderr_tail}")
    position, impl = running["batch"], running["impl"]
    batch = batches[position]
    crashes.append(
      dict(
        impl=impl,
        batch=position,
        cases=[c.index for c in batch],
        returncode=proc.returncode,
        workaround=impl in workaround,
        stderr_tail=stderr_tail[-500:],
      )
    )
    log(
      f"  CRASH (exit {proc.returncode}) in {impl} on batch {position + 1} (cases "
      f"{[c.index for c in batch[:8]]}{'...' if len(batch) > 8 else ''}); new worker"
    )
    steps = steps[finished:]
    hit = {step[1] for step in steps if step[0] == position} if impl == "reference" else {impl}
    for name in hit:
      records.extend(
        dict(
          impl=name,
          case=c.index,
          dtype=c.shape.dtype,
          status="crash",
          workaround=name in workaround,
        )
        for c in batch
      )
    if impl == "reference":
      steps = [step for step in steps if step[0] != position]
      continue
    steps = steps[1:]
    if impl in workaround:  # crashes even with the workaround: stop running it
      steps = [step for step in steps if step[1] != impl]
    workaround.add(impl)
  return records, crashes, seconds


def _split_steps(cases, steps, workers):
  """Steps split into `workers` lists of whole batches, balanced by estimated cost (a fixed
  compile cost per step plus the interpreted TPU kernel's grid steps), longest first."""
  batches = group_by_shape(cases)

  def cost(position):
    grid_steps = sum(
      c.batch * c.shape.heads * -(-c.shape.tokens // min(c.shape.chunk_size, c.shape.tokens))
      for c in batches[position]
    )
    return 60 + 0.1 * grid_steps

  by_batch = collections.defaultdict(list)
  for step in steps:
    by_batch[step[0]].append(step)
  loads, parts = [0.0] * workers, [[] for _ in range(workers)]
  for position in sorted(by_batch, key=cost, reverse=True):
    lightest = loads.index(min(loads))
    loads[lightest] += cost(position)
    parts[lightest].append(position)
  return [
    [step for position in sorted(part) for step in by_batch[position]] for part in parts if part
  ]


# --- the report ----------------------------------------------------------------------------------


def _repro(spec, case_index, impls, whole_batch=False):
  flags = [f"--{'batch' if whole_batch else 'case'} {case_index}"]
  names = (
    ("cases", "seed", "shapes", "max_tokens", "max_len")
    if whole_batch
    else ("seed", "shapes", "max_tokens", "max_len")
  )
  for name in names:
    if spec[name] != DEFAULTS[name]:
      flags.append(f"--{name} {spec[name]}")
  flags.append("--impls " + ",".join(impls))
  return "python bench/fuzz_gated_delta.py " + " ".join(flags)


def summarise(records, spec):
  """One row per (impl, dtype): cases, worst errors with their case and tensor (and that case's
  every error), NaN/Inf and crash counts, tolerances, failing cases, pass."""
  rows = []
  for impl in spec["impls"]:
    for dtype, (value_tol, grad_tol) in TOLERANCES.items():
      mine = [r for r in records if r["impl"] == impl and r["dtype"] == dtype]
      if not mine:
        continue
      ok = [r for r in mine if r["status"] == "ok"]

      def worst(key, names, ok=ok):
        r = max(ok, key=lambda r: r[key], default=None)
        if r is None:
          return None
        return dict(
          err=r[key],
          case=r["case"],
          errors=r["errors"],
          tensor=max(names, key=lambda n: r["errors"][n]),
        )

      failing = sorted(
        {
          r["case"]
          for r in mine
          if r["status"] != "ok"
          or r["nonfinite"]
          or not r["reference_finite"]
          or not r["value_err"] <= value_tol
          or not r["grad_err"] <= grad_tol
        }
      )
      rows.append(
        dict(
          impl=impl,
          dtype=dtype,
          cases=len(mine),
          worst_value=worst("value_err", VALUE_NAMES),
          worst_grad=worst("grad_err", GRAD_NAMES),
          nonfinite=sum(bool(r["nonfinite"]) for r in ok),
          crashed=sum(r["status"] == "crash" for r in mine),
          with_workaround=sum(r["status"] == "ok" and r["workaround"] for r in mine),
          value_tol=value_tol,
          grad_tol=grad_tol,
          failing_cases=failing,
          passed=not failing,
        )
      )
  return rows


def format_table(rows):
  lines = [
    "| impl | dtype | cases | worst value err (case, tensor) | worst grad err (case, tensor)"
    " | NaN/Inf | crashed | tol value / grad | pass |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    cell = lambda w: "-" if w is None else f"{w['err']:.2e} (#{w['case']}, {w['tensor']})"
    crashed = str(r["crashed"]) + (
      f" ({r['with_workaround']} more ran with the workaround)" if r["with_workaround"] else ""
    )
    lines.append(
      f"| {r['impl']} | {r['dtype']} | {r['cases']} | {cell(r['worst_value'])} | "
      f"{cell(r['worst_grad'])} | {r['nonfinite']} | {crashed} | "
      f"{r['value_tol']:.3g} / {r['grad_tol']:.3g} | "
      f"{'PASS' if r['passed'] else 'FAIL'} |"
    )
  return "\n".join(lines)


def _cpu_seconds():
  """User + system CPU seconds of this process and of its finished workers."""
  return sum(
    getattr(resource.getrusage(who), field)
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
    for field in ("ru_utime", "ru_stime")
  )


def fuzz(
  cases=DEFAULTS["cases"],
  seed=DEFAULTS["seed"],
  impls=tuple(IMPLEMENTATIONS),
  *,
  shapes=DEFAULTS["shapes"],
  max_tokens=DEFAULTS["max_tokens"],
  max_len=DEFAULTS["max_len"],
  isolate=True,
  workers=DEFAULTS["workers"],
  log=print,
):
  """Fuzzes `impls` over `cases` random cases (see the module docstring).

  Args:
    isolate: run in worker processes, so that a crash is reported rather than fatal.
    workers: worker processes at a time (with `isolate`), each on its share of the batches.

  Returns:
    The report, a JSON-able dict: "rows" (one per impl and dtype, as `format_table` prints),
    "crashes", "failing_cases" with their "repro" commands, "wall_seconds", and "passed": every
    implementation passed every case, without NaN, Inf or crash.
  """
  unknown = set(impls) - set(IMPLEMENTATIONS)
  if unknown:
    raise ValueError(f"unknown impls {sorted(unknown)}; expected some of {list(IMPLEMENTATIONS)}")
  spec = dict(
    cases=cases, seed=seed, shapes=shapes, max_tokens=max_tokens, max_len=max_len, impls=list(impls)
  )
  plan = make_plan(cases, seed, shapes, max_tokens, max_len)
  steps = all_steps(plan, list(impls))
  log(
    f"{cases} cases in {len(group_by_shape(plan))} shape classes, "
    f"{sum(c.batch for c in plan)} sequences, "
    f"{sum(c.batch * c.shape.tokens * c.shape.heads for c in plan)} token-heads; "
    f"impls: {', '.join(impls)}"
  )
  began = time.perf_counter()
  cpu_before = _cpu_seconds()
  seconds = collections.Counter()
  if isolate:
    parts = _split_steps(plan, steps, workers)
    with concurrent.futures.ThreadPoolExecutor(len(parts)) as pool:
      results = list(pool.map(lambda part: _run_isolated(spec, plan, part, log), parts))
    records = [r for result in results for r in result[0]]
    crashes = [c for result in results for c in result[1]]
    for result in results:
      seconds.update(result[2])
  else:

    def emit(event):
      if event["event"] == "done":
        seconds[event["impl"]] += event["seconds"]
        if event["impl"] != "reference":
          log(f"  batch {event['batch'] + 1} {event['impl']:17s} {event['seconds']:6.1f}s")

    records, crashes = run_steps(plan, seed, steps, emit=emit), []
  rows = summarise(records, spec)
  failing = collections.defaultdict(list)
  for row in rows:
    for case in row["failing_cases"]:
      failing[case].append(row["impl"])
  failures = [r for r in records if r["case"] in failing and r["impl"] in failing[r["case"]]]
  repro = {case: _repro(spec, case, impls) for case, impls in sorted(failing.items())}
  for crash in crashes:
    crash["repro"] = _repro(spec, crash["cases"][0], [crash["impl"]], whole_batch=True)
  return dict(
    config=spec,
    wall_seconds=time.perf_counter() - began,
    cpu_seconds=_cpu_seconds() - cpu_before,
    seconds_by_impl=dict(seconds),
    rows=rows,
    crashes=crashes,
    failing_cases=sorted(failing),
    repro=repro,
    failures=failures[:500],
    passed=bool(rows) and all(r["passed"] for r in rows) and not crashes,
  )


def run_verbose(index, spec, impls, *, whole_batch=False, log=print):
  """Case `index` alone (batch of its own B), or with `whole_batch` the batch of its shape class
  as the fuzz run has it, in this process; prints every tensor's error per implementation.
  Returns whether all passed."""
  plan = make_plan(
    max(spec["cases"], index + 1) if whole_batch else index + 1,
    spec["seed"],
    spec["shapes"],
    spec["max_tokens"],
    spec["max_len"],
  )
  cases = [c for c in plan if c.shape == plan[index].shape] if whole_batch else [plan[index]]
  shape = cases[0].shape
  log(f"{shape}\n" + "\n".join(f"  {dataclasses.replace(c, shape=None)}" for c in cases))
  batch = make_batch(cases, spec["seed"])
  expected = run_reference(batch, shape)
  log(
    "reference max |x|: "
    + ", ".join(f"{n} {np.abs(x).max():.3g}" for n, x in zip(VALUE_NAMES + GRAD_NAMES, expected))
  )
  value_tol, grad_tol = TOLERANCES[shape.dtype]
  passed = True
  for impl in impls:
    log(f"{impl}:")
    for record in compare(impl, cases, batch[2], run_impl(impl, batch, shape), expected):
      ok = (
        record["value_err"] <= value_tol
        and record["grad_err"] <= grad_tol
        and not record["nonfinite"]
      )
      passed &= ok
      log(
        f"  case {record['case']:4d} {'PASS' if ok else 'FAIL'} "
        + " ".join(f"{n}={e:.2e}" for n, e in record["errors"].items())
        + (f" NaN/Inf in {record['nonfinite']}" if record["nonfinite"] else "")
      )
  log(f"tolerances ({shape.dtype}): values {value_tol:.3g}, gradients {grad_tol:.3g}")
  return passed


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--cases", type=int, default=DEFAULTS["cases"])
  parser.add_argument("--seed", type=int, default=DEFAULTS["seed"])
  parser.add_argument(
    "--impls",
    default=",".join(IMPLEMENTATIONS),
    help=f"comma-separated, of {', '.join(IMPLEMENTATIONS)}",
  )
  parser.add_argument(
    "--case", type=int, default=None, help="run this one case alone, in this process, verbosely"
  )
  parser.add_argument(
    "--batch",
    type=int,
    default=None,
    help="run the batch holding this case as the fuzz run does (a crash's "
    "repro), in this process, verbosely",
  )
  parser.add_argument(
    "--shapes",
    type=int,
    default=DEFAULTS["shapes"],
    help="static shape classes the cases are drawn over (one compile each)",
  )
  parser.add_argument(
    "--max_tokens",
    type=int,
    default=DEFAULTS["max_tokens"],
    help="at most this many B*T*H tokens per case",
  )
  parser.add_argument("--max_len", type=int, default=DEFAULTS["max_len"], help="largest T")
  parser.add_argument(
    "--no_isolate", action="store_true", help="run in this process (a crash then ends the run)"
  )
  parser.add_argument(
    "--workers",
    type=int,
    default=DEFAULTS["workers"],
    help="worker processes at a time, each on its share of the batches",
  )
  parser.add_argument("--json", default=None, help="write the report here")
  parser.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args._worker is not None:
    _worker_main(json.loads(args._worker))
    return 0
  impls = [name for name in args.impls.split(",") if name]
  spec = dict(
    cases=args.cases,
    seed=args.seed,
    shapes=args.shapes,
    max_tokens=args.max_tokens,
    max_len=args.max_len,
  )
  if args.case is not None or args.batch is not None:
    index = args.case if args.case is not None else args.batch
    return 0 if run_verbose(index, spec, impls, whole_batch=args.case is None) else 1
  report = fuzz(
    args.cases,
    args.seed,
    impls,
    shapes=args.shapes,
    max_tokens=args.max_tokens,
    max_len=args.max_len,
    isolate=not args.no_isolate,
    workers=args.workers,
  )
  report["command"] = " ".join(shlex.quote(a) for a in [sys.argv[0], *sys.argv[1:]])
  print(format_table(report["rows"]))
  print(
    "seconds by impl (compile + run): "
    + ", ".join(f"{k} {v:.0f}" for k, v in sorted(report["seconds_by_impl"].items()))
  )
  print(
    f"wall time: {report['wall_seconds']:.0f} s; CPU time {report['cpu_seconds']:.0f} s "
    f"(this process and its workers; the wall time grows fast when the cores are shared)"
  )
  for crash in report["crashes"]:
    print(
      f"CRASH: {crash['impl']} exit {crash['returncode']} on cases {crash['cases'][:8]}"
      + (" (with the workaround)" if crash["workaround"] else "")
      + f": {crash['repro']}"
    )
  failing = list(report["repro"].items())
  for case, command in failing[:30]:
    print(f"failing case {case}: {command}")
  if len(failing) > 30:
    print(f"... and {len(failing) - 30} more failing cases (all in the JSON report)")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(report, f, indent=1)
  print("PASS" if report["passed"] else "FAIL")
  return 0 if report["passed"] else 1


if __name__ == "__main__":
  sys.exit(main())
