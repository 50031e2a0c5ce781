"""Small building layers: dense projections, RMSNorm, rotary positions, causal depthwise conv.

Every parameter is an `nnx.Param` carrying two pieces of metadata that the trainer reads:
  * `logical_axes`: one logical axis name per dimension (mapped to mesh axes by the rules
    table in `sleep_jax.parallel`), and
  * `optimizer`: "muon" for the hidden 2-D weight matrices, "adamw" for everything else
    (embeddings, output head, norm scales, conv filters, gate projections, biases).

Shape legend: B batch, T tokens, D d_model, H heads, K/V key/value head dims, F MLP width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

MUON = "muon"
ADAMW = "adamw"


def param(
  value: jax.Array, logical_axes: tuple[str | None, ...], optimizer: str = ADAMW
) -> nnx.Param:
  """An `nnx.Param` tagged with its logical axes and optimizer group."""
  if len(logical_axes) != value.ndim:
    raise ValueError(f"logical_axes {logical_axes} do not match shape {value.shape}")
  return nnx.Param(value, logical_axes=logical_axes, optimizer=optimizer)


class Dense(nnx.Module):
  """y = x @ kernel (+ bias). LeCun-normal init (std = fan_in**-0.5), zero bias."""

  def __init__(
    self,
    in_features: int,
    out_features: int,
    *,
    logical_axes: tuple[str, str],
    optimizer: str,
    rngs: nnx.Rngs,
    init_scale: float = 1.0,
    use_bias: bool = False,
  ):
    std = init_scale * in_features**-0.5
    shape = (in_features, out_features)
    kernel = std * jax.random.truncated_normal(rngs.params(), -2.0, 2.0, shape)
    self.kernel = param(kernel, logical_axes, optimizer)
    self.bias = param(jnp.zeros((out_features,)), logical_axes[1:]) if use_bias else None

  def __call__(self, x: jax.Array, result_dtype=None) -> jax.Array:
    """x @ kernel in x's dtype; the result in `result_dtype` (default x's), summed in float32."""
    result_dtype = result_dtype or x.dtype
    y = jnp.einsum(
      "...i,io->...o", x, self.kernel[...].astype(x.dtype), preferred_element_type=result_dtype
    )
    return y if self.bias is None else y + self.bias[...].astype(result_dtype)


def _groups_of_equals(keys: list) -> list[list[int]]:
  """Indices grouped by equal key, groups in order of first appearance."""
  groups: dict = {}
  for index, key in enumerate(keys):
    groups.setdefault(key, []).append(index)
  return list(groups.values())


def _stack_at(arrays: list[jax.Array], indices: list[int]) -> jax.Array:
  """The arrays at `indices` stacked on a new second-to-last axis."""
  return jnp.stack([arrays[i] for i in indices], axis=-2)


def _unstack(y: jax.Array, axis: int) -> list[jax.Array]:
  # One split rather than n index slices: its transpose is one concatenation, where the
  # slices' would be a padded copy per part and a sum of them.
  return [part.squeeze(axis) for part in jnp.split(y, y.shape[axis], axis=axis)]


def project_together(x: jax.Array, *layers: Dense, result_dtype=None) -> tuple[jax.Array, ...]:
  """(layer(x, result_dtype) for layer in layers) for Dense layers that read the same x, in few
  matmuls.

  Layers of one output width and the same logical axes share one matmul against their kernels
  stacked on a new leading axis, [n, in, out]: a kernel sharded over its output axis stays
  sharded the same way, and every layer keeps its own parameter (and its own Muon update).
  Where a step is bound by the number of kernels it launches (the CPU at small widths), one
  wide matmul beats n narrow ones, forward and in both backward products.
  """
  outputs: list[jax.Array | None] = [None] * len(layers)
  for group in _groups_of_equals([_projection_kind(layer) for layer in layers]):
    if len(group) == 1:
      outputs[group[0]] = layers[group[0]](x, result_dtype)
      continue
    products = project_stacked(x, *(layers[i] for i in group), result_dtype=result_dtype)
    for i, part in zip(group, _unstack(products, axis=-2)):
      outputs[i] = part
  return tuple(outputs)


def _projection_kind(layer: Dense) -> tuple:
  return layer.kernel.shape[1], layer.kernel.get_metadata().get("logical_axes")


def project_stacked(x: jax.Array, *layers: Dense, result_dtype=None) -> jax.Array:
  """The layers' outputs stacked on a new second-to-last axis, [..., n, out], in one matmul.

  The layers share their output width and logical axes (see `project_together`).
  """
  if len({_projection_kind(layer) for layer in layers}) != 1:
    raise ValueError("project_stacked: the layers differ in output width or logical axes")
  result_dtype = result_dtype or x.dtype
  kernels = jnp.stack([layer.kernel[...] for layer in layers]).astype(x.dtype)
  products = jnp.einsum("...i,nio->...no", x, kernels, preferred_element_type=result_dtype)
  if all(layer.bias is None for layer in layers):
    return products
  biases = [jnp.zeros(products.shape[-1]) if l.bias is None else l.bias[...] for l in layers]
  return products + jnp.stack(biases).astype(result_dtype)


class RMSNorm(nnx.Module):
  """Root-mean-square norm over the last axis with a learned scale (computed in float32)."""

  def __init__(self, dim: int, *, logical_axis: str = "embed", eps: float = 1e-6):
    self.scale = param(jnp.ones((dim,)), (logical_axis,))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return (x32 * self.scale[...]).astype(x.dtype)


def rotary(
  x_bthd: jax.Array, positions_t: jax.Array, base: float, scaling: float = 1.0
) -> jax.Array:
  """Rotary position embedding (rotate-half form) applied to the last axis.

  Args:
    x_bthd: queries or keys [B, T, H, Dh] (Dh even).
    positions_t: integer positions [T]; the sleep schedule restarts them at 0 in every chunk.
    base: the rotary wavelength base.
    scaling: linear position scaling (positions are divided by it; 1: none).

  Returns:
    The rotated array, same shape and dtype.
  """
  half = x_bthd.shape[-1] // 2
  inv_freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  positions = positions_t.astype(jnp.float32)
  if scaling != 1.0:
    positions = positions / scaling
  angles = positions[:, None] * inv_freq[None, :]  # [T, half]
  sin = jnp.sin(angles)[None, :, None, :]
  cos = jnp.cos(angles)[None, :, None, :]
  x1, x2 = jnp.split(x_bthd.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x_bthd.dtype)


class CausalDepthwiseConv(nnx.Module):
  """Short causal depthwise convolution over time, y_t = sum_j w_j * x_{t-j}.

  The inputs before the call's first token are the `tail` (the last width-1 inputs of the
  previous call) or zeros. Under sleep the paper's convention resets it at every chunk and
  every pass (`sleep.conv_state="reset"`); "carry" hands the tail across chunk boundaries, and
  streaming inference carries it from token to token within a window.
  """

  def __init__(self, channels: int, width: int, *, logical_axis: str, rngs: nnx.Rngs):
    bound = width**-0.5
    weight = jax.random.uniform(rngs.params(), (width, channels), minval=-bound, maxval=bound)
    self.weight = param(weight, ("conv", logical_axis))

  def __call__(
    self, x_btc: jax.Array, tail: jax.Array | None = None
  ) -> tuple[jax.Array, jax.Array]:
    """(x [B,T,C], tail [B,width-1,C] or None for zeros) -> (y [B,T,C], the new tail)."""
    return _convolve(x_btc, self.weight[...], tail)


def pad_with_tail(x_bt: jax.Array, tail: jax.Array | None, width: int) -> jax.Array:
  """x [B,T,...] with the width-1 inputs before it in front: the tail, or zeros if None."""
  if tail is None:
    return jnp.pad(x_bt, ((0, 0), (width - 1, 0)) + ((0, 0),) * (x_bt.ndim - 2))
  return jnp.concatenate([tail.astype(x_bt.dtype), x_bt], axis=1)


def _convolve(x_bt, weight_w, tail=None):
  """`CausalDepthwiseConv` on x [B,T,...] with weight [W,...] (the same trailing dims)."""
  padded = pad_with_tail(x_bt, tail, weight_w.shape[0])
  return causal_depthwise_conv(padded, weight_w.astype(x_bt.dtype)), padded[:, x_bt.shape[1] :]


def convolve_together(
  xs: list[jax.Array], convs: list[CausalDepthwiseConv], tails=None
) -> list[tuple[jax.Array, jax.Array]]:
  """[conv(x, tail) for each x, conv, tail], inputs of equal width stacked into one call.

  Args:
    xs: inputs [B,T,C_j] of one length T.
    convs: one `CausalDepthwiseConv` per input, of its width.
    tails: one tail [B,width-1,C_j] per input, or None for zeros.

  Returns:
    One (y [B,T,C_j], new tail) per input, as the convolutions one by one would.
  """
  tails = tails or (None,) * len(xs)
  results: list[tuple[jax.Array, jax.Array] | None] = [None] * len(xs)
  for group in _groups_of_equals([x.shape[-1] for x in xs]):
    if len(group) == 1:
      results[group[0]] = convs[group[0]](xs[group[0]], tails[group[0]])
      continue
    group_tails = None if tails[group[0]] is None else [tails[i] for i in group]
    y, new_tails = convolve_stacked(_stack_at(xs, group), [convs[i] for i in group], group_tails)
    for i, y_i, tail_i in zip(group, _unstack(y, -2), new_tails):
      results[i] = (y_i, tail_i)
  return results


def convolve_stacked(
  x_btnc: jax.Array, convs: list[CausalDepthwiseConv], tails=None
) -> tuple[jax.Array, list[jax.Array]]:
  """The convolutions of inputs stacked on the second-to-last axis, in one call.

  Args:
    x_btnc: inputs [B,T,n,C], input j for convolution j.
    convs: n `CausalDepthwiseConv` of width C.
    tails: n tails [B,width-1,C], or None for zeros.

  Returns:
    (y [B,T,n,C], the n new tails [B,width-1,C]).
  """
  tail = None if tails is None else jnp.stack(tails, axis=-2)
  weight = jnp.stack([conv.weight[...] for conv in convs], axis=-2)
  y, new_tail = _convolve(x_btnc, weight, tail)
  return y, _unstack(new_tail, -2)


def _taps(padded_btc: jax.Array, width: int) -> list[jax.Array]:
  """Tap j of every output token: the input j steps in its past, [B,T,C] per j."""
  t = padded_btc.shape[1] - width + 1
  return [padded_btc[:, width - 1 - j : width - 1 - j + t] for j in range(width)]


@jax.custom_vjp
def causal_depthwise_conv(padded_btc: jax.Array, weight_wc: jax.Array) -> jax.Array:
  """y_t = sum_j w_j * x_{t-j} over inputs already padded by width-1 tokens in front.

  x is [B, W-1+T, ...] and w [W, ...], the same trailing dims (channels, or stacked
  convolutions' [n, C]). Width is tiny (4), so shifted multiplies beat a convolution op. The
  backward pass is written out (`_conv_backward`) for the filter's gradient.
  """
  return sum(w * tap for w, tap in zip(weight_wc, _taps(padded_btc, weight_wc.shape[0])))


def _conv_forward(padded_btc, weight_wc):
  return causal_depthwise_conv(padded_btc, weight_wc), (padded_btc, weight_wc)


def _conv_backward(residuals, dy_btc):
  """d padded: each tap's weighted cotangent shifted back; d weight: one reduction.

  Left to autodiff, the filter's gradient is a sum over (B, T) per tap that XLA:CPU fuses with
  the whole elementwise chain producing dy (SiLU and L2-norm backward, transposes) and
  recomputes for every tap and channel: once the slowest kernels of the CPU train step. Here
  dy is computed once (the barrier keeps its producers out of the reduction) and the sum runs
  over B*T as one leading axis: XLA:CPU reduced one major axis 6x faster than two here, and
  a matmul with the channels as its batch (the previous form) ran 8x slower than that.
  """
  padded_btc, weight_wc = residuals
  width = weight_wc.shape[0]
  dy_btc = jax.lax.optimization_barrier(dy_btc)
  taps_xwc = jnp.stack(_taps(padded_btc, width), axis=2).reshape((-1,) + weight_wc.shape)
  dy_x1c = dy_btc.reshape((-1, 1) + weight_wc.shape[1:])
  d_weight = jnp.sum(taps_xwc.astype(jnp.float32) * dy_x1c.astype(jnp.float32), axis=0)
  pad = lambda j: ((0, 0), (width - 1 - j, j)) + ((0, 0),) * (dy_btc.ndim - 2)
  d_padded = sum(jnp.pad(w * dy_btc, pad(j)) for j, w in enumerate(weight_wc))
  return d_padded, d_weight.astype(weight_wc.dtype)


causal_depthwise_conv.defvjp(_conv_forward, _conv_backward)


def dynamic_causal_conv(padded_btc: jax.Array, kernels_btwc: jax.Array) -> jax.Array:
  """A causal depthwise convolution whose filter differs per token (Jet blocks' conv on V).

  y_t = sum_w kernels[t, w] * x_{t-(W-1)+w}: tap W-1 is the current token, tap 0 the oldest.

  Args:
    padded_btc: inputs [B, W-1+T, C], the W-1 tokens before the call in front.
    kernels_btwc: one filter per token [B, T, W, C].

  Returns:
    [B, T, C].
  """
  width, t = kernels_btwc.shape[2], kernels_btwc.shape[1]
  return sum(kernels_btwc[:, :, w] * padded_btc[:, w : w + t] for w in range(width))


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """x / ||x|| over the last axis, in float32 (the delta rule assumes unit-norm keys)."""
  x32 = x.astype(jnp.float32)
  inverse_norm = jax.lax.rsqrt(jnp.sum(jnp.square(x32), axis=-1, keepdims=True) + eps)
  return (x32 * inverse_norm).astype(x.dtype)
