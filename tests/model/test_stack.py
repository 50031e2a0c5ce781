"""The block stack: repeating units, stacked parameters, the scan against a plain loop, Muon."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sleep_jax import build_model
from sleep_jax.model.config import FAST_WEIGHT_KINDS, mixer_kind
from sleep_jax.model.lm import (
  LAYERS_AXIS,
  HybridLM,
  block_places,
  param_path,
  params_by_path,
  repeating_unit,
  zero_fast_state,
)
from sleep_jax.train.optim import make_optimizer

CFG = dict(
  vocab_size=6, d_model=16, num_heads=2, head_dim=8, mlp_dim=32, fast_weight_impl="chunked"
)


def params_with_metadata(model):
  """{path: nnx.Param} over the model's parameters."""
  leaves = jax.tree_util.tree_flatten_with_path(
    nnx.state(model, nnx.Param), is_leaf=lambda x: isinstance(x, nnx.Variable)
  )[0]
  return {"/".join(str(k.key) for k in path): leaf for path, leaf in leaves}


@pytest.mark.parametrize(
  "pattern, unit, repeats",
  [
    ("AGAG", "AG", 2),
    ("AGA", "AGA", 1),
    ("GGGG", "G", 4),
    ("AAGAAG", "AAG", 2),
    ("AGAGAG", "AG", 3),
    ("AGGA", "AGGA", 1),
    ("A", "A", 1),
  ],
)
def test_pattern_is_its_smallest_repeating_unit_times_r(pattern, unit, repeats):
  assert repeating_unit(pattern) == (unit, repeats)


def test_stacked_parameters_carry_a_layers_axis_and_keep_their_optimizer():
  model = build_model(CFG | dict(pattern="AGAGAG"), seed=0)
  params = params_with_metadata(model)
  for name, variable in params.items():
    axes = variable.get_metadata()["logical_axes"]
    assert len(axes) == variable.ndim, name
    assert (axes[0] == LAYERS_AXIS) == name.startswith("blocks/"), name
    if name.startswith("blocks/"):
      assert variable.shape[0] == 3, name
  q = params["blocks/0/mixer/q/kernel"]
  assert q.shape == (3, 16, 16) and q.get_metadata()["logical_axes"] == ("layers", "embed", "heads")
  assert q.get_metadata()["optimizer"] == "muon"
  assert params["blocks/1/mixer/A_log"].get_metadata()["optimizer"] == "adamw"
  # Every repetition draws its own initialisation.
  for name in ("blocks/0/mixer/q/kernel", "blocks/1/mixer/A_log", "blocks/1/mixer/conv_k/weight"):
    values = np.asarray(params[name][...])
    assert not np.array_equal(values[0], values[1]) and not np.array_equal(values[1], values[2])


def unstacked_blocks(model: HybridLM) -> list[tuple[str, str, nnx.Module]]:
  """(segment, letter, block) for every block in pattern order, cut out of the stacked params."""
  blocks = []
  for index, (segment, position, repetition) in enumerate(block_places(model.cfg)):
    graphdef, stacked = nnx.split(getattr(model, segment.attribute)[position])
    block = nnx.merge(graphdef, jax.tree.map(lambda x, r=repetition: x[r], stacked))
    blocks.append((segment.name, model.cfg.pattern[index], block))
  return blocks


def reference_stack_pass(model: HybridLM, h, fast_state, loop_passes: int = 1):
  """The stack as explicit Python loops over the unstacked blocks, in pattern order: the
  prelude once, the loop `loop_passes` x `loop_repeats` times (each then the loop norm), the
  coda once."""
  blocks = unstacked_blocks(model)
  fast_state = list(fast_state)
  for segment in ("prelude", "loop", "coda"):
    members = [
      (i, letter, block) for i, (name, letter, block) in enumerate(blocks) if name == segment
    ]
    times = loop_passes * model.cfg.loop_repeats if segment == "loop" else 1
    for _ in range(times if members else 0):
      for i, letter, block in members:
        if mixer_kind(letter) in FAST_WEIGHT_KINDS:
          layer = sum(mixer_kind(x[1]) in FAST_WEIGHT_KINDS for x in blocks[:i])
          h, (fast_state[layer], _) = block(h, (fast_state[layer], None))
        else:
          h, _ = block(h, None)
      if segment == "loop" and model.cfg.loop_norm:
        h = model.final_norm(h)
  return h, tuple(fast_state)


# The pretrained architectures' parts: Jet ("J") and sliding-window ("S") blocks, MLP-free
# (lower-case) blocks, sandwich norms, separate fast-weight widths, and a loop range with a
# prelude, a coda, loop repeats and the loop norm.
PRETRAINED_PARTS = dict(
  sliding_window=3,
  sandwich_norm=True,
  fast_heads=3,
  fast_key_dim=4,
  fast_value_dim=6,
  dconv_reduction=4,
  num_kv_heads=1,
  qkv_bias=True,
)


