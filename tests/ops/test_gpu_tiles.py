"""The GPU kernels' tile table and matmul precision (sleep_jax/ops/gated_delta/pallas_gpu.py).

The tiles (chunk, value and key blocks, warps per kernel) are picked per shape so that ptxas
spills nothing on Hopper: that is checked where ptxas runs, tests/gpu_compile/test_kernels.py.
Here, in the Pallas interpreter on the CPU: the table's own entry for the benchmark's K = V = 128
gives the chunked form's values and gradients, another cut of the same shape gives the same
numbers (the math does not depend on the tiles), and the matmul precision is HIGHEST whenever
the kernels are interpreted.
"""

import functools

import jax
import numpy as np
import pytest

from sleep_jax.ops.gated_delta import pallas_gpu
from sleep_jax.ops.gated_delta.chunked import gated_delta_rule_chunked
from tests.ops.test_gated_delta import INPUT_NAMES, assert_close, make_inputs, random_cotangents

HIGHEST = jax.lax.Precision.HIGHEST

# Two chunks of 64 (the second one padded), K = V = 128: every kernel runs with the table's
# entry for the benchmark's width: 8 value blocks in the walks, 2 key blocks in the gradients.
WIDE = dict(batch=1, tokens=70, heads=1, key_dim=128, value_dim=128)


def _is_power_of_two(n):
  return n >= 1 and n & (n - 1) == 0


@pytest.mark.parametrize("width", sorted(pallas_gpu._TILES))
def test_every_table_entry_is_a_valid_cut_of_its_width(width):
  tiles = pallas_gpu.tiles_for(width, width)
  assert tiles is pallas_gpu._TILES[width]
  sizes = (tiles.chunk, tiles.block_v, tiles.key_block, tiles.gram_block)
  assert all(_is_power_of_two(n) and n >= 16 for n in sizes), tiles
  assert tiles.block_v <= width and tiles.key_block <= width and tiles.gram_block <= width
  warps = (tiles.local_warps, tiles.walk_warps, tiles.chunk_warps, tiles.gradient_warps)
  assert all(w in (4, 8) for w in warps), tiles  # whole warpgroups: Hopper's MMA needs them


def test_the_table_picks_by_the_wider_of_k_and_v_and_falls_back_to_its_widest_entry():
  assert pallas_gpu.tiles_for(64, 128) is pallas_gpu._TILES[128]
  assert pallas_gpu.tiles_for(128, 16) is pallas_gpu._TILES[128]
  assert pallas_gpu.tiles_for(1024, 1024) is pallas_gpu._TILES[max(pallas_gpu._TILES)]


def test_matmul_precision_is_highest_when_interpreted_and_tf32x3_when_compiled():
  assert pallas_gpu.matmul_precision(interpret=True) == HIGHEST
  assert pallas_gpu.matmul_precision(interpret=True, requested=HIGHEST) == HIGHEST
  tf32x3 = jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3
  assert pallas_gpu.matmul_precision(interpret=False) == tf32x3
  # The staged kernels ask for less for bfloat16 inputs: that passes through, compiled or not.
  for interpret in (True, False):
    default = jax.lax.Precision.DEFAULT
    assert pallas_gpu.matmul_precision(interpret, requested=default) == default


def test_interpreted_kernels_lower_their_matmuls_at_highest(monkeypatch):
  # What the kernels are built with, not only what the helper returns: record every precision
  # that reaches a matmul while the interpreted kernels are traced.
  seen = set()
  original = pallas_gpu.Matmuls.__init__

  def record(self, precision=HIGHEST):
    seen.add(precision)
    original(self, precision)

  monkeypatch.setattr(pallas_gpu.Matmuls, "__init__", record)
  inputs = make_inputs(0, tokens=5, key_dim=4, value_dim=4)
  jax.grad(
    lambda q: pallas_gpu.gated_delta_rule_pallas_gpu(**{**inputs, "q": q}, interpret=True)[0].sum()
  )(inputs["q"])
  assert seen == {HIGHEST}


@functools.partial(jax.jit, static_argnames=("rule",))
def _values_and_grads(rule, inputs, cotangents):
  """(o, final_state, the six gradients for cotangents of o and of the final state)."""
  (out, state), vjp = jax.vjp(lambda differentiable: rule(**differentiable), inputs)
  return out, state, vjp(cotangents)[0]


def _interpreted(**kwargs):
  return functools.partial(pallas_gpu.gated_delta_rule_pallas_gpu, interpret=True, **kwargs)


@pytest.fixture(scope="module")
def wide_case():
  inputs = make_inputs(21, **WIDE)
  cotangents = random_cotangents(inputs)
  expected = _values_and_grads(
    functools.partial(gated_delta_rule_chunked, chunk_size=64), inputs, cotangents
  )
  return inputs, cotangents, expected


def _assert_matches(got, expected, rel_values, rel_grads):
  out, state, grads = got
  assert_close(out, expected[0], rel_values, "o")
  assert_close(state, expected[1], rel_values, "final_state")
  for name in INPUT_NAMES:
    assert_close(grads[name], expected[2][name], rel_grads, f"d / d {name}")


def test_the_table_entry_for_k_v_128_matches_the_chunked_form(wide_case):
  inputs, cotangents, expected = wide_case
  assert pallas_gpu.tiles_for(128, 128).chunk == 64
  got = _values_and_grads(_interpreted(chunk_size=64), inputs, cotangents)
  # The tolerances of test_gated_delta's comparisons with the reference.
  _assert_matches(got, expected, 1e-5, 1e-4)


def test_another_cut_of_the_same_shape_gives_the_same_numbers(wide_case, monkeypatch):
  inputs, cotangents, expected = wide_case
  table = _values_and_grads(_interpreted(chunk_size=64), inputs, cotangents)
  # Wider value blocks, narrower key blocks, other Gram blocks and warps, a smaller chunk: only
  # the order of float32 sums changes.
  other = pallas_gpu.Tiles(
    chunk=32, block_v=64, key_block=32, gram_block=64, local_warps=8, walk_warps=8,
    chunk_warps=8, gradient_warps=4,
  )  # fmt: skip
  monkeypatch.setattr(pallas_gpu, "tiles_for", lambda key_dim, value_dim: other)
  recut = _values_and_grads(_interpreted(chunk_size=64), inputs, cotangents)
  _assert_matches(recut, table, 2e-6, 2e-6)


def test_chunk_size_is_capped_by_the_table(wide_case):
  # Asking for chunks of 256 runs the table's 64: the very same computation.
  inputs, cotangents, _ = wide_case
  capped = _values_and_grads(_interpreted(chunk_size=256), inputs, cotangents)
  table = _values_and_grads(_interpreted(chunk_size=64), inputs, cotangents)
  for got, want in zip(jax.tree.leaves(capped), jax.tree.leaves(table)):
    np.testing.assert_array_equal(got, want)
