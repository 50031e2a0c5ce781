"""Rule 110: the Muon learning-rate search at N=1 that the paper reuses for every N.

The paper tunes Muon's rate on the plain hybrid and reports 2e-3 for the synthetic tasks; it
does not say at which depth or for how long. (ours) At t=8, where N=1 learns within the Fig. 2a
budget, for the same 800 steps (~40M tokens), over a factor-2 grid around 2e-3. Pick the rate
with the best final exact accuracy (`python -m sleep_jax.experiments.report`), then set
train.muon_lr for every arm of rule110_paper and depo_paper.

  python launch/xm_launch.py --config=configs/sweeps/rule110_muon_lr.py --dry_run
"""

from ml_collections import config_dict

from sleep_jax.experiments.sweeps import arm

MUON_LRS = (5e-4, 1e-3, 2e-3, 4e-3, 8e-3)


def get_config() -> config_dict.ConfigDict:
  c = config_dict.ConfigDict()
  c.name = "rule110_muon_lr"
  c.base = "configs/rule110.py:paper"
  c.seeds = (0,)
  c.depths = (8,)
  c.num_steps = 800
  c.overrides = config_dict.ConfigDict({"train": {"warmup_steps": 40}})
  c.arms = tuple(arm(f"muon_lr{lr:g}", {"train.muon_lr": lr}) for lr in MUON_LRS)
  return c
