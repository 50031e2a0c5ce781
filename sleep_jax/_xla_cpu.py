"""A guard against an XLA CPU crash in jaxlib 0.10.x, applied when sleep_jax is imported.

jaxlib 0.10.2's CPU backend hands some transposes to its experimental YNNPACK fusions, which
segfault (slinky::fuse_contiguous_dims inside ynn make_transpose_impl) in the backward pass of
the chunked gated delta rule at batch >= ~64. Disabling those fusions costs nothing measurable
here. The flag only exists in some jaxlib releases and XLA aborts on unknown flags, so it is set
only for the release line where the crash was seen, and only before the backend starts.
"""

import os

_FLAG = "--xla_cpu_experimental_ynn_fusion_type="


def disable_ynn_fusions() -> None:
  try:
    import jaxlib
    version = jaxlib.__version__
  except (ImportError, AttributeError):
    return
  flags = os.environ.get("XLA_FLAGS", "")
  if version.startswith("0.10.") and "ynn_fusion_type" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} {_FLAG}".strip()
