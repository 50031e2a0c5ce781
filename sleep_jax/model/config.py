"""Typed, validated model configuration (the ConfigDict becomes a frozen dataclass here)."""

from __future__ import annotations

import dataclasses

from sleep_jax.typed_config import dataclass_from_section

ATTENTION = "A"
GATED_DELTA = "G"
BLOCK_KINDS = {ATTENTION: "attention block", GATED_DELTA: "gated-delta (fast-weight) block"}
FAST_WEIGHT_IMPLS = ("reference", "chunked", "pallas", "pallas_staged", "auto")
DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of the hybrid LM. See configs/rule110.py for the meaning of every field."""

  vocab_size: int
  pattern: str = "AGAG"
  d_model: int = 256
  num_heads: int = 4
  head_dim: int = 64
  mlp_dim: int = 1024
  conv_width: int = 4
  rope_base: float = 10_000.0
  fast_weight_impl: str = "auto"
  dtype: str = "float32"
  # Pretrained architectures (third_party/): grouped-query attention (None: as many key/value
  # heads as query heads), biases on the attention's q/k/v projections, the output head tied
  # to the embedding, and the norms' epsilon.
  num_kv_heads: int | None = None
  qkv_bias: bool = False
  tie_embeddings: bool = False
  norm_eps: float = 1e-6

  def __post_init__(self):
    unknown = sorted(set(self.pattern) - set(BLOCK_KINDS))
    if not self.pattern or unknown:
      raise ValueError(
        f"model.pattern={self.pattern!r}: every letter must be one of "
        f"{', '.join(f'{k!r} ({v})' for k, v in BLOCK_KINDS.items())}; got unknown {unknown}"
      )
    for name in ("vocab_size", "d_model", "num_heads", "head_dim", "mlp_dim", "conv_width"):
      if getattr(self, name) < 1:
        raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
    if self.num_kv_heads is not None and (
      self.num_kv_heads < 1 or self.num_heads % self.num_kv_heads
    ):
      raise ValueError(
        f"model.num_kv_heads={self.num_kv_heads} must divide model.num_heads={self.num_heads}"
      )
    if self.head_dim % 2:
      raise ValueError(f"model.head_dim must be even for rotary positions, got {self.head_dim}")
    if self.fast_weight_impl not in FAST_WEIGHT_IMPLS:
      raise ValueError(
        f"model.fast_weight_impl={self.fast_weight_impl!r} not in {FAST_WEIGHT_IMPLS}"
      )
    if self.dtype not in DTYPES:
      raise ValueError(f"model.dtype={self.dtype!r} not in {DTYPES}")

  @property
  def kv_heads(self) -> int:
    """Key/value heads of the attention blocks."""
    return self.num_kv_heads or self.num_heads

  @property
  def num_fast_weight_layers(self) -> int:
    return self.pattern.count(GATED_DELTA)

  @classmethod
  def from_config(cls, config) -> ModelConfig:
    """Builds from `config.model` as it comes out of a config file (unknown keys are an error)."""
    return dataclass_from_section(cls, config, "model")
