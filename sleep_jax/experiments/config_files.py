"""Config files and dotted-key overrides, as `--config=path.py:variant --config.a.b=v` reads them.

Used by sweeps (expanding arms into configs), job building (overrides back into flags) and
scripts that load a config by path. Imports neither JAX nor the trainer.
"""

from __future__ import annotations

import copy
import importlib.util
import os
from typing import Any

from ml_collections import config_dict

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_config(spec: str) -> config_dict.ConfigDict:
  """Loads an experiment config from "path.py[:variant]" the way `--config=` does.

  Args:
    spec: a config file path, optionally followed by ":variant" (passed to get_config).

  Returns:
    The ConfigDict that the file's get_config returns.
  """
  path, _, variant = spec.partition(":")
  if not os.path.isabs(path) and not os.path.exists(path):
    path = os.path.join(REPO_ROOT, path)  # so sweeps work from any cwd
  if not os.path.exists(path):
    raise FileNotFoundError(
      f"config file {spec.partition(':')[0]!r} not found (cwd or {REPO_ROOT})"
    )
  module_name = "_sweep_config_" + os.path.splitext(os.path.basename(path))[0]
  module_spec = importlib.util.spec_from_file_location(module_name, path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(variant) if variant else module.get_config()


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  """Nested dict / ConfigDict -> {dotted key: leaf value}."""
  if isinstance(tree, config_dict.ConfigDict):
    tree = tree.to_dict()
  out = {}
  for key, value in tree.items():
    if isinstance(value, (dict, config_dict.ConfigDict)):
      out.update(flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def apply_overrides(
  config: config_dict.ConfigDict, overrides: dict[str, Any]
) -> config_dict.ConfigDict:
  """Returns a locked copy of `config` with dotted-key overrides applied.

  Args:
    config: the base experiment config.
    overrides: {"sleep.passes": 2, ...}; every key must already exist in `config`, so a typo
      in a sweep config fails at expansion time instead of silently training the wrong arm.

  Returns:
    A new, locked ConfigDict.
  """
  config = copy.deepcopy(config)  # keeps the field types, so a wrong-typed value is refused
  config.unlock()
  known = set(flatten(config))
  for key, value in overrides.items():
    if key not in known:
      raise KeyError(f"override {key}={value!r}: the base config has no field {key!r}")
    parent, _, field = key.rpartition(".")
    section = config
    for part in parent.split(".") if parent else ():
      section = section[part]
    section[field] = value
  config.lock()
  return config


def flag_value(value: Any) -> str:
  """Formats a config value the way config_flags parses it back (tuples as "(a, b)")."""
  if isinstance(value, (tuple, list)):
    inner = ", ".join(flag_value(v) for v in value)
    return f"({inner},)" if len(value) == 1 else f"({inner})"
  return str(value)
