"""The general chunk schedule, sliding eviction and the convolution-state switch.

Each schedule is checked against the same computation written out by hand, chunk by chunk
with `HybridLM.run_pass`, or against a whole-sequence pass it must equal by construction.
"""

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sleep_jax
from sleep_jax.model.blocks import PassContext, attention_mask
from sleep_jax.model.lm import zero_conv_state, zero_fast_state
from sleep_jax.sleep.config import Chunk, SleepConfig
from sleep_jax.sleep.consolidate import sleep_forward

L, VOCAB = 4, 7
# What "auto" lowers to on a CPU, named so that tracing outside a program skips the GPU and TPU
# kernels' branches too (sleep_jax.ops.gated_delta.api._by_platform).
CPU_FORM = dict(fast_weight_impl="chunked", attention_impl="xla")


def build(pattern="AGAG"):
  cfg = dict(vocab_size=VOCAB, pattern=pattern, d_model=16, num_heads=2, head_dim=8, mlp_dim=32)
  return sleep_jax.build_model(cfg | CPU_FORM, seed=3)


def tokens(length, seed=0, batch=2):
  return np.random.default_rng(seed).integers(0, VOCAB, (batch, length), dtype=np.int32)


_forward = jax.jit(sleep_forward, static_argnums=(0, 3))  # one compile per model and schedule


def run(model, toks, **sleep):
  graphdef, state = nnx.split(model)
  cfg = SleepConfig(window=L, **sleep)
  logits, fast = _forward(graphdef, nnx.to_pure_dict(state), jnp.asarray(toks), cfg)
  return np.asarray(logits), fast


def jitted(model):
  """The model's methods that a written-out reference calls, each jitted: the reference then
  compiles once per shape, not once per operation (which was most of these tests' time)."""
  methods = ("embed", "stack_pass", "run_pass", "logits")
  return SimpleNamespace(cfg=model.cfg, **{name: jax.jit(getattr(model, name)) for name in methods})


@pytest.fixture(scope="module")
def hybrid():
  return build()


def test_the_schedule_cuts_any_length_into_windows_and_marks_the_predicted_ones():
  cfg = SleepConfig(window=4, context_len=8)
  assert cfg.chunks(14) == (
    Chunk(0, 4, False),
    Chunk(4, 8, False),
    Chunk(8, 12, True),
    Chunk(12, 14, True),
  )
  assert cfg.predicted_spans(14) == ((8, 14),)
  interleaved = SleepConfig(window=4, context_len=4, predict_chunks=(1, 3))
  assert [c.predict for c in interleaved.chunks(15)] == [False, True, False, True]
  assert interleaved.predicted_spans(15) == ((4, 8), (12, 15))
  assert SleepConfig(eviction="none", context_len=3).chunks(9) == (Chunk(0, 9, True),)


def test_interleaved_prediction_chunks_equal_the_chunk_by_chunk_forward(hybrid):
  """Sleep, predict, sleep, predict (a short last chunk): only S crosses each boundary."""
  toks = tokens(15)
  logits, fast = run(hybrid, toks, passes=2, context_len=4, predict_chunks=(1, 3))
  m = jitted(hybrid)
  state, expected = zero_fast_state(hybrid.cfg, 2), []
  for start, predict in ((0, False), (4, True), (8, False), (12, True)):
    h = m.embed(toks[:, start : start + L])
    for _ in range(1 if predict else 2):
      h, state = m.stack_pass(h, state)
    if predict:
      expected.append(m.logits(h))
  np.testing.assert_allclose(logits, jnp.concatenate(expected, 1), rtol=1e-5, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), fast, state)


def test_predict_then_sleep_predicts_with_one_pass_and_hands_on_the_slept_state(hybrid):
  toks = tokens(12, seed=1)
  logits, fast = run(hybrid, toks, passes=3, context_len=0, predict_then_sleep=True)
  m = jitted(hybrid)
  state, expected = zero_fast_state(hybrid.cfg, 2), []
  for start in (0, 4, 8):
    chunk = m.embed(toks[:, start : start + L])
    h, _ = m.stack_pass(chunk, state)  # wake: logits from one pass
    expected.append(m.logits(h))
    for _ in range(3):  # sleep: N passes from the same incoming state
      chunk, state = m.stack_pass(chunk, state)
  np.testing.assert_allclose(logits, jnp.concatenate(expected, 1), rtol=1e-5, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), fast, state)
  # Without it, a predicted chunk's single pass is what crosses: the states differ.
  _, woke = run(hybrid, toks, passes=3, context_len=0)
  assert max(float(jnp.abs(a - b).max()) for a, b in zip(woke, fast)) > 1e-4


