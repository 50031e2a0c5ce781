"""Algorithm 1 of the paper (hard eviction) as a pure function of (params, tokens, fast state).

    S := 0
    for each sleep chunk c of L tokens (a `lax.scan` over chunks):
        h := Embed(c)
        repeat N times (a `lax.scan` over passes):  (h, S) := Stack(h, S)
        drop h and the KV cache                   (only S crosses into the next chunk)
    prediction chunk: h := Embed(p); (h, S) := Stack(h, S); logits := OutProj(h)

Attention inside each pass sees only the current chunk (causally, positions from 0), and its
KV is rebuilt every pass from that pass's features, so evicted tokens can reach a prediction
only through the fast-weight state S.

eviction="none" is the full-attention reference: no sleep chunks, one pass over the whole
sequence (attention sees every token), logits reported for the prediction positions only.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sleep_jax.model.lm import FastState, HybridLM, zero_fast_state
from sleep_jax.sleep.config import SleepConfig

Params = Any  # a nested dict of arrays: nnx.to_pure_dict of the model's nnx.Param state


def _stack_pass(graphdef: nnx.GraphDef, params: Params, h, fast_state):
  return nnx.merge(graphdef, params).stack_pass(h, fast_state)


def _run_passes(pass_fn, h, fast_state, num_passes: int):
  """(h, S) after `num_passes` applications of `pass_fn`, as a `lax.scan` over passes."""
  if num_passes == 0:
    return h, fast_state
  (h, fast_state), _ = jax.lax.scan(
    lambda carry, _: (pass_fn(*carry), None), (h, fast_state), None, length=num_passes
  )
  return h, fast_state


def sleep_forward(
  graphdef: nnx.GraphDef,
  params: Params,
  tokens_bt: jax.Array,
  cfg: SleepConfig,
  fast_state: FastState | None = None,
) -> tuple[jax.Array, FastState]:
  """Consolidates the context into the fast weights, then predicts the last chunk.

  Args:
    graphdef: the model's structure (`nnx.split(model)[0]`), static.
    params: the model's parameters as a nested dict of arrays.
    tokens_bt: int tokens [B, T]; the first `cfg.context_len` are slept on, the rest predicted.
    cfg: the sleep configuration (passes N, window L, eviction, grad_passes, remat).
    fast_state: incoming fast weights (default zeros: a fresh sequence).

  Returns:
    logits [B, T - context_len, vocab] (float32) for the prediction chunk, and the fast state
    after the prediction chunk.
  """
  batch, seq_len = tokens_bt.shape
  cfg.check_sequence(seq_len)
  model: HybridLM = nnx.merge(graphdef, params)
  if fast_state is None:
    fast_state = zero_fast_state(model.cfg, batch)

  pass_fn = functools.partial(_stack_pass, graphdef)
  if cfg.remat:
    pass_fn = jax.checkpoint(pass_fn)
  pass_fn = functools.partial(pass_fn, params)

  def sleep_on_chunk(state: FastState, chunk_bl: jax.Array):
    h = nnx.merge(graphdef, params).embed(chunk_bl)
    # grad_passes=k: the first N-k passes run forward only. Cutting the gradient at the carry
    # also cuts the path back to earlier windows, which is what makes it cheap.
    h, state = _run_passes(pass_fn, h, state, cfg.frozen_passes)
    if cfg.frozen_passes:
      h, state = jax.lax.stop_gradient((h, state))
    _, state = _run_passes(pass_fn, h, state, cfg.passes - cfg.frozen_passes)
    return state, None

  if cfg.num_sleep_chunks:
    context = tokens_bt[:, : cfg.context_len].reshape(batch, cfg.num_sleep_chunks, cfg.window)
    fast_state, _ = jax.lax.scan(sleep_on_chunk, fast_state, jnp.swapaxes(context, 0, 1))

  first = cfg.context_len if cfg.evicts else 0  # "none": one chunk over the whole sequence
  h, fast_state = model.stack_pass(model.embed(tokens_bt[:, first:]), fast_state)
  return model.logits(h[:, cfg.context_len - first :]), fast_state


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg"))
def _full_logits(graphdef, params, tokens_bt, cfg: SleepConfig):
  predicted, _ = sleep_forward(graphdef, params, tokens_bt, cfg)
  batch, seq_len = tokens_bt.shape
  logits = jnp.zeros((batch, seq_len, predicted.shape[-1]), jnp.float32)
  return logits.at[:, cfg.context_len :].set(predicted)


def apply(model: HybridLM, tokens_bt, *, sleep_config) -> jax.Array:
  """Logits [B, T, vocab] float32 of `model` on `tokens` under the sleep schedule.

  Positions inside sleep chunks hold zeros (nothing is predicted there); prediction positions
  are exact. `sleep_config` is `config.sleep` as it comes out of a config file.
  """
  cfg = SleepConfig.from_config(sleep_config)
  tokens_bt = jnp.asarray(tokens_bt)
  if tokens_bt.ndim != 2:
    raise ValueError(f"tokens must be [batch, seq_len], got shape {tokens_bt.shape}")
  cfg.check_sequence(tokens_bt.shape[1])
  graphdef, state = nnx.split(model)
  return _full_logits(graphdef, nnx.to_pure_dict(state), tokens_bt, cfg)
