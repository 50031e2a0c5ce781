"""Load a pretrained model from a local Hugging Face-layout directory into a sleep_jax model.

    model, model_config = sleep_jax.pretrained.load("/path/to/checkpoint")
    logits = sleep_jax.apply(model, tokens, sleep_config=dict(eviction="none", context_len=0))
    model, model_config = sleep_jax.pretrained.load(path, loop_start=7, loop_stop=21)

The directory holds config.json and safetensors weights (one file, or shards listed by
model.safetensors.index.json; float32 or bfloat16). `load` dispatches on config.json's
`architectures` to a port in third_party/ (each with an UPSTREAM.md: source, license, the
tensor mapping), builds the model abstractly, and fills it; a missing, unexpected or misshapen
tensor is an error naming it and both shapes. Nothing is downloaded.

A port is a module with:
  ARCHITECTURE                       config.json's architecture name;
  model_config(hf, **options)        `ModelConfig` fields from config.json (options: the port's
                                     own, e.g. Ouro's inserted Jet layers);
  global_tensors(hf)                 {tensor name: (parameter path, transpose)} outside layers;
  layer_tensors(hf, i)               {name after "model.layers.{i}.": (path in the block,
                                     transpose)};
  layer_positions(hf, model_config)  the pattern index of every checkpoint layer;
  IGNORED                            a regex of tensors the port reads past (with the reason in
                                     its UPSTREAM.md).
Blocks the checkpoint does not have (Ouro's inserted Jet layers) start from the model's own
initialisation with their mixer's output projection zeroed, so that the loaded model computes
the checkpoint's function until it is fine-tuned.
"""

from __future__ import annotations

import json
import os
import re

import jax
import numpy as np
from flax import nnx

from sleep_jax.model.config import ModelConfig
from sleep_jax.model.lm import HybridLM, block_places, build_model, param_path, params_by_path

# A tensor's place: (parameter path, index along the stacked layers axis or None, transpose).
Place = tuple[str, int | None, bool]


def _ports() -> dict:
  from third_party import jet_nemotron, ouro, qwen2

  return {port.ARCHITECTURE: port for port in (qwen2, jet_nemotron, ouro)}


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


def port_for(hf: dict, path: str = "checkpoint"):
  """The third_party port of a config.json."""
  ports = _ports()
  architectures = hf.get("architectures") or []
  port = next((ports[a] for a in architectures if a in ports), None)
  if port is None:
    raise ValueError(f"{path}: architectures {architectures} has no port; known: {sorted(ports)}")
  return port


def tensor_places(port, hf: dict, model_config: ModelConfig) -> dict[str, Place]:
  """Checkpoint tensor name -> where it goes in the model's parameters."""
  places = {name: (path, None, t) for name, (path, t) in port.global_tensors(hf).items()}
  blocks = block_places(model_config)
  for i, position in enumerate(port.layer_positions(hf, model_config)):
    segment, unit_block, repetition = blocks[position]
    for suffix, (sub_path, transpose) in port.layer_tensors(hf, i).items():
      path = f"{segment.attribute}/{unit_block}/{sub_path}"
      places[f"model.layers.{i}.{suffix}"] = (path, repetition, transpose)
  return places


def check_tensors(port, places: dict[str, Place], shapes: dict[str, tuple], expected: dict) -> None:
  """Every place filled by a tensor of the right shape, and no tensor left over.

  Args:
    port: the port (its ARCHITECTURE and IGNORED).
    places: `tensor_places`.
    shapes: checkpoint tensor name -> shape.
    expected: parameter path -> shape (of the model built from the port's config).
  """
  missing = sorted(set(places) - set(shapes))
  unexpected = sorted(n for n in set(shapes) - set(places) if not re.match(port.IGNORED, n))
  if missing or unexpected:
    raise ValueError(
      f"{port.ARCHITECTURE} checkpoint does not match its config: missing {missing[:8]}"
      f"{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
    )
  for name, (path, layer, transpose) in places.items():
    shape = tuple(shapes[name])
    as_stored = shape[::-1] if transpose else shape
    want = tuple(expected[path][1:] if layer is not None else expected[path])
    if as_stored != want:
      raise ValueError(
        f"{name}: checkpoint shape {shape}"
        f"{' (transposed ' + str(as_stored) + ')' if transpose else ''} does not match "
        f"{path} {want}"
      )


