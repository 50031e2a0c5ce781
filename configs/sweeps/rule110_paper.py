"""Rule 110 at the paper's scale (Fig. 2b): depth t=32, N in {1, 2, 3, 4} and 8 (our extension).

One seed and the same data order for every N, as in the paper; 100k steps of batch 512 (~5B
tokens) per arm. Paper: N=1 ~10% exact accuracy, N=2 ~20%, N=3 and N=4 above 30%.

  python launch/sweep.py --config=configs/sweeps/rule110_paper.py --sweep_dir=runs/sweeps/rule110_paper
  python launch/xm_launch.py --config=configs/sweeps/rule110_paper.py --dry_run
"""

from ml_collections import config_dict

from sleep_jax.experiments.sweeps import passes_arms


def get_config() -> config_dict.ConfigDict:
  c = config_dict.ConfigDict()
  c.name = "rule110_paper"
  c.base = "configs/rule110.py:paper"
  c.seeds = (0,)
  c.depths = (32,)
  c.num_steps = config_dict.placeholder(int)  # None: the paper variant's train.num_steps
  c.overrides = config_dict.ConfigDict()
  c.arms = passes_arms((1, 2, 3, 4, 8))
  return c
