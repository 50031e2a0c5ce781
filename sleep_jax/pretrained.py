"""Load a pretrained model from a local Hugging Face-layout directory into a sleep_jax model.

    model, model_config = sleep_jax.pretrained.load("/path/to/checkpoint")
    logits = sleep_jax.apply(model, tokens, sleep_config=dict(eviction="none", context_len=0))

The directory holds config.json and safetensors weights (one file, or shards listed by
model.safetensors.index.json). `load` dispatches on config.json's `architectures` to a port in
third_party/ (each with an UPSTREAM.md: source, license, the tensor mapping), builds the model
abstractly, and fills it; a missing, unexpected or misshapen tensor is an error naming it.
Nothing is downloaded. Ports today: Qwen2ForCausalLM (Jet-Nemotron's base). Jet-Nemotron and
Ouro follow (they need Jet blocks, sandwich norms and a loop range).
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from flax import nnx

from sleep_jax.model.config import ModelConfig
from sleep_jax.model.lm import HybridLM, build_model, param_path, params_by_path


def _ports() -> dict:
  from third_party import qwen2

  return {qwen2.ARCHITECTURE: qwen2}


def read_config(path: str) -> dict:
  config_file = os.path.join(path, "config.json")
  if not os.path.isfile(config_file):
    raise FileNotFoundError(f"{path} is not a Hugging Face checkpoint directory (no config.json)")
  with open(config_file) as f:
    return json.load(f)


def read_tensors(path: str) -> dict[str, np.ndarray]:
  """Every tensor of the directory's safetensors files (sharded or not), as arrays."""
  from safetensors.flax import load_file  # jax arrays: bfloat16 survives

  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.isfile(index):
    with open(index) as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
  else:
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
  if not files:
    raise FileNotFoundError(f"{path} has no .safetensors weights")
  tensors = {}
  for name in files:
    tensors.update(load_file(os.path.join(path, name)))
  return tensors


def load(path: str, *, dtype: str | None = None) -> tuple[HybridLM, ModelConfig]:
  """The model of a local checkpoint directory and its `ModelConfig`.

  Args:
    path: a directory with config.json and safetensors weights.
    dtype: activation dtype ("float32" default, or "bfloat16"); parameters stay float32.

  Returns:
    (model, model_config).
  """
  hf = read_config(path)
  ports = _ports()
  architectures = hf.get("architectures") or []
  port = next((ports[a] for a in architectures if a in ports), None)
  if port is None:
    raise ValueError(f"{path}: architectures {architectures} has no port; known: {sorted(ports)}")
  model_config = ModelConfig(**port.model_config(hf, dtype=dtype or "float32"))
  abstract = nnx.eval_shape(lambda: build_model(model_config, seed=0))
  graphdef, state = nnx.split(abstract)
  pure = nnx.to_pure_dict(state)
  expected = {name: tuple(leaf.shape) for name, leaf in params_by_path(pure).items()}
  values = port.convert(read_tensors(path), hf, expected)
  if set(values) != set(expected):
    raise ValueError(f"port {port.ARCHITECTURE} left {sorted(set(expected) - set(values))} unset")
  filled = jax.tree_util.tree_map_with_path(
    lambda keys, _: jax.numpy.asarray(values[param_path(keys)]),
    pure,
  )
  nnx.replace_by_pure_dict(state, filled)
  return nnx.merge(graphdef, state), model_config
