"""The README's first command: the sleeping hybrid (N=4) beside the plain hybrid (N=1).

Both arms train the same small Rule 110 model (depth t=2) on the same data, in the same order,
for the same number of steps; only the passes per evicted window differ. The sweep ends by
printing both arms side by side (and writes report.md with figures into the sweep dir).
About 8 minutes on 2 CPU cores (measured with another process busy on one of them). Measured
(seed 0): N=4 23.4% exact accuracy (loss 0.507) against N=1 10.4% (loss 0.672); chance is
6.25%. One seed only: configs/sweeps/rule110_cpu.py runs three seeds and the baselines.

  python launch/sweep.py --config=configs/sweeps/first_look.py --sweep_dir=runs/first_look
"""

from ml_collections import config_dict

from sleep_jax.experiments.sweeps import arm


def get_config() -> config_dict.ConfigDict:
  c = config_dict.ConfigDict()
  c.name = "first_look"
  c.base = "configs/rule110.py:cpu"
  c.seeds = (0,)
  c.depths = (2,)
  c.num_steps = 160
  # Half the cpu variant's width, a quarter of its MLP, half its batch (as rule110_cpu).
  c.overrides = config_dict.ConfigDict(
    {
      "model": {"d_model": 64, "num_heads": 2, "head_dim": 32, "mlp_dim": 128},
      "train": {"batch_size": 32, "warmup_steps": 16},
      "task": {"eval_depths": ()},
      "eval": {
        "every_steps": 80,
        "num_examples": 512,
        "num_slice_examples": 256,
        "batch_size": 256,
      },
      "checkpoint": {"every_steps": 80},
      "log_every_steps": 20,
    }
  )
  c.arms = (
    arm("n1_plain_hybrid", {"sleep.passes": 1}),
    arm("n4_sleeping", {"sleep.passes": 4}),
  )
  return c
