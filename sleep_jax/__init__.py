"""sleep_jax: hybrid attention + Gated-DeltaNet language models that sleep.

Public entry points (DESIGN.md section 3):
  build_model(model_config, *, seed) -> model
  apply(model, tokens, *, sleep_config) -> logits [B, T, vocab]
  stream_init(model, batch_size, *, sleep_config) -> state
  stream_feed(model, state, tokens, *, sleep_config) -> (logits [B, t, vocab], state)
  generate(model, prompts, *, sleep_config, max_new_tokens, temperature, top_k, top_p,
           stop_tokens, seed) -> tokens [B, max_new_tokens]
  ops.gated_delta_rule(q, k, v, g, beta, *, scale, initial_state, impl) -> (o, final_state)

Importing the package has no side effects and loads neither JAX nor Flax: the entry points
above are imported on first use, so configs and reports can import `sleep_jax.data`,
`sleep_jax.rundir` or `sleep_jax.experiments` cheaply. On a CPU with jaxlib 0.10, call
`sleep_jax.xla_flags.apply_defaults()` before the first JAX computation.
"""

import importlib

_LAZY = {
  "build_model": "sleep_jax.model.lm",
  "apply": "sleep_jax.sleep.consolidate",
  "stream_init": "sleep_jax.sleep.stream",
  "stream_feed": "sleep_jax.sleep.stream",
  "generate": "sleep_jax.sleep.generate",
}
_SUBMODULES = (
  "ops",
  "model",
  "sleep",
  "data",
  "parallel",
  "train",
  "experiments",
  "rundir",
  "xla_flags",
  "pretrained",
)

__all__ = ["build_model", "apply", "stream_init", "stream_feed", "generate", "ops"]


def __getattr__(name: str):
  if name in _LAZY:
    return getattr(importlib.import_module(_LAZY[name]), name)
  if name in _SUBMODULES:
    return importlib.import_module(f"sleep_jax.{name}")
  raise AttributeError(f"module 'sleep_jax' has no attribute {name!r}")
