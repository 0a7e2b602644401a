"""Swin V2 building blocks as Flax NNX modules (docs/design.md, "The architecture as implemented";
paper sections 3.2-3.3; official `models/swin_transformer_v2.py`).

Tensors are NHWC. Parameters are float32; matmuls run in the module's compute `dtype`;
norms, the attention softmax and the cosine-similarity logits are computed in float32.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from swinv2_jax.models import windows as win

Dtype = Any
Pair = win.Pair

# Dense layers: trunc_normal(0.02) kernels and zero biases, as the official `_init_weights`.
# timm's trunc_normal_(std=.02), which the official _init_weights calls, cuts at +-2 absolute,
# i.e. +-100 sigma: in effect an untruncated normal of std 0.02 (flax's default cut, +-2 sigma,
# would give std 0.0176).
dense_init = nnx.initializers.truncated_normal(stddev=0.02, lower=-100.0, upper=100.0)
# logit_scale is clamped at log(1/0.01) with a Python float (a tensor clamp broke graph compilers).
MAX_LOGIT_SCALE = math.log(1.0 / 0.01)
LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm default, for parity with the official weights
# model.attention_impl: 'xla' runs every window through the einsums of `WindowAttention`;
# 'cudnn' and 'auto' send the windows of unshifted blocks through jax.nn.dot_product_attention
# ('cudnn': cuDNN's flash attention or an error; 'auto': cuDNN where it takes the shapes, else
# the same call compiled by XLA). Shifted blocks always take the einsums (see `_attend`).
ATTENTION_IMPLS = ("xla", "cudnn", "auto")
# Conv kernels: torch.nn.Conv2d's default, kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in)).
conv_kernel_init = jax.nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def conv(din: int, dout: int, patch: int, *, dtype: Dtype, rngs: nnx.Rngs):
  """A patch x patch conv with stride patch, initialised as a default torch.nn.Conv2d (kernel
  and bias U(+-1/sqrt(fan_in))): the official `_init_weights` re-initialises only Linear and
  LayerNorm, so its PatchEmbed and SimMIM decoder convs keep torch's default."""
  bound = 1.0 / math.sqrt(din * patch * patch)

  def bias_init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return nnx.Conv(din, dout, kernel_size=(patch, patch), strides=(patch, patch), padding="VALID",
                  kernel_init=conv_kernel_init, bias_init=bias_init, dtype=dtype,
                  param_dtype=jnp.float32, rngs=rngs)


def matmul_tokens(x, kernel, precision=None, preferred_element_type=None):
  """x (..., din) @ kernel (din, dout), with x flattened to (tokens, din) first: autodiff's
  weight gradient is then one product contracting the tokens of both operands, which XLA's CPU
  backend runs as it stands. Contracting the (..., din) shape instead, it copies the output
  gradient transposed and multiplies two transposed operands at a quarter of the speed (an
  MLP's forward and backward: 35% less time on a CPU)."""
  y = jax.lax.dot_general(x.reshape(-1, x.shape[-1]), kernel, (((1,), (0,)), ((), ())),
                          precision=precision, preferred_element_type=preferred_element_type)
  return y.reshape(*x.shape[:-1], kernel.shape[-1])


def _dense_dot_general(x, kernel, dimension_numbers, precision=None,
                       preferred_element_type=None, out_sharding=None):
  """nnx.Linear's `dot_general`: its contraction (x's last axis with the kernel's first) as
  `matmul_tokens`."""
  assert dimension_numbers == (((x.ndim - 1,), (0,)), ((), ())) and out_sharding is None
  return matmul_tokens(x, kernel, precision, preferred_element_type)


def dense(din: int, dout: int, *, use_bias: bool = True, dtype: Dtype, rngs: nnx.Rngs):
  return nnx.Linear(din, dout, use_bias=use_bias, kernel_init=dense_init,
                    bias_init=nnx.initializers.zeros_init(), dtype=dtype,
                    param_dtype=jnp.float32, dot_general=_dense_dot_general, rngs=rngs)


