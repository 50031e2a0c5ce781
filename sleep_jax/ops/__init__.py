"""Fused sequence primitives, each with a reference twin; see one folder per op."""

from sleep_jax.ops.attention.api import causal_attention
from sleep_jax.ops.gated_delta.api import gated_delta_rule

__all__ = ["causal_attention", "gated_delta_rule"]
