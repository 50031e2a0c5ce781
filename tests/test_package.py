"""`import sleep_jax` reaches every public module as an attribute, and loads nothing heavy."""

import ast
import os
import pathlib
import pkgutil
import subprocess
import sys

import sleep_jax

# Modules that only entry points or one tier use internally need not be attributes.
INTERNAL = {"console", "typed_config", "paths"}


def test_every_public_module_is_an_attribute_of_the_package():
  names = {m.name for m in pkgutil.iter_modules(sleep_jax.__path__)} - INTERNAL
  assert "pretrained" in names
  for name in sorted(names):
    assert getattr(sleep_jax, name).__name__ == f"sleep_jax.{name}"


def test_importing_the_package_loads_neither_jax_nor_flax():
  code = "import sys, sleep_jax; print(sorted(m for m in ('jax', 'flax') if m in sys.modules))"
  env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(sleep_jax.__file__)))
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == "[]"


TIERS = ("ops", "model", "sleep", "data", "parallel", "train", "experiments")  # lowest first


def _imported_modules(path):
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      yield from (alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      yield node.module
      if node.module == "sleep_jax":  # from sleep_jax import sleep
        yield from (f"sleep_jax.{alias.name}" for alias in node.names)


def test_every_import_arrow_points_down_the_tiers():
  root = pathlib.Path(sleep_jax.__file__).parent
  upward = []
  for path in sorted(root.rglob("*.py")):
    tier = path.relative_to(root).parts[0]
    if tier not in TIERS:
      continue
    for module in _imported_modules(path):
      parts = module.split(".")
      if parts[0] == "sleep_jax" and len(parts) > 1 and parts[1] in TIERS:
        if TIERS.index(parts[1]) > TIERS.index(tier):
          upward.append(f"{path.relative_to(root)} imports {module}")
  assert not upward, upward
