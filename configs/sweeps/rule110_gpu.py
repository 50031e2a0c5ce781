"""Rule 110 on one GPU: the paper's model and batch at depth 8, N in {1, 2, 4}, one seed.

About 2,700 steps per arm (~140M tokens) with an eval every 250 steps for the learning curves.

  python launch/sweep.py --config=configs/sweeps/rule110_gpu.py --sweep_dir=runs/sweeps/rule110_gpu
"""

from ml_collections import config_dict

from sleep_jax.experiments.sweeps import passes_arms


def get_config() -> config_dict.ConfigDict:
  c = config_dict.ConfigDict()
  c.name = "rule110_gpu"
  c.base = "configs/rule110.py:paper"
  c.seeds = (0,)
  c.depths = (8,)
  c.num_steps = 2_700
  c.overrides = config_dict.ConfigDict(
    {
      "train": {"warmup_steps": 200},  # the paper variant's 1,000 is over a third of this run
      "eval": {"every_steps": 250},
      "checkpoint": {"every_steps": 250},
    }
  )
  c.arms = passes_arms((1, 2, 4))
  return c
