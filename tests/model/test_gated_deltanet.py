"""The Gated DeltaNet mixer equals its equations (PAPER.md section 2), written out plainly here:
separate projections, one convolution per input, SiLU, L2-normalised q and k, the gates, the
per-token reference rule, the per-head RMSNorm and the output gate. Checked for one width
(q, k and v stay stacked through the layer) and for different key and value widths."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sleep_jax.model.blocks import GatedDeltaNet
from sleep_jax.model.config import ModelConfig
from sleep_jax.model.layers import causal_depthwise_conv, l2_normalize, pad_with_tail
from sleep_jax.ops.gated_delta.reference import gated_delta_rule_reference


def plain_gated_deltanet(mixer, x, fast_state, tails):
  """The layer's equations one input at a time, in float32."""
  heads, key_dim, value_dim = mixer.cfg.fast_state_shape
  dense = lambda layer: x @ layer.kernel[...]
  width = mixer.cfg.conv_width

  def conv(y, layer, tail):
    padded = pad_with_tail(y, tail, width)
    return causal_depthwise_conv(padded, layer.weight[...]), padded[:, y.shape[1] :]

  split = lambda y, size: y.reshape(*y.shape[:2], heads, size)
  (q, q_tail), (k, k_tail), (v, v_tail) = (
    conv(dense(p), c, t)
    for p, c, t in zip(
      (mixer.q, mixer.k, mixer.v), (mixer.conv_q, mixer.conv_k, mixer.conv_v), tails
    )
  )
  q = l2_normalize(split(jax.nn.silu(q), key_dim))
  k = l2_normalize(split(jax.nn.silu(k), key_dim))
  v = split(jax.nn.silu(v), value_dim)
  g = -jnp.exp(mixer.A_log[...]) * jax.nn.softplus(dense(mixer.decay_proj) + mixer.dt_bias[...])
  beta = jax.nn.sigmoid(dense(mixer.beta_proj))
  o, fast_state = gated_delta_rule_reference(q, k, v, g, beta, initial_state=fast_state)
  o = mixer.out_norm(o) * jax.nn.silu(split(dense(mixer.out_gate), value_dim))
  return o.reshape(*o.shape[:2], -1) @ mixer.o.kernel[...], fast_state, (q_tail, k_tail, v_tail)


@pytest.mark.parametrize("key_dim, value_dim", [(8, 8), (4, 6)])
def test_gated_deltanet_equals_its_equations(key_dim, value_dim):
  cfg = ModelConfig(
    vocab_size=8,
    pattern="G",
    d_model=16,
    num_heads=2,
    head_dim=8,
    fast_key_dim=key_dim,
    fast_value_dim=value_dim,
  )
  mixer = GatedDeltaNet(cfg, rngs=nnx.Rngs(params=0))
  rng = np.random.default_rng(0)
  batch, tokens = 2, 7
  x = jnp.asarray(rng.normal(size=(batch, tokens, 16)), jnp.float32)
  state = jnp.asarray(0.1 * rng.normal(size=(batch, 2, key_dim, value_dim)), jnp.float32)
  tails = tuple(
    jnp.asarray(rng.normal(size=(batch, cfg.conv_width - 1, 2 * size)), jnp.float32)
    for size in (key_dim, key_dim, value_dim)
  )
  y, (new_state, new_tails) = mixer(x, (state, tails))
  want_y, want_state, want_tails = plain_gated_deltanet(mixer, x, state, tails)
  np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(new_state, want_state, rtol=1e-5, atol=1e-5)
  for got, want in zip(new_tails, want_tails):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)  # the projected inputs
