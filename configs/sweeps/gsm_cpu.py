"""GSM-Infinite on a 2-core CPU: the small hybrid from scratch, N in {1, 2, 4}, one seed.

A pipeline check of experiment 3 (accuracy per operation count 2 and 4), not a result.

  python launch/sweep.py --config=configs/sweeps/gsm_cpu.py --sweep_dir=runs/sweeps/gsm_cpu
  python -m sleep_jax.experiments.report runs/sweeps/gsm_cpu
"""

from ml_collections import config_dict

from sleep_jax.experiments.sweeps import passes_arms


def get_config() -> config_dict.ConfigDict:
  c = config_dict.ConfigDict()
  c.name = "gsm_cpu"
  c.base = "configs/gsm_infinite.py:cpu"
  c.seeds = (0,)
  c.depths = ()
  c.num_steps = config_dict.placeholder(int)  # None: the cpu variant's 300 steps
  c.overrides = config_dict.ConfigDict()
  c.arms = passes_arms((1, 2, 4))
  return c
