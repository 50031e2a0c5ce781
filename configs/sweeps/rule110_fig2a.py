"""Rule 110, the paper's Fig. 2a: the plain hybrid (N=1) at depths t in {4, 8, 10, 12, 14, 16}.

The paper trains each depth on about 40M tokens: 800 steps of batch 512 x 100 tokens (41M).
Expected: accuracy falls and learning slows as t grows. One seed, the paper's model.

  python launch/xm_launch.py --config=configs/sweeps/rule110_fig2a.py --dry_run   # jobs and cost
  python launch/sweep.py --config=configs/sweeps/rule110_fig2a.py --sweep_dir=runs/sweeps/fig2a
"""

from ml_collections import config_dict

from sleep_jax.experiments.sweeps import arm

TOKENS_PER_STEP = 512 * 100  # the paper's batch x tokens per example


def get_config() -> config_dict.ConfigDict:
  c = config_dict.ConfigDict()
  c.name = "rule110_fig2a"
  c.base = "configs/rule110.py:paper"
  c.seeds = (0,)
  c.depths = (4, 8, 10, 12, 14, 16)
  c.num_steps = 800  # ~40M tokens per depth, as in the paper
  # (ours) the warmup of the 100k-step paper variant would be most of a 800-step run.
  c.overrides = config_dict.ConfigDict({"train": {"warmup_steps": 40}})
  c.arms = (arm("n1", {"sleep.passes": 1}),)
  return c
