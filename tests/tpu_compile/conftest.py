"""TPU executables compiled for a topology cannot be read back from the persistent compilation
cache on a CPU host (jax warns on every hit): compile them fresh."""

import jax

jax.config.update("jax_enable_compilation_cache", False)