# R = 2 with two fast states per unit, scanned and unrolled (the default below 3 repetitions);
# R = 1 (slow: the scan of length one is the easy case).
@pytest.mark.parametrize(
  "pattern, extra",
  [
    pytest.param("AGGAGG", dict(scan_min_repeats=1), marks=pytest.mark.integration),
    ("AGGAGG", {}),
    pytest.param("AGA", {}, marks=pytest.mark.slow),
    # (with the blocks recomputed in the backward: the same values and gradients)
    pytest.param(
      "GjSJjSAJ",
      PRETRAINED_PARTS
      | dict(loop_start=1, loop_stop=6, loop_repeats=2, remat_blocks=True, scan_min_repeats=2),
      marks=pytest.mark.integration,  # ~40 s on 2 cores
    ),
    pytest.param(
      "AjAj", PRETRAINED_PARTS | dict(loop_repeats=2, loop_norm=True), marks=pytest.mark.slow
    ),
  ],
)
def test_scanned_stack_equals_a_loop_over_the_unstacked_blocks(pattern, extra):
  model = build_model(CFG | dict(pattern=pattern) | extra, seed=1)
  graphdef, params = nnx.split(model)
  params = nnx.to_pure_dict(params)
  # A Jet block starts as a static convolution (zero generator output matrix); give it a
  # generated part so that the test sees the input-dependent filter.
  params = jax.tree_util.tree_map_with_path(
    lambda keys, x: (
      0.3 * jax.random.normal(jax.random.key(5), x.shape)
      if param_path(keys).endswith("kernel_out/kernel")
      else x
    ),
    params,
  )
  keys = jax.random.split(jax.random.key(0), 8)
  h = jax.random.normal(keys[0], (2, 7, 16))
  fast_state = tuple(
    0.3 * jax.random.normal(k, s.shape) for k, s in zip(keys[1:], zero_fast_state(model.cfg, 2))
  )
  weights = jax.random.normal(keys[-1], h.shape)

  def loss(params, h, fast_state, stack_pass):
    out, new_state = stack_pass(nnx.merge(graphdef, params), h, fast_state)
    return jnp.sum(out * weights) + sum(jnp.sum(jnp.sin(s)) for s in new_state), (out, new_state)

  scanned = lambda model, h, s: model.stack_pass(h, s)
  # Jitted, each side is one compile (op by op, the reference loop was hundreds).
  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True), static_argnums=3)
  (grads, (out, new_state)) = grad(params, h, fast_state, scanned)
  (expected_grads, (expected_out, expected_state)) = grad(
    params, h, fast_state, reference_stack_pass
  )
  assert len(new_state) == sum(mixer_kind(x) in FAST_WEIGHT_KINDS for x in pattern)
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  close(out, expected_out)
  jax.tree.map(close, new_state, expected_state)
  # Gradients are float32 sums whose terms cancel (an element can be far smaller than the
  # terms summed into it), so their error is measured against the leaf's largest element.
  close_to_scale = lambda a, b: np.testing.assert_allclose(
    a, b, rtol=0, atol=1e-5 + 1e-4 * float(jnp.abs(b).max())
  )
  jax.tree.map(close_to_scale, grads, expected_grads)  # params, h and every fast-state matrix
  # Every repetition of every block parameter is used (the embedding and head are not).
  for attribute in ("prelude_blocks", "blocks", "coda_blocks"):
    for g in jax.tree.leaves(grads[0].get(attribute, {})):
      assert all(float(jnp.abs(g[r]).max()) > 0 for r in range(g.shape[0]))
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads[1:]))