def test_attention_mask_is_causal_within_the_width_and_skips_empty_slots():
  context = PassContext(
    positions=jnp.arange(3),
    prefix_positions=jnp.arange(3) - 3,
    prefix_valid=jnp.array([False, True, True]),
    width=3,
  )
  # Columns: prefix positions -3 (empty), -2, -1, then own positions 0, 1, 2.
  expected = np.array(
    [
      [0, 1, 1, 1, 0, 0],  # position 0 sees -2, -1 and itself
      [0, 0, 1, 1, 1, 0],  # position 1 sees -1, 0, 1
      [0, 0, 0, 1, 1, 1],  # position 2 sees 0, 1, 2
    ],
    bool,
  )
  np.testing.assert_array_equal(attention_mask(context, 3), expected)


def test_sliding_eviction_at_one_pass_is_one_sliding_window_pass_over_the_sequence():
  """N=1, sliding KV and carried conv tails: a Samba-like SWA + gated-delta model."""
  model = build("AG")
  toks = tokens(14, seed=2)
  logits, _ = run(model, toks, eviction="sliding", conv_state="carry", context_len=0)
  m = jitted(model)
  whole = m.run_pass(
    m.embed(toks),
    zero_fast_state(model.cfg, 2),
    conv_state=zero_conv_state(model.cfg, 2),
    context=PassContext(
      positions=jnp.arange(14),
      prefix_positions=jnp.zeros((0,), jnp.int32),
      prefix_valid=jnp.zeros((0,), bool),
      width=L,
    ),
  )
  np.testing.assert_allclose(logits, m.logits(whole.h), rtol=1e-5, atol=1e-5)


def test_sliding_eviction_remembers_the_last_window_of_the_last_pass(hybrid):
  """N=2: every pass over a chunk sees the previous chunk's last L-1 tokens from its last pass."""
  toks = tokens(11, seed=3)
  logits, fast = run(hybrid, toks, passes=2, eviction="sliding", context_len=8)
  m = jitted(hybrid)
  cfg, slots = hybrid.cfg, L - 1
  state = zero_fast_state(cfg, 2)
  memory = tuple((jnp.zeros((2, slots, 2, 8)),) * 2 for _ in range(2))
  valid = jnp.zeros((slots,), bool)
  for start, passes in ((0, 2), (4, 2), (8, 1)):
    chunk = toks[:, start : start + L]
    context = PassContext(jnp.arange(chunk.shape[1]), jnp.arange(slots) - slots, valid, L)
    h = m.embed(chunk)
    for _ in range(passes):
      out = m.run_pass(h, state, kv_prefix=memory, context=context)
      h, state = out.h, out.fast_state
    memory = tuple((k[:, -slots:], v[:, -slots:]) for k, v in out.kv)
    valid = jnp.ones((slots,), bool)
  np.testing.assert_allclose(logits, m.logits(h), rtol=1e-5, atol=1e-5)
  # The remembered tokens matter: hard eviction predicts differently.
  hard, _ = run(hybrid, toks, passes=2, eviction="hard", context_len=8)
  assert np.max(np.abs(hard - logits)) > 1e-4


def test_sliding_eviction_reaches_back_l_minus_1_tokens_per_attention_layer():
  """Attention only ("AA"), N=1: the receptive field of a sliding window, across chunks.

  The prediction at position 8 sees 5..8 in the second layer, each of which saw three tokens
  back in the first: positions 2..8 reach it, 0 and 1 have left. Under hard eviction nothing
  before position 8 does.
  """
  model = build("AA")
  toks = tokens(9, seed=4, batch=1)

  def reached(eviction):
    base, _ = run(model, toks, eviction=eviction, context_len=8)
    moved = []
    for position in range(8):
      changed = toks.copy()
      changed[0, position] = (changed[0, position] + 1) % VOCAB
      logits, _ = run(model, changed, eviction=eviction, context_len=8)
      moved.append(bool(np.max(np.abs(logits - base)) > 1e-6))
    return moved

  assert reached("sliding") == [False, False, True, True, True, True, True, True]
  assert reached("hard") == [False] * 8


@pytest.mark.parametrize("conv_state", ["reset", "carry"])
def test_conv_state_switch(conv_state):
  """An attention-free stack at N=1: carrying the tails makes the chunked schedule one pass
  over the whole sequence; resetting them (the paper's convention) does not."""
  model = build("GG")
  toks = tokens(13, seed=5)
  chunked, fast = run(model, toks, context_len=4, conv_state=conv_state)
  m = jitted(model)
  whole, whole_fast = m.stack_pass(m.embed(toks), zero_fast_state(model.cfg, 2))
  expected = m.logits(whole)[:, 4:]
  if conv_state == "carry":
    np.testing.assert_allclose(chunked, expected, rtol=1e-5, atol=1e-5)
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), fast, whole_fast
    )
  else:
    assert np.max(np.abs(chunked - expected)) > 1e-4


