"""The pretrained architectures' parts against their equations written out token by token:
the Jet block, sliding-window attention, MLP-free and sandwich-norm blocks, the loop range
under the sleep schedule, and linear RoPE scaling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sleep_jax
from sleep_jax.model.blocks import CausalSelfAttention, JetDeltaNet, ResidualBlock
from sleep_jax.model.config import ModelConfig
from sleep_jax.model.layers import rotary
from sleep_jax.model.lm import params_by_path, zero_fast_state
from sleep_jax.sleep.config import SleepConfig
from sleep_jax.sleep.consolidate import sleep_forward

JET = dict(
  vocab_size=7,
  pattern="J",
  d_model=12,
  num_heads=2,
  head_dim=4,
  mlp_dim=16,
  fast_heads=2,
  fast_key_dim=3,
  fast_value_dim=5,
  dconv_reduction=2,
  fast_norm_eps=1e-5,
  fast_weight_impl="chunked",
)


def silu(x):
  return x / (1.0 + np.exp(-x))


def jet_block_by_token(block: JetDeltaNet, x, fast_state, v_tail):
  """Jet-Nemotron's JetBlock equations (its reference recurrence), one token at a time, numpy."""
  p = params_by_path(nnx.to_pure_dict(nnx.state(block, nnx.Param)))
  w = lambda *name: np.asarray(p["/".join(name)], np.float64)
  heads, key_dim, value_dim = block.cfg.fast_state_shape
  width = block.cfg.conv_width
  x = np.asarray(x, np.float64)
  state = np.array(fast_state, np.float64)
  history = list(np.asarray(v_tail, np.float64).transpose(1, 0, 2))  # past v inputs, oldest first
  outputs = []
  for t in range(x.shape[1]):
    u = x[:, t]
    q = silu(u @ w("q", "kernel")).reshape(-1, heads, key_dim)
    k = silu(u @ w("k", "kernel")).reshape(-1, heads, key_dim)
    q = q / np.sqrt((q**2).sum(-1, keepdims=True) + 1e-6) * key_dim**-0.5
    k = k / np.sqrt((k**2).sum(-1, keepdims=True) + 1e-6)
    history.append(u @ w("v", "kernel"))
    generated = silu(u @ w("kernel_hidden", "kernel")) @ w("kernel_out", "kernel")
    kernel = (generated + w("kernel_out", "bias")).reshape(-1, heads * value_dim, width)
    window = np.stack(history[-width:], axis=-1)  # [B, C, W], tap W-1 = this token
    v = silu((kernel * window).sum(-1)).reshape(-1, heads, value_dim)
    decay = np.exp(
      -np.exp(w("A_log")) * np.logaddexp(0, u @ w("decay_proj", "kernel") + w("dt_bias"))
    )
    beta = 1 / (1 + np.exp(-(u @ w("beta_proj", "kernel"))))
    state = decay[..., None, None] * state
    error = v - np.einsum("bhk,bhkv->bhv", k, state)
    state = state + np.einsum("bhk,bhv->bhkv", k, beta[..., None] * error)
    o = np.einsum("bhk,bhkv->bhv", q, state)
    o = o / np.sqrt((o**2).mean(-1, keepdims=True) + 1e-5) * w("out_norm", "scale")
    o = o * silu(u @ w("out_gate", "kernel")).reshape(o.shape)
    outputs.append(o.reshape(o.shape[0], -1) @ w("o", "kernel"))
  return np.stack(outputs, 1), state, np.stack(history[-(width - 1) :], 1)


@pytest.fixture(scope="module")
def jet_block():
  block = JetDeltaNet(ModelConfig(**JET), rngs=nnx.Rngs(0))
  # A fresh block is a static convolution (zero generator matrix): give it a generated part.
  block.kernel_out.kernel[...] = 0.5 * jax.random.normal(
    jax.random.key(1), block.kernel_out.kernel.shape
  )
  return block


