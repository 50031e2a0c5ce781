"""The paper's GSM-Infinite fine-tunes (sections 6.3-6.4) as named sweeps, one per model.

  gsm_pretrained.py:jet_nemotron   Jet-Nemotron-2B, middle 14 blocks looped, hard L=2000,
                                   N in {1, 2, 4, 6}
  gsm_pretrained.py:ouro           Ouro-1.4B + 6 Jet layers, all blocks looped, hard L=2000,
                                   N in {1, 2, 4}
  gsm_pretrained.py:ouro_sliding   Ouro, sliding L=512 after the warm-up run, N in {1, 2, 4}

Each needs the converted checkpoint (launch/convert.py) and the checkpoint's tokenizer.json;
set them here (CHECKPOINTS) or on the command line:

  python launch/convert.py --checkpoint=/models/Jet-Nemotron-2B --out=ckpt/jet_nemotron_2b \\
      --option=loop_start=7 --option=loop_stop=21
  python launch/sweep.py --config=configs/sweeps/gsm_pretrained.py:jet_nemotron \\
      --sweep_dir=runs/sweeps/gsm_jet_nemotron
  # Ouro's sliding recipe: first the warm-up run (only the inserted layers train), then the sweep
  python launch/main.py --config=configs/gsm_infinite.py:ouro_1_4b_warmup \\
      --workdir=runs/gsm_ouro_warmup --config.init_from=ckpt/ouro_1_4b_jet6 \\
      --config.task.tokenizer=/models/Ouro-1.4B/tokenizer.json
  python launch/sweep.py --config=configs/sweeps/gsm_pretrained.py:ouro_sliding \\
      --sweep_dir=runs/sweeps/gsm_ouro_sliding
"""

from ml_collections import config_dict

from sleep_jax.experiments.sweeps import passes_arms

# (base variant, passes, init_from, tokenizer.json) per sweep.
CHECKPOINTS = {
  "jet_nemotron": (
    "jet_nemotron_2b",
    (1, 2, 4, 6),
    "ckpt/jet_nemotron_2b",
    "/models/Jet-Nemotron-2B/tokenizer.json",
  ),
  "ouro": ("ouro_1_4b", (1, 2, 4), "ckpt/ouro_1_4b_jet6", "/models/Ouro-1.4B/tokenizer.json"),
  "ouro_sliding": (
    "ouro_1_4b_sliding",
    (1, 2, 4),
    "runs/gsm_ouro_warmup",  # the warm-up run's workdir
    "/models/Ouro-1.4B/tokenizer.json",
  ),
}


def get_config(variant: str | None = None) -> config_dict.ConfigDict:
  if variant not in CHECKPOINTS:
    raise ValueError(f"gsm_pretrained.py:<variant> with variant one of {sorted(CHECKPOINTS)}")
  base, passes, init_from, tokenizer = CHECKPOINTS[variant]
  c = config_dict.ConfigDict()
  c.name = f"gsm_{variant}"
  c.base = f"configs/gsm_infinite.py:{base}"
  c.seeds = (0,)  # the paper: one seed
  c.depths = ()
  c.num_steps = config_dict.placeholder(int)  # None: the variant's epochs
  c.overrides = config_dict.ConfigDict({"init_from": init_from, "task": {"tokenizer": tokenizer}})
  c.arms = passes_arms(passes)
  return c
