"""Typed, validated model configuration (the ConfigDict becomes a frozen dataclass here)."""

from __future__ import annotations

import dataclasses

from sleep_jax.typed_config import dataclass_from_section

ATTENTION = "A"
GATED_DELTA = "G"
SLIDING_ATTENTION = "S"
JET = "J"
BLOCK_KINDS = {
  ATTENTION: "attention block",
  GATED_DELTA: "gated-delta (fast-weight) block",
  SLIDING_ATTENTION: "sliding-window attention block (model.sliding_window)",
  JET: "Jet block (gated delta with an input-generated convolution on V)",
}
ATTENTION_KINDS = (ATTENTION, SLIDING_ATTENTION)
FAST_WEIGHT_KINDS = (GATED_DELTA, JET)


def mixer_kind(letter: str) -> str:
  """The mixer of a pattern letter: a lower-case letter is the same mixer with no MLP."""
  return letter.upper()


def has_mlp(letter: str) -> bool:
  return letter.isupper()


FAST_WEIGHT_IMPLS = ("reference", "chunked", "pallas", "pallas_staged", "auto")
ATTENTION_IMPLS = ("xla", "reference", "pallas", "auto")
DTYPES = ("float32", "bfloat16")


# Fields that choose how the model runs, not what it computes: the same parameters give the
# same function under any of their values, exactly (a resumed run may change these) or up to
# float rounding.
EXACT_EXECUTION_FIELDS = ("remat_blocks", "scan_min_repeats")
EXECUTION_FIELDS = ("dtype", "fast_weight_impl", "attention_impl", *EXACT_EXECUTION_FIELDS)


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
  # Causal attention within a chunk (sleep_jax.ops.causal_attention): "auto" is the fused Triton
  # kernel on GPUs where a window fits it, XLA elsewhere; or "xla", "reference", "pallas".
  attention_impl: str = "auto"
  dtype: str = "float32"
  # Pretrained architectures (third_party/): grouped-query attention (None: as many key/value
  # heads as query heads), biases on the attention's q/k/v projections, the output head tied
  # to the embedding, and the norms' epsilon.
  num_kv_heads: int | None = None
  qkv_bias: bool = False
  tie_embeddings: bool = False
  norm_eps: float = 1e-6
  # Linear RoPE scaling: positions are divided by this factor (1: none).
  rope_scaling: float = 1.0
  # "S" blocks: a query sees keys fewer than this many positions back (itself included).
  sliding_window: int | None = None
  # Sandwich norms (Ouro): the mixer's and the MLP's outputs are normalised before each
  # residual add, x + Norm(Mixer(Norm(x))).
  sandwich_norm: bool = False
  # The fast-weight mixers' heads and key/value widths (None: num_heads and head_dim), the Jet
  # block's kernel-generator reduction, and the epsilon of their output norm (None: norm_eps).
  fast_heads: int | None = None
  fast_key_dim: int | None = None
  fast_value_dim: int | None = None
  dconv_reduction: int = 8
  fast_norm_eps: float | None = None
  # The loop range: blocks [loop_start, loop_stop) are the ones a sleep pass repeats; the
  # prelude before them and the coda after them run once per chunk. One pass of the loop
  # applies its blocks loop_repeats times (Ouro: 4), each time followed by the final norm
  # when loop_norm (Ouro feeds the normalised state to its next loop; the output head then
  # reads it without another norm).
  loop_start: int = 0
  loop_stop: int | None = None
  loop_repeats: int = 1
  loop_norm: bool = False
  # Recompute every block's activations in the backward pass (`jax.checkpoint` per block): a
  # segment keeps one block's activations live, plus every block's input, instead of all of
  # them, for one more forward. Same values; what a billion-parameter model needs to fit.
  remat_blocks: bool = False
  # A segment whose unit repeats at least this many times is applied by `lax.scan` (compile
  # time flat in depth); fewer repetitions run unrolled, which is a third fewer kernel
  # launches and faster on the CPU for the paper's two-repetition stacks (bench/train_step.py).
  scan_min_repeats: int = 3
  # A halting unit (sleep.halt="learned"): one linear read-out of a sleep pass's features that
  # gives each row its probability of stopping after that pass (sleep_jax.sleep.consolidate).
  halting_unit: bool = False

  def __post_init__(self):
    unknown = sorted(set(self.pattern.upper()) - set(BLOCK_KINDS))
    if not self.pattern or unknown:
      raise ValueError(
        f"model.pattern={self.pattern!r}: every letter must be one of "
        f"{', '.join(f'{k!r} ({v})' for k, v in BLOCK_KINDS.items())} (lower case: the same "
        f"block without its MLP); got unknown {unknown}"
      )
    for name in ("vocab_size", "d_model", "num_heads", "head_dim", "mlp_dim", "conv_width"):
      if getattr(self, name) < 1:
        raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
    for name in ("fast_heads", "fast_key_dim", "fast_value_dim", "sliding_window"):
      if getattr(self, name) is not None and getattr(self, name) < 1:
        raise ValueError(f"model.{name} must be >= 1 or None, got {getattr(self, name)}")
    if SLIDING_ATTENTION in self.pattern.upper() and self.sliding_window is None:
      raise ValueError(f"model.pattern={self.pattern!r} has 'S' blocks: set model.sliding_window")
    if (
      self.rope_scaling <= 0
      or self.dconv_reduction < 1
      or self.loop_repeats < 1
      or self.scan_min_repeats < 1
    ):
      raise ValueError(
        "model.rope_scaling must be > 0, model.dconv_reduction, model.loop_repeats and "
        "model.scan_min_repeats >= 1"
      )
    stop = self.loop_end
    if not 0 <= self.loop_start < stop <= len(self.pattern):
      raise ValueError(
        f"model.loop_start={self.loop_start}, loop_stop={self.loop_stop}: need "
        f"0 <= loop_start < loop_stop <= {len(self.pattern)} (the pattern's length)"
      )
    if self.loop_norm and stop != len(self.pattern):
      raise ValueError("model.loop_norm needs the loop to end at the last block (no coda)")
    if self.num_kv_heads is not None and (
      self.num_kv_heads < 1 or self.num_heads % self.num_kv_heads
    ):
      raise ValueError(
        f"model.num_kv_heads={self.num_kv_heads} must divide model.num_heads={self.num_heads}"
      )
    if self.head_dim % 2:
      raise ValueError(f"model.head_dim must be even for rotary positions, got {self.head_dim}")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f"model.attention_impl={self.attention_impl!r} not in {ATTENTION_IMPLS}")
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
    return sum(mixer_kind(letter) in FAST_WEIGHT_KINDS for letter in self.pattern)

  @property
  def num_attention_layers(self) -> int:
    return sum(mixer_kind(letter) in ATTENTION_KINDS for letter in self.pattern)

  @property
  def fast_state_shape(self) -> tuple[int, int, int]:
    """(heads, key width, value width) of every fast-weight block's state."""
    return (
      self.fast_heads or self.num_heads,
      self.fast_key_dim or self.head_dim,
      self.fast_value_dim or self.head_dim,
    )

  @property
  def loop_end(self) -> int:
    """The end of the loop range (`loop_stop`, or the whole pattern)."""
    return len(self.pattern) if self.loop_stop is None else self.loop_stop

  @property
  def segments(self) -> tuple[tuple[str, int, int], ...]:
    """(name, first block, end) of the non-empty prelude, loop and coda, in order."""
    stop = self.loop_end
    bounds = (("prelude", 0, self.loop_start), ("loop", self.loop_start, stop))
    bounds += (("coda", stop, len(self.pattern)),)
    return tuple((name, a, b) for name, a, b in bounds if b > a)

  @classmethod
  def from_config(cls, config) -> ModelConfig:
    """Builds from `config.model` as it comes out of a config file (unknown keys are an error)."""
    return dataclass_from_section(cls, config, "model")