class LayerNorm(nnx.Module):
  """LayerNorm computed in float32 whatever the input dtype; the output is cast to `dtype`.

  `zero_init` starts scale and bias at 0: the res-post-norm norms of every block start so,
  which makes each block the identity at init (the official `_init_respostnorm`).
  """

  def __init__(self, dim: int, *, dtype: Dtype = jnp.float32, zero_init: bool = False):
    self.scale = nnx.Param(jnp.zeros(dim) if zero_init else jnp.ones(dim))
    self.bias = nnx.Param(jnp.zeros(dim))
    self.dtype = dtype

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + LAYER_NORM_EPS)
    return (y * self.scale[...] + self.bias[...]).astype(self.dtype)


def drop_path(x, rate, key):
  """Stochastic depth per sample (timm semantics, rescaled by 1/keep). `rate` may be traced."""
  if key is None:
    return x
  keep = 1.0 - jnp.asarray(rate, jnp.float32)
  mask = jax.random.bernoulli(key, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(mask, x / keep.astype(x.dtype), jnp.zeros_like(x))


class PatchEmbed(nnx.Module):
  """Conv k=s=patch, then LayerNorm. No absolute position embedding in Swin V2."""

  def __init__(self, patch_size: int, in_chans: int, embed_dim: int, *, dtype: Dtype,
               rngs: nnx.Rngs):
    # torch's default Conv2d init, as the official PatchEmbed.proj (models/swin_transformer_v2.py).
    self.proj = conv(in_chans, embed_dim, patch_size, dtype=dtype, rngs=rngs)
    self.norm = LayerNorm(embed_dim, dtype=dtype)

  def __call__(self, x):
    return self.norm(self.proj(x))


class ContinuousPositionBias(nnx.Module):
  """Log-spaced continuous position bias: meta MLP over relative coords, then 16*sigmoid.

  The 16*sigmoid follows the official code, not the paper.
  """

  def __init__(self, window: Pair, pretrained_window: Pair, num_heads: int, *,
               hidden: int = 512, rngs: nnx.Rngs):
    self.window = window
    self.pretrained_window = pretrained_window
    # The bias MLP always runs in float32: it is tiny and feeds the softmax.
    self.fc1 = dense(2, hidden, use_bias=True, dtype=jnp.float32, rngs=rngs)
    self.fc2 = dense(hidden, num_heads, use_bias=False, dtype=jnp.float32, rngs=rngs)

  def __call__(self):
    table = jnp.asarray(win.relative_coords_table(self.window, self.pretrained_window))
    bias_table = self.fc2(jax.nn.relu(self.fc1(table.reshape(-1, 2))))  # (T, heads)
    index = win.relative_position_index(self.window)
    bias = jnp.take(bias_table, index.reshape(-1), axis=0).reshape(*index.shape, -1)  # (N, N, h)
    return 16.0 * jax.nn.sigmoid(bias.transpose(2, 0, 1))  # (heads, N, N)


@jax.custom_vjp
def softmax(logits):
  """Softmax over the last axis, normalised by one reciprocal per row. As a custom VJP that
  keeps only the probabilities for the backward pass, it spares XLA's CPU backend the full-size
  broadcast of the denominator that jax.nn.softmax's division leaves in the train step (the
  attention core's forward and backward: 10% less time on a CPU)."""
  unnormalised = jnp.exp(logits - jax.lax.stop_gradient(logits.max(-1, keepdims=True)))
  return unnormalised * (1.0 / unnormalised.sum(-1, keepdims=True))


def _softmax_fwd(logits):
  probs = softmax(logits)
  return probs, probs


def _softmax_bwd(probs, grad):
  return (probs * (grad - (grad * probs).sum(-1, keepdims=True)),)


softmax.defvjp(_softmax_fwd, _softmax_bwd)


def fused_attention_implementation(attention_impl: str, dtype: Dtype, head_dim: int,
                                   window: Pair) -> str | None:
  """The `implementation` of jax.nn.dot_product_attention for a block's unshifted windows, or
  None where the einsums run. Raises a ValueError naming the setting when 'cudnn' cannot run."""
  if attention_impl not in ATTENTION_IMPLS:
    raise ValueError(f"attention_impl={attention_impl!r}: one of {', '.join(ATTENTION_IMPLS)}")
  if attention_impl == "xla":
    return None
  device = jax.devices()[0]
  problem = None
  if device.platform != "gpu" or "cuda" not in device.client.platform_version.lower():
    problem = f"needs a CUDA GPU, and this backend is {device.platform}"
  elif jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
    problem = f"takes bfloat16 compute (cuDNN flash attention has no {jnp.dtype(dtype).name})"
  elif head_dim % 8 or head_dim > 128:
    problem = f"needs a head dim that is a multiple of 8 up to 128, got {head_dim}"
  elif (window[0] * window[1]) % 2:
    # cuDNN's bias gradient needs an even sequence length.
    problem = (f"needs an even number of tokens per window, and a {window[0]}x{window[1]} "
               "window has an odd number")
  if problem is None:
    return "cudnn"
  if attention_impl == "cudnn":
    raise ValueError(f"attention_impl='cudnn' {problem}; use 'auto', which takes cuDNN where "
                     "it can")
  return "xla"


def _l2_normalize(x, scale=1.0, eps=1e-12):
  """scale * F.normalize(x), i.e. scale * x / max(||x||, eps), as x times one reciprocal square
  root per vector: a division per element costs several multiplications on a CPU."""
  sum_sq = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
  return x * (scale * jax.lax.rsqrt(jnp.maximum(sum_sq, eps * eps)))


class WindowAttention(nnx.Module):
  """Scaled cosine attention inside windows, with the continuous position bias.

  `chunks` > 1 is the paper's sequential self-attention (section 3.5): the windows are
  processed in `chunks` pieces one after another (each rematerialised in the backward pass),
  so only one piece's (heads, N, N) logits are alive at a time. `implementation` ('xla' or
  'cudnn', from `fused_attention_implementation`) sends unshifted windows through
  jax.nn.dot_product_attention; None keeps the einsums.
  """

  def __init__(self, dim: int, num_heads: int, window: Pair, pretrained_window: Pair, *,
               chunks: int = 1, implementation: str | None = None, dtype: Dtype,
               rngs: nnx.Rngs):
    if dim % num_heads:
      raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
    self.num_heads = num_heads
    self.chunks = chunks
    self.implementation = implementation
    self.dtype = dtype
    self.qkv = dense(dim, 3 * dim, use_bias=False, dtype=dtype, rngs=rngs)
    # One qkv kernel as the official code (its products are taken apart in `_attend`); query
    # and value biases are parameters, the key bias is a constant zero (official code).
    self.q_bias = nnx.Param(jnp.zeros(dim))
    self.v_bias = nnx.Param(jnp.zeros(dim))
    self.logit_scale = nnx.Param(jnp.full((num_heads, 1, 1), math.log(10.0)))
    self.cpb_mlp = ContinuousPositionBias(window, pretrained_window, num_heads, rngs=rngs)
    self.proj = dense(dim, dim, dtype=dtype, rngs=rngs)

  def _attend(self, x, regions, position_bias):
    """x: (b, nW, N, C) windows; regions: (nW, N) shift-region ids or None (no shift)."""
    b, nw, n, c = x.shape
    heads = self.num_heads
    # q, k and v as three products with slices of the one qkv kernel: each comes out
    # contiguous, where slices of one (tokens, 3C) product cost a copy each in the forward and
    # a concatenation in the backward (a window attention's forward and backward: 15% less
    # time on a CPU).
    kernel = self.qkv.kernel[...].astype(self.dtype)
    x = x.astype(self.dtype)
    q = matmul_tokens(x, kernel[:, :c]) + self.q_bias[...].astype(self.dtype)
    k = matmul_tokens(x, kernel[:, c:2 * c])  # no key bias (official code)
    v = matmul_tokens(x, kernel[:, 2 * c:]) + self.v_bias[...].astype(self.dtype)
    q, k, v = (t.reshape(b, nw, n, heads, c // heads) for t in (q, k, v))  # (b, nW, N, h, d)
    # The logit scale folded into q: (s q) . k = s (q . k), the official logits up to rounding,
    # with the scale applied to N x d queries instead of N x N logits (forward and backward).
    scale = jnp.exp(jnp.minimum(self.logit_scale[...], MAX_LOGIT_SCALE)).reshape(heads, 1)
    q = _l2_normalize(q.astype(jnp.float32), scale).astype(self.dtype)
    k = _l2_normalize(k.astype(jnp.float32)).astype(self.dtype)
    if regions is None and self.implementation is not None:
      # The shift mask never gets here: the official code adds -100, not -inf, and with a
      # logit scale near its clamp of 100 cosine logits span +-100, so a masked entry can keep
      # weight where a boolean mask would give it none.
      bias = position_bias[None]  # (1, h, N, N): the bias whose gradient cuDNN computes
      if self.implementation == "cudnn":
        bias = bias.astype(self.dtype)  # cuDNN takes the bias in the input dtype
      windows = lambda t: t.reshape(b * nw, n, heads, c // heads)
      out = jax.nn.dot_product_attention(windows(q), windows(k), windows(v), bias=bias,
                                         scale=1.0, implementation=self.implementation)
      return self.proj(out.reshape(b, nw, n, c))
    # Heads before tokens first: the two products are then plain batched (N, d) x (d, N) and
    # (N, N) x (N, d) matrix products, where contracting the (N, h, d) layout in place made
    # XLA's CPU backend fuse strided products with the softmax at a third of the speed (the
    # attention core at SwinV2-T's first level: 86 -> 37 ms a forward, PyTorch 33).
    q, k, v = (t.swapaxes(2, 3) for t in (q, k, v))  # (b, nW, h, N, d)
    # Logits accumulate in float32: at a logit scale of up to 100, bf16 logits would be
    # quantised to steps of 0.5.
    logits = jnp.einsum("bwhnd,bwhmd->bwhnm", q, k, preferred_element_type=jnp.float32)
    logits = logits + position_bias
    if regions is not None:
      logits = logits + win.shift_attention_mask(regions)[:, None]
    probs = softmax(logits).astype(self.dtype)
    out = jnp.einsum("bwhnm,bwhmd->bwhnd", probs, v)
    return self.proj(out.swapaxes(2, 3).reshape(b, nw, n, c))

  def __call__(self, x, regions: np.ndarray | None):
    position_bias = self.cpb_mlp()
    # cuDNN's flash attention keeps no (N, N) logits, so its windows need no pieces.
    if self.chunks == 1 or (regions is None and self.implementation == "cudnn"):
      return self._attend(x, regions, position_bias)
    b, nw, n, c = x.shape
    per = nw // self.chunks
    xs = x.reshape(b, self.chunks, per, n, c).swapaxes(0, 1)
    regions = None if regions is None else jnp.asarray(regions).reshape(self.chunks, per, n)

    @jax.checkpoint
    def piece(args):
      xc, rc = args
      return self._attend(xc, rc, position_bias)

    out = jax.lax.map(piece, (xs, regions))
    return out.swapaxes(0, 1).reshape(b, nw, n, c)


def gelu(x):
  """Exact GELU, x * (1 + erf(x / sqrt 2)) / 2, in the form torch computes it. XLA's erf is one
  rational polynomial; jax.nn.gelu(approximate=False) goes through erfc, which costs an exp
  more per element (an MLP's forward and backward: 10% less time on a CPU)."""
  return x * (0.5 + 0.5 * jax.lax.erf(x * (1.0 / math.sqrt(2.0))))


class Mlp(nnx.Module):
  def __init__(self, dim: int, hidden: int, *, dtype: Dtype, rngs: nnx.Rngs):
    self.fc1 = dense(dim, hidden, dtype=dtype, rngs=rngs)
    self.fc2 = dense(hidden, dim, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    return self.fc2(gelu(self.fc1(x)))


class SwinV2Block(nnx.Module):
  """Res-post-norm block: x + DP(norm1(attn(shift(x)))), then x + DP(norm2(mlp(x)))."""

  def __init__(self, dim: int, num_heads: int, feat_size: Pair, window: Pair, shift: Pair,
               pretrained_window: Pair, *, mlp_ratio: float = 4.0, attention_chunks: int = 1,
               attention_impl: str = "xla", dtype: Dtype, rngs: nnx.Rngs):
    self.feat_size = feat_size
    self.window, self.shift = win.clamp_window(feat_size, window, shift)
    num_windows = (feat_size[0] // self.window[0]) * (feat_size[1] // self.window[1])
    # A piece holds at least one window, so one setting serves a fine-tune and its smaller
    # pretraining resolution (G: 9 pieces of level 3 at 1536, one window at 192).
    attention_chunks = min(attention_chunks, num_windows)
    if num_windows % attention_chunks:
      raise ValueError(
          f"attention_chunks={attention_chunks} must divide the {num_windows} windows of a "
          f"{feat_size[0]}x{feat_size[1]} feature map with window {self.window}")
    # Only unshifted windows take the fused call (WindowAttention._attend says why).
    implementation = None if any(self.shift) else fused_attention_implementation(
        attention_impl, dtype, dim // num_heads, self.window)
    self.attn = WindowAttention(dim, num_heads, self.window, pretrained_window,
                                chunks=attention_chunks, implementation=implementation,
                                dtype=dtype, rngs=rngs)
    self.norm1 = LayerNorm(dim, dtype=dtype, zero_init=True)
    self.mlp = Mlp(dim, int(dim * mlp_ratio), dtype=dtype, rngs=rngs)
    self.norm2 = LayerNorm(dim, dtype=dtype, zero_init=True)

  def __call__(self, x, drop_rate=0.0, key=None):
    keys = (None, None) if key is None else tuple(jax.random.split(key))
    sh, sw = self.shift
    shifted = jnp.roll(x, (-sh, -sw), axis=(1, 2)) if (sh or sw) else x
    windows = win.partition_windows(shifted, self.window)
    regions = win.shift_region_ids(self.feat_size, self.window, self.shift)
    attended = win.merge_windows(self.attn(windows, regions), self.window, self.feat_size)
    if sh or sw:
      attended = jnp.roll(attended, (sh, sw), axis=(1, 2))
    x = x + drop_path(self.norm1(attended), drop_rate, keys[0])
    return x + drop_path(self.norm2(self.mlp(x)), drop_rate, keys[1])


class PatchMerging(nnx.Module):
  """V2 order: concat the 2x2 neighbours -> Dense(4C -> 2C, no bias) -> LayerNorm(2C)."""

  def __init__(self, dim: int, *, dtype: Dtype, rngs: nnx.Rngs):
    self.reduction = dense(4 * dim, 2 * dim, use_bias=False, dtype=dtype, rngs=rngs)
    self.norm = LayerNorm(2 * dim, dtype=dtype)

  def __call__(self, x):
    # Channel order x(0::2,0::2), x(1::2,0::2), x(0::2,1::2), x(1::2,1::2) as the official code.
    x = jnp.concatenate(
        [x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], axis=-1)
    return self.norm(self.reduction(x))
