"""Ports of external pretrained models into sleep_jax (see each port's UPSTREAM.md)."""
