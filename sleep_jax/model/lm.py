"""The hybrid language model: Embed -> blocks per `pattern` -> final RMSNorm -> output head.

The model exposes the three pieces the sleep schedule composes (it never runs a whole sequence
itself): `embed` a chunk, run one `stack_pass` of all blocks over it while threading the
fast-weight state, and turn features into `logits`. The fast state is a tuple with one
[B,H,K,V] float32 matrix per gated-delta block, in pattern order (`zero_fast_state`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sleep_jax.model.blocks import AttentionBlock, GatedDeltaBlock
from sleep_jax.model.config import ATTENTION, ModelConfig
from sleep_jax.model.layers import Dense, RMSNorm, param
from sleep_jax.model.layers import ADAMW

FastState = tuple[jax.Array, ...]


def zero_fast_state(cfg: ModelConfig, batch_size: int) -> FastState:
  """S = 0 for every fast-weight layer: the state at the start of every sequence."""
  shape = (batch_size, cfg.num_heads, cfg.head_dim, cfg.head_dim)
  return tuple(jnp.zeros(shape, jnp.float32) for _ in range(cfg.num_fast_weight_layers))


class HybridLM(nnx.Module):
  """Interleaved attention ("A") and gated-delta ("G") blocks, e.g. pattern "AGAG"."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    embedding = jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.d_model))
    self.embedding = param(embedding, ("vocab", "embed"))
    self.blocks = nnx.List([
        AttentionBlock(cfg, rngs=rngs) if kind == ATTENTION else GatedDeltaBlock(cfg, rngs=rngs)
        for kind in cfg.pattern
    ])
    self.final_norm = RMSNorm(cfg.d_model)
    self.head = Dense(cfg.d_model, cfg.vocab_size, logical_axes=("embed", "vocab"), optimizer=ADAMW,
                      rngs=rngs)

  def embed(self, tokens_bt: jax.Array) -> jax.Array:
    """Token ids [B,T] -> features [B,T,D] in the compute dtype."""
    return jnp.take(self.embedding[...], tokens_bt, axis=0).astype(self.cfg.dtype)

  def stack_pass(self, h_btd: jax.Array, fast_state: FastState) -> tuple[jax.Array, FastState]:
    """One pass of every block over a chunk: (h, S) -> (h', S')."""
    new_state, layer = [], 0
    for block in self.blocks:
      if isinstance(block, GatedDeltaBlock):
        h_btd, s = block(h_btd, fast_state[layer])
        new_state.append(s)
        layer += 1
      else:
        h_btd, _ = block(h_btd)
    return h_btd, tuple(new_state)

  def logits(self, h_btd: jax.Array) -> jax.Array:
    """Features [B,T,D] -> float32 logits [B,T,vocab]."""
    return self.head(self.final_norm(h_btd)).astype(jnp.float32)


def build_model(model_config, *, seed: int) -> HybridLM:
  """Builds a freshly initialised `HybridLM` from `config.model` (a ConfigDict or ModelConfig)."""
  return HybridLM(ModelConfig.from_config(model_config), rngs=nnx.Rngs(params=seed))
