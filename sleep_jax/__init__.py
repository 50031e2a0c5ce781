"""sleep_jax: hybrid attention + Gated-DeltaNet language models that sleep.

Public entry points (DESIGN.md section 3):
  build_model(model_config, *, seed) -> model
  apply(model, tokens, *, sleep_config) -> logits [B, T, vocab]
  ops.gated_delta_rule(q, k, v, g, beta, *, scale, initial_state, impl) -> (o, final_state)
"""

from sleep_jax import _xla_cpu

_xla_cpu.disable_ynn_fusions()  # before any jax computation starts the CPU backend

from sleep_jax.model.lm import build_model  # noqa: E402
from sleep_jax.sleep.consolidate import apply  # noqa: E402

__all__ = ["build_model", "apply"]
