"""Qwen2ForCausalLM -> sleep_jax: the config mapping and the tensor-name mapping (UPSTREAM.md)."""

from __future__ import annotations

import re
from typing import Any

import numpy as np

ARCHITECTURE = "Qwen2ForCausalLM"
IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


def rope_theta(hf: dict) -> float:
  """rope_theta from either config layout (top level, or transformers 5's rope_parameters)."""
  parameters = hf.get("rope_parameters") or {}
  scaling = hf.get("rope_scaling") or {}
  rope_type = parameters.get("rope_type") or scaling.get("rope_type") or scaling.get("type")
  if rope_type not in (None, "default"):
    raise ValueError(f"{ARCHITECTURE}: rope scaling {rope_type!r} is not supported yet")
  return float(parameters.get("rope_theta", hf.get("rope_theta", 10_000.0)))


def model_config(hf: dict, *, dtype: str = "float32") -> dict:
  """`build_model`'s model config from a Hugging Face config.json (as a dict)."""
  if hf.get("use_sliding_window"):
    raise ValueError(f"{ARCHITECTURE}: sliding-window layers are not supported yet")
  heads = hf["num_attention_heads"]
  return dict(
    vocab_size=hf["vocab_size"],
    pattern="A" * hf["num_hidden_layers"],
    d_model=hf["hidden_size"],
    num_heads=heads,
    num_kv_heads=hf.get("num_key_value_heads", heads),
    head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
    mlp_dim=hf["intermediate_size"],
    rope_base=rope_theta(hf),
    norm_eps=hf.get("rms_norm_eps", 1e-6),
    qkv_bias=True,
    tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    dtype=dtype,
  )


def tensor_names(hf: dict) -> dict[str, tuple[str, int | None, bool]]:
  """Hugging Face tensor name -> (sleep_jax parameter path, layer index or None, transpose)."""
  names = {"model.embed_tokens.weight": ("embedding", None, False)}
  names["model.norm.weight"] = ("final_norm/scale", None, False)
  if not hf.get("tie_word_embeddings", False):
    names["lm_head.weight"] = ("head/kernel", None, True)
  for i in range(hf["num_hidden_layers"]):
    layer = f"model.layers.{i}"
    names[f"{layer}.input_layernorm.weight"] = ("blocks/0/mixer_norm/scale", i, False)
    names[f"{layer}.post_attention_layernorm.weight"] = ("blocks/0/mlp_norm/scale", i, False)
    for proj in ("q", "k", "v"):
      names[f"{layer}.self_attn.{proj}_proj.weight"] = (f"blocks/0/mixer/{proj}/kernel", i, True)
      names[f"{layer}.self_attn.{proj}_proj.bias"] = (f"blocks/0/mixer/{proj}/bias", i, False)
    names[f"{layer}.self_attn.o_proj.weight"] = ("blocks/0/mixer/o/kernel", i, True)
    for proj in ("gate", "up", "down"):
      names[f"{layer}.mlp.{proj}_proj.weight"] = (f"blocks/0/mlp/{proj}/kernel", i, True)
  return names


def is_ignored(name: str, hf: dict) -> bool:
  """Tensors a checkpoint may carry that the port does not need."""
  tied_head = name == "lm_head.weight" and hf.get("tie_word_embeddings", False)
  return bool(IGNORED.match(name)) or tied_head


def convert(tensors: dict[str, Any], hf: dict, expected: dict[str, tuple]) -> dict[str, np.ndarray]:
  """sleep_jax parameter path -> float32 array, from the checkpoint's tensors.

  Args:
    tensors: Hugging Face name -> array.
    hf: the config.json.
    expected: sleep_jax parameter path -> shape (of the model built from `model_config`).

  Raises:
    ValueError naming the tensor and both shapes, or the missing and unexpected names.
  """
  names = tensor_names(hf)
  missing = sorted(set(names) - set(tensors))
  unexpected = sorted(n for n in set(tensors) - set(names) if not is_ignored(n, hf))
  if missing or unexpected:
    raise ValueError(
      f"{ARCHITECTURE} checkpoint does not match its config: missing {missing[:8]}"
      f"{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
    )
  stacked: dict[str, np.ndarray] = {}
  for name, (path, layer, transpose) in names.items():
    value = np.asarray(tensors[name], np.float32)
    value = value.T if transpose else value
    want = expected[path][1:] if layer is not None else expected[path]
    if value.shape != tuple(want):
      raise ValueError(
        f"{name}: checkpoint shape {tuple(np.asarray(tensors[name]).shape)}"
        f"{' (transposed ' + str(value.shape) + ')' if transpose else ''} does not match "
        f"{path} {tuple(want)}"
      )
    if layer is None:
      stacked[path] = value
    else:
      stacked.setdefault(path, np.zeros(expected[path], np.float32))[layer] = value
  return stacked
