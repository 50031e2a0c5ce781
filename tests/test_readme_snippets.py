"""Every README snippet is run or checked, so that one that breaks fails the suite.

Python blocks run as written, each in a fresh namespace of tiny stand-ins for the names they
take from their surroundings (a Rule 110 "tiny" config and its tokens, small checkpoints this
test writes for the paths, small arrays for the op). A new block that uses a name without a
stand-in fails with a NameError: give it one here.

Shell commands are checked, not run: every one trains, compiles for a TPU or GPU, needs an
accelerator or a run directory, or takes minutes (they run in the integration, compile and
accelerator steps instead). What can drift without running is checked: the script or module
exists, it defines every `--flag` the command gives, the `--config=file:variant` loads, and every
`--config.a.b=...` override names a field of that config.
"""

import ast
import json
import os
import pathlib
import re
import shlex

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sleep_jax
from configs import rule110 as rule110_configs
from sleep_jax.data import rule110

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = pathlib.Path(REPO, "README.md").read_text()
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)
SHELL_BLOCKS = re.findall(r"```bash\n(.*?)```", README, re.S)
PLACEHOLDER_PATHS = ("/path/to/hf_checkpoint",)  # literal paths a snippet names

TINY_QWEN2 = {  # 22 layers: the README loops layers 7..21
  "architectures": ["Qwen2ForCausalLM"],
  "hidden_size": 16,
  "num_hidden_layers": 22,
  "num_attention_heads": 2,
  "num_key_value_heads": 1,
  "intermediate_size": 24,
  "vocab_size": 11,
  "tie_word_embeddings": True,
}
TINY_OURO = {  # 6 layers: the README inserts 6 Jet layers
  "architectures": ["OuroForCausalLM"],
  "hidden_size": 16,
  "num_hidden_layers": 6,
  "num_attention_heads": 2,
  "num_key_value_heads": 2,
  "head_dim": 8,
  "intermediate_size": 24,
  "vocab_size": 11,
  "total_ut_steps": 2,
}


def write_checkpoint(directory, hf: dict) -> str:
  """A random model of the port's layout written as config.json + safetensors."""
  from safetensors.numpy import save_file

  from sleep_jax import pretrained
  from sleep_jax.model.config import ModelConfig

  port = pretrained.port_for(hf)
  model = sleep_jax.build_model(ModelConfig(**port.model_config(hf)), seed=0)
  os.makedirs(directory, exist_ok=True)
  save_file(pretrained.export(model, hf), os.path.join(directory, "model.safetensors"))
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(hf, f)
  return str(directory)


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
  root = tmp_path_factory.mktemp("readme")
  config = rule110_configs.get_config("tiny")
  examples = rule110.generate(np.random.default_rng(0), 2, 2)
  k1, k2, k3, k4, k5 = jax.random.split(jax.random.key(0), 5)
  b, t, h, d = 1, 8, 2, 4
  names = dict(
    sleep_jax=sleep_jax,
    config=config,
    tokens=examples["tokens"],
    model=sleep_jax.build_model(config.model, seed=0),
    batch_size=2,
    tokens_bt=examples["tokens"][:, :30],
    prompt=examples["tokens"][:, :5],
    q=jax.random.normal(k1, (b, t, h, d)),
    k=jax.random.normal(k2, (b, t, h, d)) / 2,
    v=jax.random.normal(k3, (b, t, h, d)),
    g=-jax.nn.softplus(jax.random.normal(k4, (b, t, h))),
    beta=jax.nn.sigmoid(jax.random.normal(k5, (b, t, h))),
    s0=jnp.zeros((b, h, d, d)),
    path=write_checkpoint(root / "qwen2", TINY_QWEN2),
    ouro_path=write_checkpoint(root / "ouro", TINY_OURO),
  )
  return names


def test_the_readme_has_the_snippets_this_test_knows():
  assert len(PYTHON_BLOCKS) >= 3 and len(SHELL_BLOCKS) >= 5
  assert any("sleep_jax.pretrained.load" in block for block in PYTHON_BLOCKS)


@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_python_snippet_runs(stand_ins, index):
  code = PYTHON_BLOCKS[index]
  for placeholder in PLACEHOLDER_PATHS:
    code = code.replace(placeholder, stand_ins["path"])
  namespace = dict(stand_ins)
  exec(compile(code, f"README.md python block {index}", "exec"), namespace)


def shell_commands() -> list[list[str]]:
  """Every `python ...` command of the README's shell blocks, as argument lists."""
  commands = []
  for block in SHELL_BLOCKS:
    joined = re.sub(r"\\\n\s*", " ", block)
    for line in joined.splitlines():
      line = line.split("#", 1)[0].strip().rstrip("&").strip()
      for part in line.split("&&"):
        words = shlex.split(part)
        while words and "=" in words[0] and not words[0].startswith("-"):
          words = words[1:]  # VAR=value before the command
        if words[:1] == ["python"] and words[1:3] != ["-m", "pip"]:
          commands.append(words[1:])
  return commands


def defined_flags(source: str) -> set[str]:
  """The flags a script defines (absl DEFINE_*, argparse add_argument, config_flags)."""
  absl = re.findall(r"DEFINE_\w+\(\s*\"(\w+)\"", source)
  argparse = re.findall(r"add_argument\(\s*\"--(\w+)\"", source)
  return set(absl) | set(argparse)


def config_fields(config, dotted: str) -> bool:
  node = config
  for name in dotted.split("."):
    if name not in node:
      return False
    node = node[name]
  return True


def load_config(spec: str):
  file, _, variant = spec.partition(":")
  namespace = {}
  source = pathlib.Path(REPO, file).read_text()
  exec(compile(source, file, "exec"), namespace)
  get_config = namespace.get("get_config")
  if get_config is None:
    return None
  return get_config(variant) if variant else get_config()


COMMANDS = shell_commands()


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c)[:60])
def test_shell_command_names_what_exists(command):
  if command[0] == "-m":
    module = command[1]
    if module == "pytest":
      return
    assert os.path.exists(os.path.join(REPO, *module.split(".")) + ".py"), module
    return
  script = os.path.join(REPO, command[0])
  assert os.path.isfile(script), f"README runs {command[0]}, which does not exist"
  source = pathlib.Path(script).read_text()
  ast.parse(source)
  flags = defined_flags(source)
  config = None
  for word in command[1:]:
    if not word.startswith("--"):
      continue
    name, _, value = word[2:].partition("=")
    if name == "config" and value.endswith(".py") or ".py:" in value:
      config = load_config(value.replace("<file[:variant]>", ""))
    elif name.startswith("config.") and config is not None:
      assert config_fields(config, name[len("config.") :]), f"{word}: no such config field"
      continue
    elif name.startswith("config."):
      continue  # an override of a config given elsewhere in the command
    assert name in flags or name == "config", f"{command[0]} defines no --{name}"


def test_the_flag_check_would_see_a_missing_flag():
  source = pathlib.Path(REPO, "launch", "generate.py").read_text()
  assert "prompt_text" in defined_flags(source) and "no_such_flag" not in defined_flags(source)
  assert any(c[0] == "launch/generate.py" for c in COMMANDS)
