"""Sleep at depth in minutes, for `make gpu-check` (bench/gpu_check.py): N=1 beside N=4.

The paper's model and batch (configs/rule110.py:paper) at equal steps; the check also draws
N=1 against N=4 at equal training compute from the same two curves. bench/gpu_check.py sizes
`num_steps` to the time left on the GPU and picks the depth (8, or 4 when fewer than 2,000 steps
fit) and the kernel (`model.fast_weight_impl`) from its own measurements, as flags:

  python launch/sweep.py --config=configs/sweeps/rule110_gpu_check.py --sweep_dir=runs/gpu_depth \
      --config.num_steps=2000 --config.depths=8 --config.overrides.eval.every_steps=250
"""

from ml_collections import config_dict

from sleep_jax.experiments.sweeps import passes_arms


def get_config() -> config_dict.ConfigDict:
  c = config_dict.ConfigDict()
  c.name = "rule110_gpu_check"
  c.base = "configs/rule110.py:paper"
  c.seeds = (0,)
  c.depths = (8,)
  c.num_steps = 2_000
  c.overrides = config_dict.ConfigDict(
    {
      "train": {"warmup_steps": 200},
      "eval": {"every_steps": 250},
      "checkpoint": {"every_steps": 2_000},  # one save at the end: the run is minutes long
      "model": {"fast_weight_impl": "auto"},
    }
  )
  c.arms = passes_arms((1, 4))
  return c
