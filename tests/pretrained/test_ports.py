"""Jet-Nemotron and Ouro ports: the real configs' parameter trees against the published
checkpoints' tensors, and tiny checkpoints in the published layout written, loaded, exported.

The published configs and tensor lists below were read from the models' public code and
configs (Jet-Nemotron: NVlabs/Jet-Nemotron @ 94cbd124, jetai/modeling/configs/jetlm_2B.json and
modeling_jet_nemotron.py / jet_block.py / dynamic_conv.py; Ouro: the Hugging Face remote code
modeling_ouro.py of ByteDance/Ouro-1.4B and vLLM's ouro.py). They are written out here, not
derived from the ports, so that a wrong mapping fails.
"""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sleep_jax
from sleep_jax import pretrained
from sleep_jax.model.config import ModelConfig
from sleep_jax.model.layers import rotary
from sleep_jax.model.lm import build_model, params_by_path

JET_NEMOTRON_2B = {
  "architectures": ["JetNemotronForCausalLM"],
  "hidden_size": 1536,
  "num_hidden_layers": 28,
  "num_attention_heads": 12,
  "num_key_value_heads": 2,
  "intermediate_size": 8960,
  "vocab_size": 151936,
  "rope_theta": 1000000.0,
  "rope_scaling": None,
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
      "dconv_implementation": "triton",
      "mode": "chunk",
      "norm_eps": "1e-5",
    },
    "swa": {"window_size": 1152},
  },
}
OURO_1_4B = {
  "architectures": ["OuroForCausalLM"],
  "hidden_size": 2048,
  "num_hidden_layers": 24,
  "num_attention_heads": 16,
  "num_key_value_heads": 16,
  "head_dim": 128,
  "intermediate_size": 5632,
  "vocab_size": 49152,
  "rope_theta": 1000000.0,
  "rope_scaling": None,
  "tie_word_embeddings": False,
  "rms_norm_eps": 1e-06,
  "total_ut_steps": 4,
  "early_exit_threshold": 1.0,
  "use_sliding_window": False,
}


