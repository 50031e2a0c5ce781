"""Fused sequence primitives, each with a reference twin; see one folder per op."""

from sleep_jax.ops.gated_delta.api import gated_delta_rule

__all__ = ["gated_delta_rule"]
