"""Flux-layout flow-matching transformer with Kontext-style in-context source tokens.

Parameters and maths map one-to-one onto diffusers `FluxTransformer2DModel` (docs/design.md
section 3); `jaxedit.interop.flux_diffusers` holds the name mapping. Every parameter carries
logical axis names; the layer stacks can be scanned (compile time flat in depth) and
rematerialised.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxedit.models import layers
from jaxedit.models.layers import RMSNorm, dense, remat, stack

Dtype = Any


@dataclasses.dataclass(frozen=True)
class FluxConfig:
  in_channels: int = 64  # packed channels per token: C * p * p
  out_channels: int | None = None
  num_layers: int = 19
  num_single_layers: int = 38
  attention_head_dim: int = 128
  num_attention_heads: int = 24
  joint_attention_dim: int = 4096
  pooled_projection_dim: int = 768
  guidance_embeds: bool = False
  axes_dims_rope: tuple[int, ...] = (16, 56, 56)
  mlp_ratio: float = 4.0
  theta: int = 10_000
  # Initial q/k RMSNorm weight. The attention logit is at most qk_norm_init**2 * sqrt(head_dim),
  # so small heads start with blunt attention and Adam grows these O(1) weights only ~lr per
  # step; starting them higher lets tiny models attend to one position (copy the source) early.
  qk_norm_init: float = 1.0
  # LoRA adapters on the Dense layers named in lora_targets (diffusers names, e.g. "to_q");
  # rank 0: none. The update is (lora_alpha / lora_rank) * A @ B with B zero-initialised.
  lora_rank: int = 0
  lora_alpha: float = 1.0
  lora_targets: tuple[str, ...] = ()
  dtype: Dtype = jnp.float32  # compute
  param_dtype: Dtype = jnp.float32
  scan_layers: bool = True
  remat_policy: str = "none"  # none | full | dots (jax.checkpoint_policies names)
  attention: str = "auto"  # auto | xla | cudnn | splash (attention_implementation)
  splash_block: int = 512  # splash attention's largest sequence block (layers.splash_attention)

  @property
  def inner_dim(self) -> int:
    return self.num_attention_heads * self.attention_head_dim

  def __post_init__(self):
    if sum(self.axes_dims_rope) != self.attention_head_dim:
      raise ValueError(f"axes_dims_rope {self.axes_dims_rope} must sum to attention_head_dim "
                       f"{self.attention_head_dim}")


def layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """LayerNorm without affine parameters, computed in float32."""
  x32 = x.astype(jnp.float32)
  mean = x32.mean(-1, keepdims=True)
  var = ((x32 - mean) ** 2).mean(-1, keepdims=True)
  return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  return x * (1 + scale[:, None]) + shift[:, None]


def gelu_tanh(x: jax.Array) -> jax.Array:
  return jax.nn.gelu(x, approximate=True)


def timestep_embedding(t: jax.Array, dim: int = 256, max_period: float = 10_000.0) -> jax.Array:
  """Sinusoidal embedding with flip_sin_to_cos (cos first) and frequency shift 0."""
  half = dim // 2
  exponent = (np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32)) / np.float32(half)
  freqs = np.exp(exponent.astype(np.float64)).astype(np.float32)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def rope_tables(ids: np.ndarray, axes_dims: tuple[int, ...], theta: int):
  """cos/sin tables (S, head_dim) for static position ids (S, num_axes), interleaved pairs.

  Computed in float64 with numpy at trace time (ids are static), as diffusers does."""
  cos, sin = [], []
  for axis, d in enumerate(axes_dims):
    freqs = 1.0 / (theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    angles = np.asarray(ids)[:, axis].astype(np.float64)[:, None] * freqs[None]
    cos.append(np.repeat(np.cos(angles), 2, axis=-1))
    sin.append(np.repeat(np.sin(angles), 2, axis=-1))
  return (jnp.asarray(np.concatenate(cos, -1), jnp.float32),
          jnp.asarray(np.concatenate(sin, -1), jnp.float32))


def apply_rope(x: jax.Array, rope) -> jax.Array:
  """x: (B, S, N, H); rotates interleaved pairs (x[2i], x[2i+1])."""
  cos, sin = rope
  x32 = x.astype(jnp.float32)
  pairs = x32.reshape(*x.shape[:-1], -1, 2)
  rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
  return (x32 * cos[None, :, None] + rotated * sin[None, :, None]).astype(x.dtype)


ATTENTION = ("auto", "xla", "cudnn", "splash")


def attention_implementation(choice: str, dtype) -> str | None:
  """The attention kernel: None (XLA's), "cudnn" (jax.nn.dot_product_attention's) or
  "splash" (the TPU's Pallas kernel). "auto" is a fused (flash) kernel where the backend
  has one: splash on TPU, cuDNN on a GPU in 16-bit compute (which it requires); XLA's
  elsewhere, which materialises the S x S scores."""
  if choice not in ATTENTION:
    raise ValueError(f"model.attention must be one of {ATTENTION}, got {choice!r}")
  if choice == "auto":
    sixteen_bit = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    backend = jax.default_backend()
    return {"tpu": "splash", "gpu": "cudnn" if sixteen_bit else None}.get(backend)
  return None if choice == "xla" else choice


def attention(cfg: "FluxConfig", q, k, v) -> jax.Array:
  """(B, S, N, H) -> (B, S, N*H), by the implementation `cfg.attention` picks."""
  implementation = attention_implementation(cfg.attention, q.dtype)
  if implementation is None:
    return layers.attention(q, k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3))
  if implementation == "splash":
    return layers.splash_attention(q, k, v, cfg.splash_block)
  out = jax.nn.dot_product_attention(q, k, v, implementation=implementation)
  return out.reshape(*out.shape[:2], -1)


class Embedder(nn.Module):
  """linear_1 -> SiLU -> linear_2 (TimestepEmbedding / PixArtAlphaTextProjection)."""

  cfg: FluxConfig

  @nn.compact
  def __call__(self, x):
    d = self.cfg.inner_dim
    x = dense(self.cfg, d, ("freq", "embed"), "linear_1")(x)
    return dense(self.cfg, d, ("mlp", "embed"), "linear_2")(nn.silu(x))


class TimeTextEmbed(nn.Module):
  cfg: FluxConfig

  @nn.compact
  def __call__(self, t, pooled, guidance=None):
    dtype = self.cfg.dtype
    temb = Embedder(self.cfg, name="timestep_embedder")(
        timestep_embedding(t * 1000).astype(dtype))
    if self.cfg.guidance_embeds:
      if guidance is None:
        raise ValueError("this model embeds guidance; pass a guidance scale")
      temb = temb + Embedder(self.cfg, name="guidance_embedder")(
          timestep_embedding(guidance * 1000).astype(dtype))
    return temb + Embedder(self.cfg, name="text_embedder")(pooled.astype(dtype))


class AdaNorm(nn.Module):
  """`linear(silu(temb))` chunked into `chunks` modulation vectors."""

  cfg: FluxConfig
  chunks: int

  @nn.compact
  def __call__(self, temb):
    mod = dense(self.cfg, self.chunks * self.cfg.inner_dim, ("embed", "mod"), "linear",
                zero_init=True)(nn.silu(temb))
    return jnp.split(mod, self.chunks, axis=-1)


class FeedForward(nn.Module):
  cfg: FluxConfig

  @nn.compact
  def __call__(self, x):
    hidden = int(self.cfg.inner_dim * self.cfg.mlp_ratio)
    x = gelu_tanh(dense(self.cfg, hidden, ("embed", "mlp"), "net_0_proj")(x))
    return dense(self.cfg, self.cfg.inner_dim, ("mlp", "embed"), "net_2")(x)


def qkv(cfg: FluxConfig, x, context: bool = False, q_rows: slice = slice(None)):
  """Per-head q, k, v with RMSNorm on q and k, created in the calling module's scope so the
  parameter names are diffusers' (to_q, ..., norm_q or add_q_proj, ..., norm_added_q).
  Queries only for the tokens `q_rows`."""
  names = (("add_q_proj", "add_k_proj", "add_v_proj", "norm_added_q", "norm_added_k")
           if context else ("to_q", "to_k", "to_v", "norm_q", "norm_k"))
  heads = lambda y: y.reshape(*y.shape[:2], cfg.num_attention_heads, cfg.attention_head_dim)
  q, k, v = (heads(dense(cfg, cfg.inner_dim, ("embed", "heads"), n)(y))
             for n, y in zip(names[:3], (x[:, q_rows], x, x)))
  q = RMSNorm(init=cfg.qk_norm_init, param_dtype=cfg.param_dtype, name=names[3])(q)
  k = RMSNorm(init=cfg.qk_norm_init, param_dtype=cfg.param_dtype, name=names[4])(k)
  return q, k, v


class JointAttention(nn.Module):
  """Double-stream attention over the joint sequence [text, image]."""

  cfg: FluxConfig

  @nn.compact
  def __call__(self, x, context, rope):
    n_text = context.shape[1]
    q, k, v = qkv(self.cfg, x)
    cq, ck, cv = qkv(self.cfg, context, context=True)
    q, k, v = (jnp.concatenate([a, b], axis=1) for a, b in ((cq, q), (ck, k), (cv, v)))
    out = attention(self.cfg, apply_rope(q, rope), apply_rope(k, rope), v)
    text_out, image_out = out[:, :n_text], out[:, n_text:]
    image_out = dense(self.cfg, self.cfg.inner_dim, ("heads", "embed"), "to_out_0")(image_out)
    text_out = dense(self.cfg, self.cfg.inner_dim, ("heads", "embed"), "to_add_out")(text_out)
    return image_out, text_out


class SelfAttention(nn.Module):
  """Single-stream attention; no output projection (proj_out of the block does it)."""

  cfg: FluxConfig

  @nn.compact
  def __call__(self, x, rope, q_rows: slice = slice(None)):
    q, k, v = qkv(self.cfg, x, q_rows=q_rows)
    q_rope = tuple(table[q_rows] for table in rope)
    return attention(self.cfg, apply_rope(q, q_rope), apply_rope(k, rope), v)


class DoubleBlock(nn.Module):
  """FluxTransformerBlock: separate weights for the text and image streams."""

  cfg: FluxConfig

  @nn.compact
  def __call__(self, carry, temb, rope):
    x, c = carry
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = AdaNorm(
        self.cfg, 6, name="norm1")(temb)
    c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = AdaNorm(
        self.cfg, 6, name="norm1_context")(temb)
    attn_x, attn_c = JointAttention(self.cfg, name="attn")(
        modulate(layer_norm(x), shift_msa, scale_msa),
        modulate(layer_norm(c), c_shift_msa, c_scale_msa), rope)
    x = x + gate_msa[:, None] * attn_x
    x = x + gate_mlp[:, None] * FeedForward(self.cfg, name="ff")(
        modulate(layer_norm(x), shift_mlp, scale_mlp))
    c = c + c_gate_msa[:, None] * attn_c
    c = c + c_gate_mlp[:, None] * FeedForward(self.cfg, name="ff_context")(
        modulate(layer_norm(c), c_shift_mlp, c_scale_mlp))
    x = nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))
    c = nn.with_logical_constraint(c, ("activation_batch", "activation_length", "activation_embed"))
    return (x, c), None


class SingleBlock(nn.Module):
  """FluxSingleTransformerBlock: one stream, attention and MLP in parallel. With `out_rows`
  (start, stop), only those tokens' outputs: every token's keys and values, but queries, MLP
  and output for those rows alone (the last block, whose other rows are discarded)."""

  cfg: FluxConfig
  out_rows: tuple[int, int] | None = None

  @nn.compact
  def __call__(self, h, temb, rope):
    cfg = self.cfg
    rows = slice(None) if self.out_rows is None else slice(*self.out_rows)
    shift, scale, gate = AdaNorm(cfg, 3, name="norm")(temb)
    n = modulate(layer_norm(h), shift, scale)
    mlp = gelu_tanh(dense(cfg, int(cfg.inner_dim * cfg.mlp_ratio), ("embed", "mlp"),
                          "proj_mlp")(n[:, rows]))
    attn = SelfAttention(cfg, name="attn")(n, rope, rows)
    out = dense(cfg, cfg.inner_dim, ("mlp", "embed"), "proj_out")(
        jnp.concatenate([attn, mlp], axis=-1))
    h = h[:, rows] + gate[:, None] * out
    h = nn.with_logical_constraint(h, ("activation_batch", "activation_length", "activation_embed"))
    return h, None


def position_ids(height: int, width: int, index: int = 0) -> np.ndarray:
  """(h*w, 3) ids of an image's tokens: (index, row, column)."""
  rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
  return np.stack([np.full(height * width, index), rows.reshape(-1), cols.reshape(-1)], -1)


class FluxTransformer(nn.Module):
  """Predicts the velocity of the target tokens.

  Args of __call__:
    tokens: (B, h*w, in_channels) packed noisy target tokens.
    t: (B,) flow time in [0, 1] (1 = noise).
    context: (B, L, joint_attention_dim) text hidden states.
    pooled: (B, pooled_projection_dim) pooled text embedding.
    grid: (h, w) of the token grid.
    source_tokens: optional (B, h*w, in_channels) source image tokens (Kontext), appended
      after the target tokens with position-id axis 0 equal to 1.
    text_ids: optional static (L, 3) RoPE ids of the context tokens (diffusers' txt_ids);
      zeros by default, as in Flux.
  """

  cfg: FluxConfig

  @nn.compact
  def __call__(self, tokens, t, context, pooled, grid, source_tokens=None, guidance=None,
               text_ids=None):
    cfg = self.cfg
    n_target = tokens.shape[1]
    if text_ids is None:
      text_ids = np.zeros((context.shape[1], 3))
    ids = [np.asarray(text_ids, np.float64), position_ids(*grid, 0)]
    if source_tokens is not None:
      tokens = jnp.concatenate([tokens, source_tokens], axis=1)
      ids.append(position_ids(*grid, 1))
    rope = rope_tables(np.concatenate(ids), cfg.axes_dims_rope, cfg.theta)

    x = dense(cfg, cfg.inner_dim, ("patch", "embed"), "x_embedder")(tokens.astype(cfg.dtype))
    temb = TimeTextEmbed(cfg, name="time_text_embed")(t, pooled, guidance)
    c = dense(cfg, cfg.inner_dim, ("joint", "embed"), "context_embedder")(context.astype(cfg.dtype))

    shared = (nn.broadcast, nn.broadcast)
    (x, c), _ = stack(DoubleBlock, cfg, cfg.num_layers, "transformer_blocks", shared)(
        (x, c), temb, rope)
    h = jnp.concatenate([c, x], axis=1)
    target = (c.shape[1], c.shape[1] + n_target)
    name, n_single = "single_transformer_blocks", cfg.num_single_layers
    if cfg.scan_layers or not n_single:
      h, _ = stack(SingleBlock, cfg, n_single, name, shared)(h, temb, rope)
      x = h[:, slice(*target)]
    else:  # unrolled, the last block computes the target tokens alone (same parameters)
      h, _ = stack(SingleBlock, cfg, n_single - 1, name, shared)(h, temb, rope)
      x, _ = remat(SingleBlock, cfg)(cfg, target, name=f"{name}_{n_single - 1}")(h, temb, rope)

    scale, shift = AdaNorm(cfg, 2, name="norm_out")(temb)  # (scale, shift), in that order
    x = modulate(layer_norm(x), shift, scale)
    out_channels = cfg.out_channels or cfg.in_channels
    return dense(cfg, out_channels, ("embed", "patch"), "proj_out", zero_init=True)(x)
