"""Depo k-hop retrieval on a 2-core CPU: N in {1, 2, 4} and a compute-matched N=1, three seeds.

Every run evaluates all hop counts k in {1, 2, 4, 8, 16}; the report plots loss and accuracy
against k per arm.

  python launch/sweep.py --config=configs/sweeps/depo_cpu.py --sweep_dir=runs/sweeps/depo_cpu
"""

from ml_collections import config_dict

from sleep_jax.data import depo
from sleep_jax.experiments.sweeps import arm
from sleep_jax.sleep.config import training_flops_ratio

MAX_PASSES = 4
WINDOW = 75  # configs/depo.py: the 300-token context is 4 windows


def get_config() -> config_dict.ConfigDict:
  c = config_dict.ConfigDict()
  c.name = "depo_cpu"
  c.base = "configs/depo.py:cpu"
  c.seeds = (0, 1, 2)
  c.depths = ()
  c.num_steps = 60  # per arm with step_ratio 1
  # Sized to finish in about an hour on 2 cores (shared with the Rule 110 sweep, an N=4 step
  # took ~8 s): the cpu variant with a narrower MLP, small cycles (10..20 nodes instead of
  # 10..75: at least 10 for the 10 distinct query starts, and the k=16 slice draws 17..20; the
  # context is still left-padded to 300 tokens) and small evaluation sets. At this
  # scale no arm is expected to learn the retrieval (the paper trains 100k steps): the sweep
  # checks the pipeline end to end and measures what 60 steps buy.
  c.overrides = config_dict.ConfigDict(
    {
      "model": {"mlp_dim": 128},
      "task": {"min_nodes": 10, "max_nodes": 20},
      "eval": {"every_steps": 30, "num_examples": 128, "num_slice_examples": 64},
      "checkpoint": {"every_steps": 30},
    }
  )
  # Compute matching by more steps rather than more layers: the same architecture and data
  # order, so n1_compute_matched differs from n4 only in where the FLOPs go. An n4 example runs
  # 4 * 300 + 60 = 1,260 tokens through the stack, an n1 example 360: 3.5x the steps.
  ratio = training_flops_ratio(MAX_PASSES, depo.CONTEXT_LEN, WINDOW, depo.SEQ_LEN)
  c.arms = (
    arm("n1", {"sleep.passes": 1}),
    arm("n2", {"sleep.passes": 2}),
    arm("n4", {"sleep.passes": 4}),
    arm("n1_compute_matched", {"sleep.passes": 1}, step_ratio=ratio),
  )
  return c
