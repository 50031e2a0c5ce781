"""XLA flags the entry points set before JAX starts its backend (importing sleep_jax sets none).

`apply_workarounds()` guards against an XLA CPU crash in jaxlib 0.10.x: its CPU backend hands
some transposes to experimental YNNPACK fusions, which segfault (slinky::fuse_contiguous_dims
inside ynn make_transpose_impl) in the backward pass of the chunked gated delta rule at batch
>= ~64. Disabling those fusions costs nothing measurable here. The flag exists only in some
jaxlib releases and XLA aborts on unknown flags, so it is set only for the release line where
the crash was seen.

It also runs XLA:CPU's Eigen kernels single-threaded (`--xla_cpu_multi_thread_eigen=false`)
unless the caller's XLA_FLAGS say otherwise. The CPU runtime still runs independent kernels on
separate threads; what goes is the splitting of every small kernel across threads, which at
this project's CPU widths costs more than it gains (bench/train_step.py, 2 cores, sweep
setting, N=1: 274 -> 232 ms per step; cpu setting: 1634 -> 1432 ms). GPU and TPU programs
are unaffected.

launch/*.py, bench/*.py and tests/conftest.py call it first thing; a program that uses the
library directly on a CPU with jaxlib 0.10 should too:

  from sleep_jax import xla_flags
  xla_flags.apply_workarounds()  # before the first JAX computation
"""

import os

_YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type="
_EIGEN_THREADS_FLAG = "--xla_cpu_multi_thread_eigen=false"


def apply_workarounds() -> None:
  """Adds the crash guard and the CPU threading default to XLA_FLAGS (before JAX starts)."""
  flags = os.environ.get("XLA_FLAGS", "")
  if "multi_thread_eigen" not in flags:
    flags = f"{flags} {_EIGEN_THREADS_FLAG}"
  try:
    import jaxlib

    version = jaxlib.__version__
  except (ImportError, AttributeError):
    version = ""
  if version.startswith("0.10.") and "ynn_fusion_type" not in flags:
    flags = f"{flags} {_YNN_FLAG}"
  os.environ["XLA_FLAGS"] = flags.strip()
