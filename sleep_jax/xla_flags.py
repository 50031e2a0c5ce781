"""XLA flags the entry points set before JAX starts its backend (importing sleep_jax sets none).

`apply_workarounds()` guards against an XLA CPU crash in jaxlib 0.10.x: its CPU backend hands
some transposes to experimental YNNPACK fusions, which segfault (slinky::fuse_contiguous_dims
inside ynn make_transpose_impl) in the backward pass of the chunked gated delta rule at batch
>= ~64. Disabling those fusions costs nothing measurable here. The flag exists only in some
jaxlib releases and XLA aborts on unknown flags, so it is set only for the release line where
the crash was seen.

launch/*.py, bench/*.py and tests/conftest.py call it first thing; a program that uses the
library directly on a CPU with jaxlib 0.10 should too:

  from sleep_jax import xla_flags
  xla_flags.apply_workarounds()  # before the first JAX computation
"""

import os

_YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type="


def apply_workarounds() -> None:
  """Adds the crash guard to XLA_FLAGS (no effect once a JAX backend has started)."""
  try:
    import jaxlib

    version = jaxlib.__version__
  except (ImportError, AttributeError):
    return
  flags = os.environ.get("XLA_FLAGS", "")
  if version.startswith("0.10.") and "ynn_fusion_type" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} {_YNN_FLAG}".strip()