def test_jet_block_equals_its_equations_token_by_token(jet_block):
  keys = jax.random.split(jax.random.key(2), 3)
  x = jax.random.normal(keys[0], (2, 9, 12))
  fast_state = 0.3 * jax.random.normal(keys[1], (2, 2, 3, 5))
  v_tail = jax.random.normal(keys[2], (2, 3, 10))
  run = jax.jit(jet_block.__call__)  # one compile per shape, not one per operation
  y, (new_state, (new_tail,)) = run(x, (fast_state, (v_tail,)))
  expected_y, expected_state, expected_tail = jet_block_by_token(jet_block, x, fast_state, v_tail)
  np.testing.assert_allclose(y, expected_y, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(new_state, expected_state, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(new_tail, expected_tail, rtol=1e-6, atol=1e-6)
  # No tail is a tail of zeros, and two calls that hand the tail on equal one call.
  zeros = run(x, (fast_state, None))[0]
  np.testing.assert_allclose(zeros, run(x, (fast_state, (0 * v_tail,)))[0], atol=1e-6)
  first, (mid_state, mid_tail) = run(x[:, :4], (fast_state, (v_tail,)))
  second, _ = run(x[:, 4:], (mid_state, mid_tail))
  np.testing.assert_allclose(jnp.concatenate([first, second], 1), y, rtol=1e-5, atol=1e-5)


def test_jet_block_gradients_match_the_per_token_reference_impl(jet_block):
  """The chunked kernel's gradients through the Jet block against the per-token recurrence."""
  x = jax.random.normal(jax.random.key(3), (2, 9, 12))
  fast_state = 0.3 * jax.random.normal(jax.random.key(4), (2, 2, 3, 5))
  graphdef, params = nnx.split(jet_block)
  weights = jax.random.normal(jax.random.key(5), (2, 9, 12))

  def loss(params, x, impl):
    block = nnx.merge(graphdef, params)
    block.cfg = ModelConfig(**(JET | dict(fast_weight_impl=impl)))
    y, (state, _) = block(x, (fast_state, None))
    return jnp.sum(y * weights) + jnp.sum(jnp.sin(state))

  grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)
  fast, slow = grad(params, x, "chunked"), grad(params, x, "reference")
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 + 1e-4 * jnp.abs(b).max())
  jax.tree.map(close, fast, slow)
  assert float(jnp.abs(fast[0]["kernel_hidden"]["kernel"][...]).max()) > 0  # the generator learns


