"""bfloat16 compute (mixed precision): the paper configs' bfloat16 variants stay within 1e-2 of
float32, the matmuls take bfloat16 operands, and the residual stream stays float32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sleep_jax
from configs import depo as depo_configs
from configs import rule110 as rule110_configs
from sleep_jax.data import tasks
from sleep_jax.model.lm import build_model, zero_fast_state


def models_and_batch(module, variant, num_examples=32):
  """(float32 model, the bfloat16 variant's model with the same parameters, config, batch)."""
  config = module.get_config(variant)
  config.model.fast_weight_impl, config.model.attention_impl = "chunked", "xla"  # the CPU's
  low = build_model(config.model, seed=0)
  config.model.dtype = "float32"
  high = build_model(config.model, seed=0)
  batch = tasks.get_task(config.task).generate(np.random.default_rng(0), num_examples)
  return high, low, config, batch


@pytest.mark.parametrize(
  "module, variant", [(rule110_configs, "paper_bf16"), (depo_configs, "paper_fig3_bf16")]
)
@pytest.mark.parametrize("passes", [1, pytest.param(2, marks=pytest.mark.integration)])
def test_bfloat16_variant_logits_stay_within_1e_2_of_float32(module, variant, passes):
  high, low, config, batch = models_and_batch(module, variant)
  assert module.get_config(variant).model.dtype == "bfloat16"
  config.sleep.passes = passes
  logits = [
    np.asarray(sleep_jax.apply(model, batch["tokens"], sleep_config=config.sleep))
    for model in (high, low)
  ]
  predicted = batch["loss_mask"] > 0
  want, got = (x[predicted] for x in logits)
  # Norm-wise relative error of the predicted logits (float32 itself: ~1e-7).
  assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-2
  assert not np.array_equal(got, want)  # bfloat16 did run


def test_matmuls_take_bfloat16_operands_and_the_residual_stream_stays_float32():
  _, low, config, batch = models_and_batch(rule110_configs, "paper_bf16", num_examples=2)
  tokens = batch["tokens"][:, :24]
  h = low.embed(tokens)
  assert h.dtype == jnp.float32
  jaxpr = jax.make_jaxpr(lambda h: low.stack_pass(h, zero_fast_state(low.cfg, 2)))(h)
  dots = [e for e in jaxpr.eqns if e.primitive.name == "dot_general"]
  # The projections and the MLP (the gates' [d, heads] projections stay float32, as the rule).
  widths = (low.cfg.d_model, low.cfg.mlp_dim)
  big = [
    e for e in dots if e.invars[1].aval.shape[-2] in widths and e.invars[1].aval.shape[-1] in widths
  ]
  assert len(big) == 4 * 4 and all(  # per block: the mixer's two and the MLP's two
    x.aval.dtype == jnp.bfloat16 for e in big for x in e.invars
  )
  out_h, _ = low.stack_pass(h, zero_fast_state(low.cfg, 2))
  assert out_h.dtype == jnp.float32
