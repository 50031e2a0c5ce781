"""OuroForCausalLM -> sleep_jax: the config mapping and the tensor names (UPSTREAM.md).

Ouro is a Llama-like decoder with sandwich norms whose 24 layers run `total_ut_steps` (4)
times with shared weights, the final norm after every loop. Here: pattern "A" x layers, the
loop is the whole stack with loop_repeats = total_ut_steps and loop_norm on, so one pass is
Ouro's own forward (read out at the last loop). The paper inserts MLP-free Jet layers:
`insert_jet_layers=k` puts one ("j") after every layers/k attention blocks.
"""

from __future__ import annotations

from third_party import qwen2

ARCHITECTURE = "OuroForCausalLM"
# The exit gate picks a loop per token at inference; sleep_jax always reads the last loop.
IGNORED = qwen2.IGNORED + r"|model\.early_exit_gate\.(weight|bias)$"


def _every(hf: dict, insert_jet_layers: int) -> int:
  layers = hf["num_hidden_layers"]
  if insert_jet_layers and layers % insert_jet_layers:
    raise ValueError(
      f"{ARCHITECTURE}: insert_jet_layers={insert_jet_layers} must divide the {layers} layers"
    )
  return layers // insert_jet_layers if insert_jet_layers else layers + 1


def model_config(
  hf: dict, *, dtype: str = "float32", insert_jet_layers: int = 0, **overrides
) -> dict:
  """`build_model`'s model config from Ouro's config.json (as a dict).

  Args:
    hf: config.json.
    dtype: activation dtype.
    insert_jet_layers: MLP-free Jet layers to insert, evenly (the paper: 6).
    **overrides: ModelConfig fields (e.g. loop_repeats=1 to make a pass one loop).
  """
  if hf.get("use_sliding_window"):
    raise ValueError(f"{ARCHITECTURE}: sliding-window layers are not supported")
  layers, every = hf["num_hidden_layers"], _every(hf, insert_jet_layers)
  pattern = "".join("A" + ("j" if (i + 1) % every == 0 else "") for i in range(layers))
  fields = dict(
    qwen2.attention_fields(hf),
    pattern=pattern,
    qkv_bias=False,
    sandwich_norm=True,
    loop_repeats=int(hf.get("total_ut_steps", 4)),
    loop_norm=True,
    dtype=dtype,
  )
  return fields | overrides


global_tensors = qwen2.global_tensors

SANDWICH_NORM_TENSORS = {
  "input_layernorm.weight": ("mixer_norm/scale", False),
  "input_layernorm_2.weight": ("mixer_out_norm/scale", False),
  "post_attention_layernorm.weight": ("mlp_norm/scale", False),
  "post_attention_layernorm_2.weight": ("mlp_out_norm/scale", False),
}


def layer_tensors(hf: dict, layer: int) -> dict[str, tuple[str, bool]]:
  return SANDWICH_NORM_TENSORS | qwen2.attention_tensors(bias=False) | qwen2.MLP_TENSORS


def layer_positions(hf: dict, model_config) -> list[int]:
  """Checkpoint layer i's pattern index: after the Jet layers inserted before it."""
  attention = [i for i, letter in enumerate(model_config.pattern) if letter == "A"]
  if len(attention) != hf["num_hidden_layers"]:
    raise ValueError(
      f"{ARCHITECTURE}: pattern {model_config.pattern!r} does not fit the checkpoint"
    )
  return attention


# The published Ouro-1.4B config.json (the fields the port reads; UPSTREAM.md).
CONFIG_1_4B = {
  "architectures": [ARCHITECTURE],
  "hidden_size": 2048,
  "num_hidden_layers": 24,
  "num_attention_heads": 16,
  "num_key_value_heads": 16,
  "head_dim": 128,
  "intermediate_size": 5632,
  "vocab_size": 49152,
  "rope_theta": 1000000.0,
  "tie_word_embeddings": False,
  "rms_norm_eps": 1e-06,
  "total_ut_steps": 4,
}