def test_conv_carry_hands_on_the_last_pass_tails_to_every_pass_of_the_next_chunk(hybrid):
  toks = tokens(10, seed=6)
  logits, _ = run(hybrid, toks, passes=2, context_len=8, conv_state="carry")
  m = jitted(hybrid)
  state, conv = zero_fast_state(hybrid.cfg, 2), zero_conv_state(hybrid.cfg, 2)
  for start, passes in ((0, 2), (4, 2), (8, 1)):
    h = m.embed(toks[:, start : start + L])
    for _ in range(passes):
      out = m.run_pass(h, state, conv_state=conv)
      h, state = out.h, out.fast_state
    conv = out.conv_state
  np.testing.assert_allclose(logits, m.logits(h), rtol=1e-5, atol=1e-5)


@pytest.mark.integration  # a training gradient of the whole model and two losses per schedule
@pytest.mark.parametrize(
  "sleep",
  [
    dict(eviction="sliding", conv_state="carry", passes=2),
    dict(predict_then_sleep=True, passes=2, context_len=0),
  ],
)
def test_new_schedules_train_gradients_match_finite_differences(hybrid, sleep):
  """Gradients flow through the carried memory and tails (a directional derivative check)."""
  graphdef, state = nnx.split(hybrid)
  params = nnx.to_pure_dict(state)
  cfg = SleepConfig(window=L, **({"context_len": 8} | sleep))
  toks = jnp.asarray(tokens(10, seed=7))
  loss = jax.jit(lambda p: jnp.mean(sleep_forward(graphdef, p, toks, cfg)[0] ** 2))
  grads = jax.jit(jax.grad(loss))(params)
  direction = jax.tree.map(lambda x: jnp.sign(jnp.sin(jnp.arange(x.size))).reshape(x.shape), params)
  analytic = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
  eps = 1e-3
  shift = lambda s: jax.tree.map(lambda p, d: p + s * eps * d, params, direction)
  numeric = (loss(shift(1.0)) - loss(shift(-1.0))) / (2 * eps)
  np.testing.assert_allclose(analytic, numeric, rtol=2e-2)


def pre_generalisation_forward(graphdef, params, tokens_bt, cfg):
  """The schedule as it was before it was generalised: a scan over the context's windows
  (each a scan over N rematerialised passes), then one pass over the prediction chunk."""
  model = nnx.merge(graphdef, params)
  state = zero_fast_state(model.cfg, tokens_bt.shape[0])
  pass_fn = jax.checkpoint(lambda p, h, s: nnx.merge(graphdef, p).stack_pass(h, s))

  def sleep_on_chunk(state, chunk):
    h = nnx.merge(graphdef, params).embed(chunk)
    (h, state), _ = jax.lax.scan(
      lambda carry, _: (pass_fn(params, *carry), None), (h, state), None, length=cfg.passes
    )
    return state, None

  chunks = cfg.context_len // cfg.window
  context = tokens_bt[:, : cfg.context_len].reshape(tokens_bt.shape[0], chunks, cfg.window)
  state, _ = jax.lax.scan(sleep_on_chunk, state, jnp.swapaxes(context, 0, 1))
  h, state = model.stack_pass(model.embed(tokens_bt[:, cfg.context_len :]), state)
  return model.logits(h), state


@pytest.mark.parametrize("passes", [pytest.param(1, marks=pytest.mark.integration), 3])
def test_the_papers_layout_is_bit_identical_to_the_pre_generalisation_schedule(hybrid, passes):
  """Rule 110 and Depo (whole windows, then one prediction chunk): same bits, values and grads."""
  graphdef, state = nnx.split(hybrid)
  params = nnx.to_pure_dict(state)
  cfg = SleepConfig(passes=passes, window=L, context_len=8)
  toks = jnp.asarray(tokens(11, seed=8))

  def loss_and_grad(forward):
    loss = lambda p: jnp.mean(forward(graphdef, p, toks, cfg)[0] ** 2)
    return jax.jit(jax.value_and_grad(loss))(params)

  new, old = loss_and_grad(sleep_forward), loss_and_grad(pre_generalisation_forward)
  jax.tree.map(np.testing.assert_array_equal, new, old)