def published_tensors(hf: dict) -> dict[str, tuple]:
  """The checkpoint's tensor names and shapes (torch Linear weights are [out, in])."""
  d, inter, vocab = hf["hidden_size"], hf["intermediate_size"], hf["vocab_size"]
  heads, kv = hf["num_attention_heads"], hf["num_key_value_heads"]
  head_dim = hf.get("head_dim") or d // heads
  shapes = {"model.embed_tokens.weight": (vocab, d), "model.norm.weight": (d,)}
  if not hf["tie_word_embeddings"]:
    shapes["lm_head.weight"] = (vocab, d)
  ouro = hf["architectures"] == ["OuroForCausalLM"]
  if ouro:
    shapes["model.early_exit_gate.weight"], shapes["model.early_exit_gate.bias"] = (1, d), (1,)
  for i in range(hf["num_hidden_layers"]):
    layer = f"model.layers.{i}."
    norms = ["input_layernorm", "post_attention_layernorm"]
    norms += ["input_layernorm_2", "post_attention_layernorm_2"] if ouro else []
    shapes |= {f"{layer}{n}.weight": (d,) for n in norms}
    shapes[f"{layer}mlp.gate_proj.weight"] = shapes[f"{layer}mlp.up_proj.weight"] = (inter, d)
    shapes[f"{layer}mlp.down_proj.weight"] = (d, inter)
    kind = hf["layer_types"][i] if "layer_types" in hf else "attn"
    if kind == "jet":
      jet = hf["efficient_attention_config"]["jet"]
      jh, dk = jet["num_heads"], jet["head_dim"]
      dv = int(dk * jet["expand_v"])
      gen = f"{layer}self_attn.dynamic_conv1d.kernel_generator."
      shapes |= {
        f"{layer}self_attn.q_proj.weight": (jh * dk, d),
        f"{layer}self_attn.k_proj.weight": (jh * dk, d),
        f"{layer}self_attn.v_proj.weight": (jh * dv, d),
        f"{layer}self_attn.a_proj.weight": (jh, d),
        f"{layer}self_attn.b_proj.weight": (jh, d),
        f"{layer}self_attn.A_log": (jh,),
        f"{layer}self_attn.dt_bias": (jh,),
        f"{gen}w1.weight": (jh * dv // 8, d),
        f"{gen}w2.weight": (jh * dv * 4, jh * dv // 8),
        f"{gen}w2.bias": (jh * dv * 4,),
        f"{layer}self_attn.g_proj.weight": (jh * dv, d),
        f"{layer}self_attn.o_norm.weight": (dv,),
        f"{layer}self_attn.o_proj.weight": (d, jh * dv),
      }
    else:
      shapes |= {
        f"{layer}self_attn.q_proj.weight": (heads * head_dim, d),
        f"{layer}self_attn.k_proj.weight": (kv * head_dim, d),
        f"{layer}self_attn.v_proj.weight": (kv * head_dim, d),
        f"{layer}self_attn.o_proj.weight": (d, heads * head_dim),
      }
      if not ouro:  # Qwen2-style attention has q/k/v biases
        shapes |= {
          f"{layer}self_attn.{p}_proj.bias": (s[0],)
          for p, s in (("q", (heads * head_dim,)), ("k", (kv * head_dim,)), ("v", (kv * head_dim,)))
        }
  return shapes


def abstract_parameters(hf: dict, **options):
  port = pretrained.port_for(hf)
  model_config = ModelConfig(**port.model_config(hf, **options))
  abstract = nnx.eval_shape(lambda: build_model(model_config, seed=0))
  shapes = {
    k: tuple(v.shape) for k, v in params_by_path(nnx.to_pure_dict(nnx.state(abstract))).items()
  }
  return port, model_config, shapes


@pytest.mark.parametrize(
  "hf, options, total",
  [
    # 1,964,806,208 parameters (summed by hand from the shapes), the head tied to the embedding.
    (JET_NEMOTRON_2B, {}, 1_964_806_208),
    # The paper's loop range (the middle 14 of 28 blocks) changes the layout, not the tensors.
    (JET_NEMOTRON_2B, dict(loop_start=7, loop_stop=21), 1_964_806_208),
    # 1,434,652,673 (2.87 GB in bfloat16, the published file's size) with the exit gate's
    # 2,049, which sleep_jax does not use.
    (OURO_1_4B, {}, 1_434_652_673 - 2_049),
  ],
)
def test_real_configs_match_the_published_tensors(hf, options, total):
  port, model_config, shapes = abstract_parameters(hf, **options)
  published = published_tensors(hf)
  places = pretrained.tensor_places(port, hf, model_config)
  pretrained.check_tensors(port, places, published, shapes)  # every tensor, every shape
  used = {(path, layer) for path, layer, _ in places.values()}
  for path, shape in shapes.items():  # every parameter (and stacked layer) filled exactly once
    layers = [None] if path in ("embedding", "final_norm/scale", "head/kernel") else range(shape[0])
    assert all((path, layer) in used for layer in layers), path
  assert sum(int(np.prod(s)) for s in shapes.values()) == total
  unused = ("model.early_exit_gate.weight", "model.early_exit_gate.bias")
  assert total == sum(int(np.prod(s)) for n, s in published.items() if n not in unused)


def test_real_configs_map_to_the_papers_architectures():
  _, jet, _ = abstract_parameters(JET_NEMOTRON_2B, loop_start=7, loop_stop=21)
  assert jet.pattern == "J" * 14 + "A" + "J" * 4 + "ASS" + "J" * 6
  assert (jet.sliding_window, jet.fast_state_shape, jet.fast_norm_eps) == (
    1152,
    (12, 96, 256),
    1e-5,
  )
  assert [s[0] for s in jet.segments] == ["prelude", "loop", "coda"]
  _, ouro, shapes = abstract_parameters(OURO_1_4B, insert_jet_layers=6)
  assert ouro.pattern == "AAAAj" * 6 and (ouro.loop_repeats, ouro.loop_norm) == (4, True)
  assert shapes["blocks/4/mixer/q/kernel"][0] == 6  # the inserted layers: one unit position


def write_checkpoint(path, hf: dict, seed=0, dtype=np.float32, shards=1):
  """Random tensors in the published layout, as safetensors (optionally sharded, bfloat16)."""
  from safetensors.numpy import save_file

  rng = np.random.default_rng(seed)
  tensors = {
    n: (0.3 * rng.standard_normal(s)).astype(np.float32) for n, s in published_tensors(hf).items()
  }
  names = sorted(tensors)
  if dtype != np.float32:
    import ml_dtypes

    tensors = {n: t.astype(ml_dtypes.bfloat16) for n, t in tensors.items()}
  weight_map = {}
  for shard in range(shards):
    file = f"model-{shard + 1:05d}-of-{shards:05d}.safetensors"
    part = {n: tensors[n] for n in names[shard::shards]}
    save_file(part, str(path / file))
    weight_map |= {n: file for n in part}
  if shards > 1:
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
  (path / "config.json").write_text(json.dumps(hf))
  return tensors


TINY_JET = JET_NEMOTRON_2B | {
  "hidden_size": 16,
  "num_hidden_layers": 6,
  "num_attention_heads": 4,
  "num_key_value_heads": 2,
  "intermediate_size": 24,
  "vocab_size": 11,
  "tie_word_embeddings": True,
  "layer_types": ["jet", "jet", "attn", "jet", "swa", "jet"],
  "efficient_attention_config": {
    "jet": {
      "num_heads": 2,
      "head_dim": 4,
      "expand_v": 2.0,
      "conv_size": 4,
      "dconv_generator_reduction": 8,
      "norm_eps": "1e-5",
    },
    "swa": {"window_size": 3},
  },
}
TINY_OURO = OURO_1_4B | {
  "hidden_size": 16,
  "num_hidden_layers": 4,
  "num_attention_heads": 2,
  "num_key_value_heads": 2,
  "head_dim": 8,
  "intermediate_size": 24,
  "vocab_size": 11,
  "total_ut_steps": 2,
}


@pytest.mark.parametrize(
  "hf, options, dtype, shards",
  [
    (TINY_JET, dict(loop_start=1, loop_stop=5), "bfloat16", 2),
    (TINY_OURO, {}, "float32", 1),
    (TINY_OURO, dict(insert_jet_layers=2), "float32", 1),
  ],
)
def test_tiny_checkpoints_in_the_published_layout_round_trip(tmp_path, hf, options, dtype, shards):
  written = write_checkpoint(
    tmp_path, hf, dtype=np.float32 if dtype == "float32" else dtype, shards=shards
  )
  model, model_config = pretrained.load(str(tmp_path), **options)
  exported = pretrained.export(model, hf)
  assert set(exported) == set(written) - {
    "model.early_exit_gate.weight",
    "model.early_exit_gate.bias",
  }
  for name, value in exported.items():
    np.testing.assert_array_equal(value, np.asarray(written[name], np.float32), err_msg=name)
  tokens = np.random.default_rng(1).integers(0, 11, (2, 9))
  logits = sleep_jax.apply(model, tokens, sleep_config=dict(eviction="none", context_len=0))
  assert np.isfinite(np.asarray(logits)).all()


def ouro_by_hand(tensors: dict, hf: dict, tokens):
  """Ouro's forward from its tensors (numpy): sandwich-norm layers looped total_ut_steps times,
  the final norm after every loop, the untied head on the last loop's state."""
  t = {n: np.asarray(v, np.float64) for n, v in tensors.items()}
  heads, dh, eps = hf["num_attention_heads"], hf["head_dim"], hf["rms_norm_eps"]
  norm = lambda x, w: x / np.sqrt((x**2).mean(-1, keepdims=True) + eps) * w
  silu = lambda x: x / (1 + np.exp(-x))
  b, n = tokens.shape
  positions = jnp.arange(n)
  h = t["model.embed_tokens.weight"][tokens]
  for _ in range(hf["total_ut_steps"]):
    for i in range(hf["num_hidden_layers"]):
      w = lambda name, i=i: t[f"model.layers.{i}.{name}"]
      a = norm(h, w("input_layernorm.weight"))
      split = lambda y: y.reshape(b, n, heads, dh)
      rope = lambda y: np.asarray(
        rotary(jnp.asarray(y, jnp.float32), positions, hf["rope_theta"]), np.float64
      )
      q, k = (
        rope(split(a @ w("self_attn.q_proj.weight").T)),
        rope(split(a @ w("self_attn.k_proj.weight").T)),
      )
      v = split(a @ w("self_attn.v_proj.weight").T)
      scores = np.einsum("bihd,bjhd->bhij", q, k) / np.sqrt(dh)
      scores = np.where(np.tril(np.ones((n, n), bool)), scores, -np.inf)
      p = np.exp(scores - scores.max(-1, keepdims=True))
      p /= p.sum(-1, keepdims=True)
      attn = np.einsum("bhij,bjhd->bihd", p, v).reshape(b, n, -1) @ w("self_attn.o_proj.weight").T
      h = h + norm(attn, w("input_layernorm_2.weight"))
      m = norm(h, w("post_attention_layernorm.weight"))
      m = (silu(m @ w("mlp.gate_proj.weight").T) * (m @ w("mlp.up_proj.weight").T)) @ w(
        "mlp.down_proj.weight"
      ).T
      h = h + norm(m, w("post_attention_layernorm_2.weight"))
    h = norm(h, t["model.norm.weight"])
  return h @ t["lm_head.weight"].T


def test_tiny_ouro_gives_its_forward_and_inserted_jet_layers_start_as_identity(tmp_path):
  written = write_checkpoint(tmp_path, TINY_OURO, seed=3)
  tokens = np.random.default_rng(2).integers(0, 11, (2, 7))
  full = dict(eviction="none", context_len=0)
  model, _ = pretrained.load(str(tmp_path))
  expected = ouro_by_hand(written, TINY_OURO, tokens)
  np.testing.assert_allclose(
    sleep_jax.apply(model, tokens, sleep_config=full), expected, rtol=1e-4, atol=1e-4
  )
  with_jet, config = pretrained.load(str(tmp_path), insert_jet_layers=2, seed=5)
  assert config.pattern == "AAjAAj"
  np.testing.assert_allclose(
    sleep_jax.apply(with_jet, tokens, sleep_config=full), expected, rtol=1e-4, atol=1e-4
  )


def test_mismatched_checkpoints_name_the_tensor(tmp_path):
  written = write_checkpoint(tmp_path, TINY_JET)
  from safetensors.numpy import save_file

  bad = dict(written)
  bad["model.layers.0.self_attn.A_log"] = np.zeros(3, np.float32)
  for f in tmp_path.glob("*.safetensors"):
    f.unlink()
  save_file(bad, str(tmp_path / "model.safetensors"))
  with pytest.raises(ValueError, match=r"model.layers.0.self_attn.A_log: checkpoint shape \(3,\)"):
    pretrained.load(str(tmp_path))
  with pytest.raises(ValueError, match="insert_jet_layers=5 must divide"):
    pretrained.port_for(OURO_1_4B).model_config(OURO_1_4B, insert_jet_layers=5)
