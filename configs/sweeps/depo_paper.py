"""Depo k-hop retrieval at the paper's scale (Fig. 3): N in {1, 2, 3, 4} and 8 (our extension).

One run per N evaluates every hop count k in {1, 2, 4, 8, 16}, so there is no grid axis besides
the arm. Paper (test loss, qualitative): all N learn k = 1, 2; N=1 barely moves for k >= 4; N=2
stalls at k >= 8; only N=4 starts to improve at k = 16.

  python launch/sweep.py --config=configs/sweeps/depo_paper.py --sweep_dir=runs/sweeps/depo_paper
"""

from ml_collections import config_dict

from sleep_jax.experiments.sweeps import passes_arms


def get_config() -> config_dict.ConfigDict:
  c = config_dict.ConfigDict()
  c.name = "depo_paper"
  c.base = "configs/depo.py:paper_fig3"
  c.seeds = (0,)
  c.depths = ()
  c.num_steps = config_dict.placeholder(int)  # None: the paper variant's train.num_steps
  c.overrides = config_dict.ConfigDict()
  c.arms = passes_arms((1, 2, 3, 4, 8))
  return c
