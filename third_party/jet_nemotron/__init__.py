"""JetNemotronForCausalLM -> sleep_jax: the config mapping and the tensor names (UPSTREAM.md).

A Qwen2 decoder whose layers are Jet blocks ("J"), full attention ("A") or sliding-window
attention ("S") as config.json's `layer_types` says; every layer has its SwiGLU MLP.
"""

from __future__ import annotations

from third_party import qwen2

ARCHITECTURE = "JetNemotronForCausalLM"
IGNORED = qwen2.IGNORED
LETTERS = {"jet": "J", "attn": "A", "swa": "S"}


def model_config(hf: dict, *, dtype: str = "float32", **overrides) -> dict:
  """`build_model`'s model config from Jet-Nemotron's config.json (as a dict).

  `overrides` are ModelConfig fields, e.g. the paper's loop range loop_start=7, loop_stop=21
  (the middle 14 of 28 blocks)."""
  types = hf["layer_types"]
  unknown = sorted(set(types) - set(LETTERS))
  if unknown or len(types) != hf["num_hidden_layers"]:
    raise ValueError(
      f"{ARCHITECTURE}: layer_types must list {hf['num_hidden_layers']} of {sorted(LETTERS)}, "
      f"got {len(types)} with unknown {unknown}"
    )
  jet = hf["efficient_attention_config"]["jet"]
  swa = hf["efficient_attention_config"].get("swa", {})
  fields = dict(
    qwen2.attention_fields(hf),
    pattern="".join(LETTERS[t] for t in types),
    qkv_bias=True,
    sliding_window=swa.get("window_size") if "swa" in types else None,
    fast_heads=jet["num_heads"],
    fast_key_dim=jet["head_dim"],
    fast_value_dim=int(jet["head_dim"] * jet["expand_v"]),
    conv_width=jet["conv_size"],
    dconv_reduction=jet["dconv_generator_reduction"],
    fast_norm_eps=float(jet.get("norm_eps", 1e-5)),
    dtype=dtype,
  )
  return fields | overrides


global_tensors = qwen2.global_tensors

JET_TENSORS = {
  "self_attn.q_proj.weight": ("mixer/q/kernel", True),
  "self_attn.k_proj.weight": ("mixer/k/kernel", True),
  "self_attn.v_proj.weight": ("mixer/v/kernel", True),
  "self_attn.a_proj.weight": ("mixer/decay_proj/kernel", True),
  "self_attn.b_proj.weight": ("mixer/beta_proj/kernel", True),
  "self_attn.A_log": ("mixer/A_log", False),
  "self_attn.dt_bias": ("mixer/dt_bias", False),
  "self_attn.dynamic_conv1d.kernel_generator.w1.weight": ("mixer/kernel_hidden/kernel", True),
  "self_attn.dynamic_conv1d.kernel_generator.w2.weight": ("mixer/kernel_out/kernel", True),
  "self_attn.dynamic_conv1d.kernel_generator.w2.bias": ("mixer/kernel_out/bias", False),
  "self_attn.g_proj.weight": ("mixer/out_gate/kernel", True),
  "self_attn.o_norm.weight": ("mixer/out_norm/scale", False),
  "self_attn.o_proj.weight": ("mixer/o/kernel", True),
}


def layer_tensors(hf: dict, layer: int) -> dict[str, tuple[str, bool]]:
  mixer = JET_TENSORS if hf["layer_types"][layer] == "jet" else qwen2.attention_tensors(bias=True)
  return qwen2.NORM_TENSORS | mixer | qwen2.MLP_TENSORS


layer_positions = qwen2.layer_positions


# The published Jet-Nemotron-2B config.json (the fields the port reads; UPSTREAM.md): the
# configs build the model section from it without the checkpoint at hand.
CONFIG_2B = {
  "architectures": [ARCHITECTURE],
  "hidden_size": 1536,
  "num_hidden_layers": 28,
  "num_attention_heads": 12,
  "num_key_value_heads": 2,
  "intermediate_size": 8960,
  "vocab_size": 151936,
  "rope_theta": 1000000.0,
  "tie_word_embeddings": True,
  "rms_norm_eps": 1e-06,
  "layer_types": ["jet"] * 14 + ["attn"] + ["jet"] * 4 + ["attn", "swa", "swa"] + ["jet"] * 6,
  "efficient_attention_config": {
    "jet": {
      "num_heads": 12,
      "head_dim": 96,
      "expand_v": 2.6666666667,
      "conv_size": 4,
      "dconv_generator_reduction": 8,
      "norm_eps": "1e-5",
    },
    "swa": {"window_size": 1152},
  },
}
