"""Qwen2ForCausalLM -> sleep_jax: the config mapping and the tensor names (UPSTREAM.md)."""

from __future__ import annotations

ARCHITECTURE = "Qwen2ForCausalLM"
IGNORED = r".*rotary_emb\.inv_freq$|lm_head\.weight$"  # the head only when tied (see below)


def rope(hf: dict, architecture: str = ARCHITECTURE) -> dict:
  """rope_base and rope_scaling from either config layout (top level, or transformers 5's
  rope_parameters); linear scaling is supported, any other type is an error."""
  parameters = hf.get("rope_parameters") or {}
  scaling = hf.get("rope_scaling") or {}
  rope_type = parameters.get("rope_type") or scaling.get("rope_type") or scaling.get("type")
  factor = 1.0
  if rope_type == "linear":
    factor = float(parameters.get("factor", scaling.get("factor", 1.0)))
  elif rope_type not in (None, "default"):
    raise ValueError(f"{architecture}: rope scaling {rope_type!r} is not supported (linear is)")
  theta = float(parameters.get("rope_theta", hf.get("rope_theta", 10_000.0)))
  return dict(rope_base=theta, rope_scaling=factor)


def attention_fields(hf: dict) -> dict:
  """The ModelConfig fields every Qwen2-like decoder shares."""
  heads = hf["num_attention_heads"]
  return dict(
    vocab_size=hf["vocab_size"],
    d_model=hf["hidden_size"],
    num_heads=heads,
    num_kv_heads=hf.get("num_key_value_heads") or heads,
    head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
    mlp_dim=hf["intermediate_size"],
    norm_eps=hf.get("rms_norm_eps", 1e-6),
    tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    **rope(hf),
  )


def model_config(hf: dict, *, dtype: str = "float32", **overrides) -> dict:
  """`build_model`'s model config from a Hugging Face config.json (as a dict)."""
  if hf.get("use_sliding_window"):
    raise ValueError(f"{ARCHITECTURE}: sliding-window layers are not supported yet")
  fields = dict(
    attention_fields(hf), pattern="A" * hf["num_hidden_layers"], qkv_bias=True, dtype=dtype
  )
  return fields | overrides


def global_tensors(hf: dict) -> dict[str, tuple[str, bool]]:
  names = {
    "model.embed_tokens.weight": ("embedding", False),
    "model.norm.weight": ("final_norm/scale", False),
  }
  if not hf.get("tie_word_embeddings", False):
    names["lm_head.weight"] = ("head/kernel", True)
  return names


def attention_tensors(bias: bool) -> dict[str, tuple[str, bool]]:
  """A Qwen2 attention layer's mixer tensors (the Jet-Nemotron port's attention layers too)."""
  names = {f"self_attn.{p}_proj.weight": (f"mixer/{p}/kernel", True) for p in "qkvo"}
  if bias:
    names.update({f"self_attn.{p}_proj.bias": (f"mixer/{p}/bias", False) for p in "qkv"})
  return names


MLP_TENSORS = {f"mlp.{p}_proj.weight": (f"mlp/{p}/kernel", True) for p in ("gate", "up", "down")}
NORM_TENSORS = {
  "input_layernorm.weight": ("mixer_norm/scale", False),
  "post_attention_layernorm.weight": ("mlp_norm/scale", False),
}


def layer_tensors(hf: dict, layer: int) -> dict[str, tuple[str, bool]]:
  return NORM_TENSORS | attention_tensors(bias=True) | MLP_TENSORS


def layer_positions(hf: dict, model_config) -> list[int]:
  return list(range(hf["num_hidden_layers"]))
