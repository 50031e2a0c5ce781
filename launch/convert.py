"""Convert a local Hugging Face checkpoint (Qwen2, Jet-Nemotron, Ouro) into a starting point
for training: `--config.init_from=<out>` then fine-tunes it.

  python launch/convert.py --checkpoint=/models/Jet-Nemotron-2B --out=ckpt/jet2b_loop7_21 \\
      --option=loop_start=7 --option=loop_stop=21
  python launch/convert.py --checkpoint=/models/Ouro-1.4B --out=ckpt/ouro_jet6 \\
      --option=insert_jet_layers=6

`--option` passes the port's options and ModelConfig fields (the loop range, inserted Jet
layers) to `sleep_jax.pretrained.load`; the run's config.model must then match the saved
model.json (configs/gsm_infinite.py's pretrained variants do). Nothing is downloaded.
"""

import ast
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sleep_jax import xla_flags

xla_flags.apply_defaults()  # before JAX starts its backend

from absl import app, flags  # noqa: E402
from flax import nnx  # noqa: E402

from sleep_jax import pretrained  # noqa: E402
from sleep_jax.train import checkpoint  # noqa: E402

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A Hugging Face checkpoint directory.")
_OUT = flags.DEFINE_string("out", None, "Where to write model.json and params/.")
_OPTIONS = flags.DEFINE_multi_string("option", [], "name=value, a load option (repeatable).")
flags.mark_flags_as_required(["checkpoint", "out"])


def parse_options(items: list[str]) -> dict:
  """["loop_start=7", "insert_jet_layers=6"] -> {"loop_start": 7, "insert_jet_layers": 6}."""
  options = {}
  for item in items:
    name, sep, value = item.partition("=")
    if not sep:
      raise ValueError(f"--option={item!r}: use name=value")
    try:
      options[name] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      options[name] = value
  return options


def convert(source: str, out: str, options: dict) -> None:
  model, model_config = pretrained.load(source, **options)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  checkpoint.save_initial(out, params, model_config)
  print(f"wrote {out}: pattern {model_config.pattern!r}, segments {model_config.segments}")


def main(argv):
  del argv
  convert(_CHECKPOINT.value, _OUT.value, parse_options(_OPTIONS.value))


if __name__ == "__main__":
  app.run(main)
