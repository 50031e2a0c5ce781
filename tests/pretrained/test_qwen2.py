"""A tiny random Qwen2 written by `transformers` loads and gives transformers' logits."""

import json
import os

import numpy as np
import pytest

import sleep_jax
from sleep_jax import pretrained

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def write_tiny_qwen2(path, *, tie, seed=0):
  torch.manual_seed(seed)
  config = transformers.Qwen2Config(
    vocab_size=61,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rope_theta=5000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=tie,
  )
  model = transformers.Qwen2ForCausalLM(config).eval()
  with torch.no_grad():  # random, not zero, biases and norms: every tensor is checked
    for name, param in model.named_parameters():
      if name.endswith("bias") or "norm" in name:
        param.add_(0.1 * torch.randn_like(param))
  model.save_pretrained(path, safe_serialization=True)
  return model


@pytest.mark.parametrize("tie", [True, False])
def test_tiny_qwen2_gives_transformers_logits(tmp_path, tie):
  reference = write_tiny_qwen2(tmp_path, tie=tie)
  model, config = pretrained.load(str(tmp_path))
  assert (config.num_kv_heads, config.qkv_bias, config.tie_embeddings) == (2, True, tie)
  tokens = np.random.default_rng(0).integers(0, 61, (2, 17))
  with torch.no_grad():
    expected = reference(torch.tensor(tokens)).logits.float().numpy()
  logits = sleep_jax.apply(
    model, tokens, sleep_config=dict(eviction="none", context_len=0, passes=1)
  )
  np.testing.assert_allclose(np.asarray(logits), expected, rtol=1e-4, atol=1e-4)


def test_a_misshapen_or_missing_tensor_is_named(tmp_path):
  write_tiny_qwen2(tmp_path, tie=False)
  with open(tmp_path / "config.json") as f:
    hf = json.load(f)
  hf["intermediate_size"] = 40
  with open(tmp_path / "config.json", "w") as f:
    json.dump(hf, f)
  with pytest.raises(ValueError, match=r"mlp.(gate|up|down)_proj.weight: checkpoint shape"):
    pretrained.load(str(tmp_path))
  hf["intermediate_size"], hf["num_hidden_layers"] = 48, 4
  with open(tmp_path / "config.json", "w") as f:
    json.dump(hf, f)
  with pytest.raises(ValueError, match=r"missing \['model.layers.3"):
    pretrained.load(str(tmp_path))
  hf["architectures"] = ["LlamaForCausalLM"]
  with open(tmp_path / "config.json", "w") as f:
    json.dump(hf, f)
  with pytest.raises(ValueError, match="has no port"):
    pretrained.load(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="no config.json"):
    pretrained.load(os.path.join(tmp_path, "nowhere"))
