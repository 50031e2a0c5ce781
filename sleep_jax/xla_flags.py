"""XLA flags the entry points set before JAX starts its backend (importing sleep_jax sets none).

`apply_defaults()` adds two XLA:CPU flags to XLA_FLAGS, only for the jaxlib release line they
were measured on (0.10.x: XLA aborts on a flag its release does not know, and the backend's
behaviour behind them changes between releases; other releases keep XLA's own defaults):

  * `--xla_cpu_experimental_ynn_fusion_type=dot`: of the experimental YNNPACK fusions, dots
    only. Its transpose fusions segfault (slinky::fuse_contiguous_dims inside ynn
    make_transpose_impl) in the backward pass of the chunked gated delta rule at batch >= ~64,
    so they stay off; its dots run that rule's many small batched products (per batch and
    head, 24 x 32 operands in the CPU sweeps) faster than XLA's own dot.
  * `--xla_cpu_multi_thread_eigen=false`, only when the process has one CPU device (neither
    --xla_force_host_platform_device_count nor JAX_NUM_CPU_DEVICES asks for more): the step's
    ~4,000 small kernels then run without handing each one's work to the thread pool.
    With 8 host devices (`--xla_force_host_platform_device_count=8`, the tests) the same flag
    made the step slower, so such processes keep XLA's default.
  Together: the CPU sweep step in 0.78x the time (bench/train_step.py, whose docstring has the
  numbers).

A flag the caller's XLA_FLAGS already names is left as the caller set it (e.g.
`XLA_FLAGS=--xla_cpu_multi_thread_eigen=true` brings the thread pool back).

launch/*.py, bench/train_step.py, bench/param_movement.py and tests/conftest.py call it first;
a program that uses the library directly on a CPU with jaxlib 0.10 should too:

  from sleep_jax import xla_flags
  xla_flags.apply_defaults()  # before the first JAX computation
"""

import os
import re

YNN_FUSIONS = "--xla_cpu_experimental_ynn_fusion_type=dot"
ONE_THREAD_KERNELS = "--xla_cpu_multi_thread_eigen=false"
MEASURED_JAXLIB = "0.10."


def _flag_name(flag: str) -> str:
  return flag.split("=", 1)[0]


def _host_devices(flags: str, environ) -> int:
  """The CPU device count a process with these XLA_FLAGS and environment will have."""
  forced = re.findall(r"--xla_force_host_platform_device_count=(\d+)", flags)
  count = int(forced[-1]) if forced else 1
  return max(count, int(environ.get("JAX_NUM_CPU_DEVICES", "1") or 1))


def default_flags(flags: str, jaxlib_version: str, environ=os.environ) -> str:
  """`flags` (an XLA_FLAGS value) with the project's defaults added where it names none."""
  if not jaxlib_version.startswith(MEASURED_JAXLIB):
    return flags
  wanted = [YNN_FUSIONS]
  if _host_devices(flags, environ) == 1:
    wanted.append(ONE_THREAD_KERNELS)
  added = [flag for flag in wanted if _flag_name(flag) not in flags]
  return " ".join([flags, *added]).strip()


def apply_defaults() -> None:
  """Adds the defaults to XLA_FLAGS (no effect once a JAX backend has started)."""
  try:
    import jaxlib

    version = jaxlib.__version__
  except (ImportError, AttributeError):
    return
  flags = os.environ.get("XLA_FLAGS", "")
  wanted = default_flags(flags, version)
  if wanted != flags:  # an unset XLA_FLAGS stays unset when nothing is added
    os.environ["XLA_FLAGS"] = wanted
