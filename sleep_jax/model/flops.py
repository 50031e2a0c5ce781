"""Model FLOPs of the hybrid LM's blocks over one chunk, for throughput and MFU reporting.

The count of a whole step under the sleep schedule (N passes per slept window, grad_passes)
is `sleep_jax.sleep.flops`, the tier that knows the schedule; this module knows only blocks.

Conventions (the usual ones for "model FLOPs"):
  * Only matmul-like work counts, 2*m*n*k for an [m, k] @ [k, n] product: every Dense
    projection, attention scores and values, the matmuls of the chunked gated delta rule and
    the output head. Elementwise work (norms, rotary, convolutions, activations, softmax,
    decays, the loss) is ignored: XLA counts 6-10% more than this at the tests' tiny widths.
  * The embedding lookup is a gather: free.
  * Causal attention counts the causal half: scores and values over the T*(T+1)/2 (query, key)
    pairs with key <= query, i.e. 2 * 2 * T*(T+1)/2 * head_dim per head and layer. (An XLA
    attention computes and masks the full T x T square: twice that, minus the diagonal.)
  * The gated delta rule counts its chunked form (shared/CHUNKED.md) as
    sleep_jax/ops/gated_delta/chunked.py computes it: dense C x C tiles inside a chunk (they
    are triangular, but the matmuls are not), the tail chunk padded to C tokens, and the
    triangular inverse by recursive block doubling. Per-token recurrences would differ.

Shape legend: T tokens in a chunk, d d_model, H heads, Dh head_dim (K = V = Dh for the
fast-weight state), F mlp_dim, C the gated delta rule's chunk length.
"""

from __future__ import annotations

import math

from sleep_jax.model.config import (
  ATTENTION,
  GATED_DELTA,
  JET,
  SLIDING_ATTENTION,
  ModelConfig,
  has_mlp,
  mixer_kind,
)

# The default `chunk_size` of sleep_jax.ops.gated_delta.gated_delta_rule, which the
# gated-delta blocks use; the effective chunk is min(chunk_size, T).
GATED_DELTA_CHUNK_SIZE = 64


def matmul_flops(m: int, n: int, k: int) -> int:
  """FLOPs of an [m, k] @ [k, n] product: one multiply and one add per term."""
  return 2 * m * n * k


def mlp_flops(cfg: ModelConfig, num_tokens: int) -> int:
  """SwiGLU over `num_tokens` tokens: gate and up [d -> F], down [F -> d]."""
  return 3 * matmul_flops(num_tokens, cfg.mlp_dim, cfg.d_model)


def attention_flops(cfg: ModelConfig, num_tokens: int, window: int | None = None) -> int:
  """Causal self-attention over one chunk of `num_tokens` tokens (the keys are the chunk).

  Projections q [d -> H*Dh], k, v [d -> H_kv*Dh] and o [H*Dh -> d]; then, per head, q k^T and
  p v over the T*(T+1)/2 causal (query, key) pairs (with a sliding `window`, the pairs fewer
  than `window` apart), Dh-long dot products each.
  """
  t, heads_dim = num_tokens, cfg.num_heads * cfg.head_dim
  kv_dim = cfg.kv_heads * cfg.head_dim
  projections = 2 * matmul_flops(t, heads_dim, cfg.d_model) + 2 * matmul_flops(
    t, kv_dim, cfg.d_model
  )
  causal_pairs = sum(min(i + 1, window or t) for i in range(t))
  scores_and_values = 2 * 2 * causal_pairs * cfg.head_dim * cfg.num_heads
  return projections + scores_and_values


def triangular_inverse_flops(chunk: int) -> int:
  """(I + A)^{-1} of a [C, C] unit lower-triangular matrix as chunked.py computes it.

  The model's count is that of block pairs, whatever form runs: chunks up to 32 tokens
  (chunked.SMALL_CHUNK) invert by masked doubling, which multiplies whole C x C matrices
  (4 C^3 per level, more FLOPs but fewer kernels) and, like rematerialisation and those
  chunks' decay sums taken as a matmul, is not counted as model work.

  Recursive block doubling on C rounded up to a power of two P: at block size b there are
  P/(2b) pairs of diagonal blocks, each costing two [b, b] @ [b, b] matmuls, i.e. 2*P*b^2 per
  level; summed over b = 1, 2, 4, ..., P/2 that is 2*P*(P^2 - 1)/3 (about twice the P^3/3 of
  forward substitution, which a fused kernel may use instead).
  """
  padded = 1 << (chunk - 1).bit_length()
  return 2 * padded * (padded * padded - 1) // 3


