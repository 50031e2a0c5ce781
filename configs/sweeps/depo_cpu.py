"""Depo k-hop retrieval on a 2-core CPU: N in {1, 2, 4} and a compute-matched N=1, two seeds.

Every run evaluates all hop counts k in {1, 2, 4, 8, 16}; the report plots loss and accuracy
against k per arm.

  python launch/sweep.py --config=configs/sweeps/depo_cpu.py --sweep_dir=runs/sweeps/depo_cpu
"""

from ml_collections import config_dict

from sleep_jax.data import depo
from sleep_jax.sleep.config import training_flops_ratio
from sleep_jax.sweeps import arm

MAX_PASSES = 4
WINDOW = 75  # configs/depo.py: the 300-token context is 4 windows


def get_config() -> config_dict.ConfigDict:
  c = config_dict.ConfigDict()
  c.name = "depo_cpu"
  c.base = "configs/depo.py:cpu"
  c.seeds = (0, 1, 2)
  c.depths = ()
  c.num_steps = 100  # per arm with step_ratio 1
  # Sized to finish in about half an hour on 2 cores: the cpu variant with a narrower MLP and
  # small cycles (5..10 nodes instead of 10..75; the context is still left-padded to 300 tokens),
  # the one change that gives a 100-step run a chance to learn anything at k = 1.
  c.overrides = config_dict.ConfigDict({
      "model": {"mlp_dim": 128},
      "task": {"min_nodes": 5, "max_nodes": 10},
      "eval": {"every_steps": 25},
      "checkpoint": {"every_steps": 50},
  })
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
