"""Rule 110 on a 2-core CPU: N in {1, 2, 4} and three baselines at depth 2, three seeds.

Arms:
  n1, n2, n4           the sleeping hybrid with N passes per evicted window (n1 = plain hybrid).
  n1_compute_matched   N=1 trained for longer, so that it spends as many training FLOPs as n4.
  attention_only       "AAAA" under hard eviction: no fast state, so the context never reaches
                       the queries; it should sit on the majority-label floor (8.0% at
                       t=2) and checks the task has no leak.
  full_attention       no eviction (sleep.eviction "none"): attention sees all 100 tokens; the
                       ceiling for this model size.

Cost: 18 runs (6 arms x 3 seeds) of 160 steps, about an hour on an idle 2-core machine (see
the measurements below). Cut it with --config.seeds=0, or add depths with --config.depths=2,4.

  python launch/sweep.py --config=configs/sweeps/rule110_cpu.py --sweep_dir=runs/sweeps/rule110_cpu
  python launch/sweep.py --config=configs/sweeps/rule110_cpu.py --sweep_dir=runs/sweeps/rule110_cpu \
      --config.seeds=0 --config.depths=4 --only=n2
"""

from ml_collections import config_dict

from sleep_jax.data import rule110
from sleep_jax.experiments.sweeps import arm
from sleep_jax.sleep.config import training_flops_ratio

MAX_PASSES = 4


def get_config() -> config_dict.ConfigDict:
  c = config_dict.ConfigDict()
  c.name = "rule110_cpu"
  c.base = "configs/rule110.py:cpu"
  c.seeds = (0, 1, 2)
  c.depths = (2,)
  c.num_steps = 160  # per arm with step_ratio 1
  # Sized to finish in about an hour on 2 cores (measured on an idle machine: N=1 267 ms/step,
  # N=4 1168 ms/step, ~25 s compile per run): half the cpu variant's width, a quarter of its MLP,
  # half its batch. Small evaluation sets, evaluated every 40 steps for learning curves.
  c.overrides = config_dict.ConfigDict(
    {
      "model": {"d_model": 64, "num_heads": 2, "head_dim": 32, "mlp_dim": 128},
      "train": {"batch_size": 32, "warmup_steps": 16},
      "task": {"eval_depths": (1, 2, 3, 4)},
      "eval": {
        "every_steps": 40,
        "num_examples": 512,
        "num_slice_examples": 256,
        "batch_size": 256,
      },
      "checkpoint": {"every_steps": 80},
    }
  )
  # Compute matching by more steps rather than more layers: the same architecture and data
  # order, so the only difference from n4 is where the FLOPs go (passes over the context vs
  # more examples). An n4 example runs 4 * 96 + 4 = 388 tokens through the stack, an n1
  # example 100, so n1 trains 3.88x as many steps.
  ratio = training_flops_ratio(MAX_PASSES, rule110.CONTEXT_LEN, rule110.STRING_LEN, rule110.SEQ_LEN)
  c.arms = (
    arm("n1", {"sleep.passes": 1}),
    arm("n2", {"sleep.passes": 2}),
    arm("n4", {"sleep.passes": 4}),
    arm("n1_compute_matched", {"sleep.passes": 1}, step_ratio=ratio),
    arm("attention_only", {"sleep.passes": 1, "model.pattern": "AAAA"}),
    arm("full_attention", {"sleep.passes": 1, "sleep.eviction": "none"}),
  )
  return c