def convert(tensors: dict, places: dict[str, Place], expected: dict) -> dict[str, np.ndarray]:
  """Parameter path -> float32 array, from the checkpoint's tensors (checked beforehand)."""
  values: dict[str, np.ndarray] = {}
  filled_layers: dict[str, set] = {}
  for name, (path, layer, transpose) in places.items():
    value = np.asarray(tensors[name], np.float32)
    value = value.T if transpose else value
    if layer is None:
      values[path] = value
    else:
      values.setdefault(path, np.zeros(expected[path], np.float32))[layer] = value
      filled_layers.setdefault(path, set()).add(layer)
  for path, layers in filled_layers.items():  # a stacked parameter is all checkpoint or all new
    if len(layers) != expected[path][0]:
      raise ValueError(
        f"{path}: the checkpoint fills layers {sorted(layers)} of {expected[path][0]}; new "
        "blocks must take whole positions of the repeating unit"
      )
  return values


def load(
  path: str, *, dtype: str | None = None, seed: int = 0, **options
) -> tuple[HybridLM, ModelConfig]:
  """The model of a local checkpoint directory and its `ModelConfig`.

  Args:
    path: a directory with config.json and safetensors weights.
    dtype: activation dtype ("float32" default, or "bfloat16"); parameters stay float32.
    seed: initialisation of blocks the checkpoint lacks (Ouro's inserted Jet layers).
    **options: the port's options and `ModelConfig` fields to override (the loop range,
      e.g. loop_start=7, loop_stop=21; fast_weight_impl).

  Returns:
    (model, model_config).
  """
  hf = read_config(path)
  port = port_for(hf, path)
  model_config = ModelConfig(**port.model_config(hf, dtype=dtype or "float32", **options))
  abstract = nnx.eval_shape(lambda: build_model(model_config, seed=seed))
  graphdef, state = nnx.split(abstract)
  pure = nnx.to_pure_dict(state)
  expected = {name: tuple(leaf.shape) for name, leaf in params_by_path(pure).items()}
  tensors = read_tensors(path)
  places = tensor_places(port, hf, model_config)
  check_tensors(port, places, {n: np.shape(t) for n, t in tensors.items()}, expected)
  values = convert(tensors, places, expected)
  _fill_new_blocks(values, expected, model_config, seed)
  filled = jax.tree_util.tree_map_with_path(
    lambda keys, _: jax.numpy.asarray(values[param_path(keys)]), pure
  )
  nnx.replace_by_pure_dict(state, filled)
  return nnx.merge(graphdef, state), model_config


def _fill_new_blocks(values, expected, model_config, seed) -> None:
  """Initialises the parameters no tensor filled: whole blocks the checkpoint lacks."""
  unset = sorted(set(expected) - set(values))
  if not unset:
    return
  fresh = params_by_path(
    nnx.to_pure_dict(nnx.state(build_model(model_config, seed=seed), nnx.Param))
  )
  for name in unset:
    values[name] = np.array(fresh[name], np.float32)
    if name.endswith("/mixer/o/kernel"):  # the new block adds nothing until fine-tuned
      values[name] = np.zeros_like(values[name])


def export(model: HybridLM, hf: dict, **options) -> dict[str, np.ndarray]:
  """The model's parameters as checkpoint tensors (float32), the inverse of `load`'s mapping."""
  port = port_for(hf)
  params = params_by_path(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  places = tensor_places(port, hf, model.cfg)
  tensors = {}
  for name, (path, layer, transpose) in places.items():
    value = np.asarray(params[path] if layer is None else params[path][layer], np.float32)
    tensors[name] = value.T if transpose else value
  return tensors