def gated_delta_rule_flops(
  cfg: ModelConfig, num_tokens: int, chunk_size: int = GATED_DELTA_CHUNK_SIZE
) -> int:
  """The chunked gated delta rule over `num_tokens` tokens, all heads (CHUNKED.md steps 1-6).

  Per head and chunk of C tokens, with K = V = Dh:
    step 1  k k^T                     [C, K] @ [K, C]   2 C^2 K
    step 2  (I + A)^{-1}                                triangular_inverse_flops(C)
    step 3  W = Tm (beta e^G k)       [C, C] @ [C, K]   2 C^2 K
            U = Tm (beta v)           [C, C] @ [C, V]   2 C^2 V
    step 4  W S_0                     [C, K] @ [K, V]   2 C K V
    step 5  (s q e^G) S_0             [C, K] @ [K, V]   2 C K V
            (s q) k^T                 [C, K] @ [K, C]   2 C^2 K
            (scores * D) U~           [C, C] @ [C, V]   2 C^2 V
    step 6  (k e^{G_C - G})^T U~      [K, C] @ [C, V]   2 C K V
  = 2 C^2 (3K + 2V) + 6 C K V + inverse, over ceil(T / C) chunks (the last one zero-padded).
  """
  chunk = min(chunk_size, num_tokens)
  num_chunks = math.ceil(num_tokens / chunk)
  heads, k, v = cfg.fast_state_shape
  per_chunk = (
    2 * chunk * chunk * (3 * k + 2 * v)
    + 3 * matmul_flops(chunk, v, k)
    + triangular_inverse_flops(chunk)
  )
  return heads * num_chunks * per_chunk


def gated_delta_flops(
  cfg: ModelConfig, num_tokens: int, chunk_size: int = GATED_DELTA_CHUNK_SIZE
) -> int:
  """The Gated DeltaNet mixer over one chunk of `num_tokens` tokens.

  Projections q, k [d -> H*K], v, out_gate [d -> H*V] and o [H*V -> d], the two per-head
  gate projections (decay and beta) [d -> H], and the gated delta rule itself.
  """
  t = num_tokens
  heads, k, v = cfg.fast_state_shape
  projections = 2 * matmul_flops(t, heads * k, cfg.d_model) + 3 * matmul_flops(
    t, heads * v, cfg.d_model
  )
  gates = 2 * matmul_flops(t, heads, cfg.d_model)
  return projections + gates + gated_delta_rule_flops(cfg, t, chunk_size)


def jet_flops(cfg: ModelConfig, num_tokens: int, chunk_size: int = GATED_DELTA_CHUNK_SIZE) -> int:
  """The Jet block over one chunk: the Gated DeltaNet count plus the kernel generator
  [d -> H*V/r -> H*V*W] and the dynamic convolution (W multiply-adds per value channel)."""
  heads, _, v = cfg.fast_state_shape
  hidden = max(1, heads * v // cfg.dconv_reduction)
  width = cfg.conv_width
  generator = matmul_flops(num_tokens, hidden, cfg.d_model) + matmul_flops(
    num_tokens, heads * v * width, hidden
  )
  return (
    gated_delta_flops(cfg, num_tokens, chunk_size) + generator + 2 * num_tokens * heads * v * width
  )


def block_flops(
  cfg: ModelConfig, letter: str, chunk_len: int, chunk_size: int = GATED_DELTA_CHUNK_SIZE
) -> int:
  """One block (mixer, and MLP unless the letter is lower case) over a chunk."""
  mixer = {
    ATTENTION: lambda: attention_flops(cfg, chunk_len),
    SLIDING_ATTENTION: lambda: attention_flops(cfg, chunk_len, cfg.sliding_window),
    GATED_DELTA: lambda: gated_delta_flops(cfg, chunk_len, chunk_size),
    JET: lambda: jet_flops(cfg, chunk_len, chunk_size),
  }[mixer_kind(letter)]()
  return mixer + (mlp_flops(cfg, chunk_len) if has_mlp(letter) else 0)


def forward_flops_per_chunk(
  cfg: ModelConfig,
  chunk_len: int,
  chunk_size: int = GATED_DELTA_CHUNK_SIZE,
  loop_passes: int = 1,
) -> int:
  """Forward passes of the block stack over a chunk of tokens: the prelude once, the loop
  `loop_passes` x `loop_repeats` times, the coda once (`ModelConfig.segments`).

  Attention sees only the chunk. The embedding and the output head are not included.

  Args:
    cfg: the model configuration (its `pattern` says which block is which).
    chunk_len: tokens in the chunk, T >= 1.
    chunk_size: the gated delta rule's chunk length (the op's default unless overridden).
    loop_passes: passes of the loop (a sleep chunk: N; a predicted chunk: 1).

  Returns:
    Forward FLOPs for one sequence (batch size 1).
  """
  total = 0
  for name, start, stop in cfg.segments:
    times = loop_passes * cfg.loop_repeats if name == "loop" else 1
    segment = sum(block_flops(cfg, x, chunk_len, chunk_size) for x in cfg.pattern[start:stop])
    total += times * segment
  return total


def head_flops(cfg: ModelConfig, num_positions: int) -> int:
  """The output head [d -> vocab] over the predicted positions (sleep chunks have no logits)."""
  return matmul_flops(num_positions, cfg.vocab_size, cfg.d_model)