def test_loop_range_splits_the_parameters_into_prelude_loop_and_coda():
  model = build_model(CFG | dict(pattern="AGAGAG", loop_start=2, loop_stop=4), seed=0)
  assert [x[:3] for x in model.layout] == [("prelude", 0, 2), ("loop", 2, 4), ("coda", 4, 6)]
  params = params_by_path(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  for prefix in ("prelude_blocks", "blocks", "coda_blocks"):
    assert params[f"{prefix}/0/mixer/q/kernel"].shape == (1, 16, 16)
  # Without a range the loop is the whole stack, with the parameter names of every checkpoint.
  whole = build_model(CFG | dict(pattern="AGAGAG"), seed=0)
  assert [x[:3] for x in whole.layout] == [("loop", 0, 6)]
  with pytest.raises(ValueError, match="loop_start"):
    build_model(CFG | dict(pattern="AGAG", loop_start=3, loop_stop=2), seed=0)
  with pytest.raises(ValueError, match="loop_norm"):
    build_model(CFG | dict(pattern="AGAG", loop_stop=2, loop_norm=True), seed=0)


def jaxpr_size(jaxpr) -> int:
  """Equations in a jaxpr, counting those of every nested jaxpr (scan bodies, custom VJPs)."""
  count = 0
  for eqn in jaxpr.eqns:
    count += 1
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      count += jaxpr_size(sub)
  return count


def traced_stack_size(pattern: str, stack_pass=None) -> int:
  model = build_model(CFG | dict(pattern=pattern, scan_min_repeats=1), seed=0)
  graphdef, params = nnx.split(model)
  stack_pass = stack_pass or (lambda model, h, s: model.stack_pass(h, s))
  fn = lambda params, h, s: stack_pass(nnx.merge(graphdef, params), h, s)
  closed = jax.make_jaxpr(fn)(params, jnp.zeros((1, 4, 16)), zero_fast_state(model.cfg, 1))
  return jaxpr_size(closed.jaxpr)


def test_remat_blocks_wraps_the_scanned_unit_in_a_checkpoint():
  def checkpoints(remat_blocks):
    model = build_model(CFG | dict(pattern="AGAG", remat_blocks=remat_blocks), seed=0)
    fn = lambda h, s: model.stack_pass(h, s)[0].sum()
    text = str(jax.make_jaxpr(jax.grad(fn))(jnp.zeros((1, 4, 16)), zero_fast_state(model.cfg, 1)))
    return text.count("remat") + text.count("checkpoint[")

  assert checkpoints(False) == 0
  assert checkpoints(True) >= 1


def test_traced_program_does_not_grow_with_depth():
  one, six = traced_stack_size("AG"), traced_stack_size("AG" * 6)
  # Only the stacking and unstacking of the fast state at the scan boundary grows with R.
  assert six - one <= 3 * 6, (one, six)
  # The test can fail: unrolled, the same stack traces to about six times the equations.
  assert traced_stack_size("AG" * 6, reference_stack_pass) > 5 * one


TRAIN = dict(
  num_steps=10,
  warmup_steps=0,
  min_lr_ratio=1.0,
  muon_lr=0.02,
  adamw_lr=1e-3,
  weight_decay=0.0,
  grad_clip=1e3,
)


def test_muon_orthogonalises_each_layer_of_a_stacked_weight_separately():
  keys = jax.random.split(jax.random.key(0), 4)
  stacked = {"w": jax.random.normal(keys[0], (2, 8, 12))}
  separate = {"a": stacked["w"][0], "b": stacked["w"][1]}
  grads = [jax.random.normal(k, (2, 8, 12)) for k in keys[1:]]

  def updates(params, split):
    optimizer = make_optimizer(TRAIN, jax.tree.map(lambda _: "muon", params))
    state, result = optimizer.init(params), []
    for g in grads:  # a few steps, so the momentum is exercised too
      update, state = optimizer.update(split(g), state, params)
      result.append(update)
    return result

  got = updates(stacked, lambda g: {"w": g})
  expected = updates(separate, lambda g: {"a": g[0], "b": g[1]})
  for u, e in zip(got, expected):
    np.testing.assert_allclose(u["w"][0], e["a"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(u["w"][1], e["b"], rtol=1e-5, atol=1e-7)
  # A Muon update is (nearly) orthogonal: its singular values bunch around one value, far from
  # those of the raw gradient.
  singular = np.linalg.svd(np.asarray(got[0]["w"][0]), compute_uv=False)
  assert singular.max() / singular.min() < 2.0


def test_the_optimizer_split_parameter_by_parameter():
  """Muon takes exactly the hidden 2-D matrices of the blocks; AdamW everything else (the paper's
  embeddings, head and norms, and (ours) the conv filters, gate projections, A_log, dt_bias)."""
  from sleep_jax.train.optim import optimizer_labels

  model = build_model(CFG | dict(pattern="AGAG"), seed=0)
  flat = params_by_path(optimizer_labels(nnx.state(model, nnx.Param)))
  muon = {
    f"blocks/{j}/{name}/kernel"
    for j, names in (
      (0, ("mixer/q", "mixer/k", "mixer/v", "mixer/o")),
      (1, ("mixer/q", "mixer/k", "mixer/v", "mixer/o", "mixer/out_gate")),
    )
    for name in names
  } | {f"blocks/{j}/mlp/{p}/kernel" for j in (0, 1) for p in ("gate", "up", "down")}
  assert {path for path, label in flat.items() if label == "muon"} == muon
  adamw = set(flat) - muon
  assert adamw == {
    "embedding",
    "head/kernel",
    "final_norm/scale",
    *(f"blocks/{j}/{norm}/scale" for j in (0, 1) for norm in ("mixer_norm", "mlp_norm")),
    "blocks/1/mixer/out_norm/scale",
    *(f"blocks/1/mixer/conv_{x}/weight" for x in "qkv"),
    "blocks/1/mixer/decay_proj/kernel",
    "blocks/1/mixer/beta_proj/kernel",
    "blocks/1/mixer/A_log",
    "blocks/1/mixer/dt_bias",
  }
