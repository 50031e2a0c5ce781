"""Executables compiled for compile-only GPU devices are not for this host's compilation cache:
compile them fresh."""

import jax

jax.config.update("jax_enable_compilation_cache", False)
