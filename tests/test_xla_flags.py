"""The XLA flags the entry points add: which, when, and never over the caller's own."""

import os
import subprocess
import sys

from sleep_jax import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NO_ENV = {}


def test_one_cpu_device_gets_dot_only_ynn_fusions_and_one_thread_kernels():
  flags = xla_flags.default_flags("", "0.10.2", NO_ENV).split()
  assert flags == [xla_flags.YNN_FUSIONS, xla_flags.ONE_THREAD_KERNELS]


def test_several_host_devices_keep_the_thread_pool():
  eight = "--xla_force_host_platform_device_count=8"
  assert xla_flags.default_flags(eight, "0.10.2", NO_ENV).split() == [eight, xla_flags.YNN_FUSIONS]
  by_env = xla_flags.default_flags("", "0.10.2", {"JAX_NUM_CPU_DEVICES": "4"})
  assert xla_flags.ONE_THREAD_KERNELS not in by_env


def test_the_callers_own_setting_wins():
  mine = "--xla_cpu_multi_thread_eigen=true --xla_cpu_experimental_ynn_fusion_type="
  assert xla_flags.default_flags(mine, "0.10.2", NO_ENV) == mine


def test_other_jaxlib_releases_keep_xla_defaults():
  assert xla_flags.default_flags("--xla_dump_to=/tmp/x", "0.11.0", NO_ENV) == "--xla_dump_to=/tmp/x"


def test_xla_accepts_the_flags_and_fuses_batched_dots_through_ynnpack():
  """The flags parse (XLA aborts on unknown ones) and a batched dot becomes a YNN fusion."""
  code = (
    "from sleep_jax import xla_flags; xla_flags.apply_defaults();"
    "import jax, jax.numpy as jnp, jaxlib;"
    "f = jax.jit(lambda a, b: jnp.einsum('nij,njk->nik', a, b));"
    "a = jnp.ones((64, 24, 32));"
    "hlo = f.lower(a, a.transpose(0, 2, 1)).compile().as_text();"
    "print(jaxlib.__version__, 'ynn_fusion' in hlo, float(f(a, a.transpose(0, 2, 1))[0, 0, 0]))"
  )
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  out = subprocess.run(
    [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env, timeout=120
  )
  assert out.returncode == 0, out.stderr[-2000:]
  version, fused, value = out.stdout.split()
  assert float(value) == 32.0
  if version.startswith(xla_flags.MEASURED_JAXLIB):
    assert fused == "True"
