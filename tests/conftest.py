"""Test setup: 8 fake CPU devices, set before jax is imported anywhere."""

import os
import sys
import tempfile

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests build the same tiny programs again (resume, parity, subprocess runs): a persistent
# compilation cache shared by the test processes compiles each distinct program once.
os.environ.setdefault(
  "JAX_COMPILATION_CACHE_DIR",
  os.path.join(tempfile.gettempdir(), "sleep_jax_test_compilation_cache"),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")

# configs/ and launch/ are plain folders next to the package, imported by path in tests.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)

from sleep_jax import xla_flags  # noqa: E402  (imports no JAX)

xla_flags.apply_defaults()  # what every entry point does before JAX starts