def attention_by_hand(attention: CausalSelfAttention, x, window):
  """Softmax attention with an explicit |i - j| < window causal mask, numpy."""
  p = lambda name: np.asarray(getattr(attention, name).kernel[...], np.float64)
  b, t, _ = x.shape
  heads, kv_heads, dh = attention.cfg.num_heads, attention.cfg.kv_heads, attention.cfg.head_dim
  positions = jnp.arange(t)
  q = np.asarray(rotary((x @ p("q")).reshape(b, t, heads, dh), positions, 10_000.0))
  k = np.asarray(rotary((x @ p("k")).reshape(b, t, kv_heads, dh), positions, 10_000.0))
  v = np.asarray((x @ p("v")).reshape(b, t, kv_heads, dh))
  k, v = np.repeat(k, heads // kv_heads, 2), np.repeat(v, heads // kv_heads, 2)
  scores = np.einsum("bihd,bjhd->bhij", q, k) / np.sqrt(dh)
  i, j = np.arange(t)[:, None], np.arange(t)[None, :]
  scores = np.where((j <= i) & (i - j < window), scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  return np.einsum("bhij,bjhd->bihd", probs, v).reshape(b, t, -1) @ p("o")


def test_sliding_window_attention_sees_window_keys_back_including_itself():
  cfg = ModelConfig(**(JET | dict(pattern="S", sliding_window=3, num_kv_heads=1)))
  attention = CausalSelfAttention(cfg, window=3, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (2, 8, 12))
  np.testing.assert_allclose(attention(x)[0], attention_by_hand(attention, x, 3), atol=1e-5)
  # Changing a token more than window-1 back leaves the output unchanged; the nearest counts.
  moved = attention(x.at[:, 2].add(1.0))[0]
  np.testing.assert_array_equal(moved[:, 5:], attention(x)[0][:, 5:])
  assert not np.allclose(moved[:, 4], attention(x)[0][:, 4])


def test_mlp_free_and_sandwich_blocks():
  x = jax.random.normal(jax.random.key(0), (2, 5, 12))
  cfg = ModelConfig(**(JET | dict(pattern="a")))
  block = ResidualBlock(cfg, "a", rngs=nnx.Rngs(0))
  assert block.mlp is None and block.mlp_norm is None
  np.testing.assert_allclose(
    block(x, None)[0], x + block.mixer(block.mixer_norm(x), None)[0], rtol=1e-6, atol=1e-6
  )
  sandwich = ResidualBlock(
    ModelConfig(**(JET | dict(pattern="A", sandwich_norm=True))), "A", rngs=nnx.Rngs(0)
  )
  mid = x + sandwich.mixer_out_norm(sandwich.mixer(sandwich.mixer_norm(x), None)[0])
  expected = mid + sandwich.mlp_out_norm(sandwich.mlp(sandwich.mlp_norm(mid)))
  np.testing.assert_allclose(sandwich(x, None)[0], expected, rtol=1e-6, atol=1e-6)


def test_linear_rope_scaling_divides_the_positions():
  x = jax.random.normal(jax.random.key(0), (1, 6, 2, 8))
  np.testing.assert_allclose(
    rotary(x, jnp.arange(6) * 4, 100.0, scaling=4.0), rotary(x, jnp.arange(6), 100.0), atol=1e-5
  )


def test_sleep_runs_the_prelude_once_the_loop_n_times_and_the_coda_once():
  """Hard eviction, N = 2, loop range [1, 3) of "GAGJ" with two loop repeats: the schedule
  equals the chunk-by-chunk composition of the three segments written out."""
  cfg = dict(
    JET, pattern="GAGJ", loop_start=1, loop_stop=3, loop_repeats=2, fast_weight_impl="chunked"
  )
  model = sleep_jax.build_model(cfg, seed=0)
  toks = np.random.default_rng(0).integers(0, 7, (2, 10), dtype=np.int32)
  sleep = SleepConfig(window=4, passes=2, context_len=8)
  graphdef, state = nnx.split(model)
  schedule = jax.jit(sleep_forward, static_argnums=(0, 3))  # one compile, not one per operation
  logits, fast = schedule(graphdef, nnx.to_pure_dict(state), jnp.asarray(toks), sleep)

  segments = {name: model.cfg.pattern[a:b] for name, a, b in model.cfg.segments}
  assert segments == {"prelude": "G", "loop": "AG", "coda": "J"}

  @jax.jit
  def written_out(toks):
    state = zero_fast_state(model.cfg, 2)
    for start, passes in ((0, 2), (4, 2), (8, 1)):
      h = model.embed(toks[:, start : start + 4])
      out = model.run_segment("prelude", h, state)
      for _ in range(passes):  # one loop pass applies its blocks loop_repeats = 2 times
        out = model.run_segment("loop", out.h, out.fast_state)
      out = model.run_segment("coda", out.h, out.fast_state)
      state = out.fast_state
    return model.logits(out.h), state

  expected_logits, state = written_out(toks)
  np.testing.assert_allclose(logits, expected_logits, rtol=1e-5, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), fast, state)
  # The loop ran 2 x 2 times per sleep chunk: a model whose loop repeats once differs.
  once = sleep_jax.build_model(cfg | dict(loop_repeats=1), seed=0)
  assert not np.allclose(logits, sleep_jax.apply(once, toks, sleep_config=sleep.__dict__)[:, 8:])
