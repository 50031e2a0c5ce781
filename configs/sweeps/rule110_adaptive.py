"""Adaptive sleep on mixed-depth Rule 110: does a model sleep longer where the task is deeper?

Every run trains on examples whose depth t is drawn uniformly from {0, 2, 4} per example
(task.depths) and is evaluated on a held-out set at each of those depths (task.eval_depths:
"depth{t}/exact_accuracy", and under adaptive halting "depth{t}/passes_mean" and
"depth{t}/passes_hist/{n}"). The fixed-N arms trace accuracy against passes; the adaptive arms
are points on the same axes, at the passes they chose.

Arms (same data, steps and evaluation; the model and batch of rule110_cpu):
  n1, n2, n3, n4        the paper's rule: every window gets N passes (sleep.halt "never").
                        n1 is the plain hybrid.
  converge_a, _b        sleep.halt "converge", at most 4 passes: a row stops sleeping on a
                        window once its fast state's relative change falls below halt_tol
                        (CONVERGE_TOLS[0], CONVERGE_TOLS[1]: a stricter and a looser tolerance).
  learned_a, _b         sleep.halt "learned", at most 4 passes: a trained halting unit, with
                        the expected passes in the loss weighted by ponder_cost
                        (PONDER_COSTS[0], PONDER_COSTS[1]: cheap and dearer passes).

Cost: 24 runs (8 arms x 3 seeds) of 600 steps. Every halting arm trains all 4 passes (masked),
so it costs an n4 step. Measured on a 2-core machine with two processes side by side: ~9 min
per N=4-cost run, ~3 min for n1, 94 minutes for the whole sweep (results and findings:
docs/results/adaptive/). Split the arms into two lists of about equal cost so that both
finish together:

  python launch/sweep.py --config=configs/sweeps/rule110_adaptive.py \
      --sweep_dir=runs/sweeps/rule110_adaptive [--only=ARM]
  for a in n1 n4 converge_a learned_a; do python launch/sweep.py \
      --config=configs/sweeps/rule110_adaptive.py --sweep_dir=runs/sweeps/rule110_adaptive \
      --only=$a; done &
  for a in n2 n3 converge_b learned_b; do python launch/sweep.py \
      --config=configs/sweeps/rule110_adaptive.py --sweep_dir=runs/sweeps/rule110_adaptive \
      --only=$a; done &
  wait; python -m sleep_jax.experiments.report runs/sweeps/rule110_adaptive

Variant "ponder" (a follow-up to learned halting, which collapsed to 1-2 passes at both costs
above): the same runs with ponder_cost FOLLOW_UP_PONDER_COSTS, the lighter 0.001 and none at
all, in a sweep of its own (6 runs, 42 minutes in two processes on 2 cores; results in
docs/results/adaptive/ponder/ and findings.md):

  python launch/sweep.py --config=configs/sweeps/rule110_adaptive.py:ponder \
      --sweep_dir=runs/sweeps/rule110_adaptive_ponder [--only=learned_c|learned_0]

The report adds, because some runs halt adaptively: exact accuracy and passes used per depth
and arm, accuracy against passes used (fixed N joined, adaptive arms as points), and each
adaptive arm's histogram of passes.
"""

from ml_collections import config_dict

from sleep_jax.data import rule110
from sleep_jax.experiments.sweeps import arm

DEPTHS = (0, 2, 4)
MAX_PASSES = 4
# sleep.halt_tol of converge_a, converge_b. Chosen from the relative state change r_n of an n4
# run of an earlier version of this sweep (160 steps, depths not yet in their own tokens), on
# held-out windows after the first (10th-90th percentile): r_2 0.54-0.65, r_3 0.31-0.39, r_4
# 0.21-0.25. So 0.5 mostly stops after pass 3 (some after 2) and 0.3 mostly runs all 4 (some
# stop after 3); in the finished sweep they took 3.2 and 3.9 passes on average.
CONVERGE_TOLS = (0.3, 0.5)
# sleep.ponder_cost of learned_a, learned_b: against a cross-entropy of ~0.6 per answer token,
# 0.01 per expected pass is a light pressure to halt, 0.1 a heavy one (4 passes cost 0.4).
PONDER_COSTS = (0.01, 0.1)
# The "ponder" variant's arms: is the collapse the cost's doing? learned_c has a tenth of
# learned_a's cost; learned_0 none, so only the task loss moves the halting unit.
FOLLOW_UP_PONDER_COSTS = {"learned_c": 0.001, "learned_0": 0.0}


def halting_arms() -> tuple[dict, ...]:
  """The adaptive arms: at most MAX_PASSES passes, halting by convergence or by a learnt unit."""
  converge = (
    arm(
      f"converge_{tag}",
      {"sleep.passes": MAX_PASSES, "sleep.halt": "converge", "sleep.halt_tol": tol},
    )
    for tag, tol in zip("ab", CONVERGE_TOLS, strict=True)
  )
  learned = (
    learned_arm(f"learned_{tag}", cost) for tag, cost in zip("ab", PONDER_COSTS, strict=True)
  )
  return (*converge, *learned)


def learned_arm(name: str, cost: float) -> dict:
  return arm(name, {"sleep.passes": MAX_PASSES, "sleep.halt": "learned", "sleep.ponder_cost": cost})


def get_config(variant: str = "") -> config_dict.ConfigDict:
  if variant not in ("", "ponder"):
    raise ValueError(f"unknown rule110_adaptive variant {variant!r}; use none or 'ponder'")
  c = config_dict.ConfigDict()
  c.name = "rule110_adaptive" + (f"_{variant}" if variant else "")
  c.base = "configs/rule110.py:cpu"
  c.seeds = (0, 1, 2)
  c.depths = ()  # no depth axis: every run trains on the mix of DEPTHS (task.depths)
  c.num_steps = 600  # every arm: equal training steps, so only the passes differ
  # rule110_cpu's small model and batch; two evaluations (an evaluation at N=4 of the 512 + 3 x
  # 256 held-out examples costs roughly 13 training steps, forward only at batch 256).
  c.overrides = config_dict.ConfigDict(
    {
      "model": {
        "d_model": 64,
        "num_heads": 2,
        "head_dim": 32,
        "mlp_dim": 128,
        # each depth writes its cells in its own two tokens (rule110.sample_mixed)
        "vocab_size": rule110.mixed_vocab_size(len(DEPTHS)),
      },
      "train": {"batch_size": 32, "warmup_steps": 16},
      "task": {"depths": DEPTHS, "eval_depths": DEPTHS},
      "eval": {
        "every_steps": 150,
        "num_examples": 512,
        "num_slice_examples": 256,
        "batch_size": 256,
      },
      "checkpoint": {"every_steps": 300},
    }
  )
  fixed = tuple(arm(f"n{n}", {"sleep.passes": n}) for n in range(1, MAX_PASSES + 1))
  c.arms = (*fixed, *halting_arms())
  if variant == "ponder":
    c.arms = tuple(learned_arm(name, cost) for name, cost in FOLLOW_UP_PONDER_COSTS.items())
  return c
