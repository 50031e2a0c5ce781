"""`import sleep_jax` reaches every public module as an attribute, and loads nothing heavy."""

import os
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
