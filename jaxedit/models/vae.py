"""AutoencoderKL in the diffusers layout: the pixel <-> latent path for real images.

Editing real photographs at scale happens in latent space: FLUX.1's VAE maps RGB in [-1, 1]
to 16 channels at 1/8 resolution, and the normalised latents are patchified 2x2 into the Flux
transformer's 64 input channels (`editor.patchify` packs (c ph pw), as diffusers' Flux
pipelines do). Arrays are NHWC (JAX's convolution layout). Parameter names are diffusers'
state-dict names with `.i` written `_i` (`down_blocks.0` -> `down_blocks_0`), so
`interop.vae_diffusers` maps pretrained weights by name alone.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

DOWN_BLOCK = "DownEncoderBlock2D"
UP_BLOCK = "UpDecoderBlock2D"
# diffusers AutoencoderKL constructor defaults: what a config.json that omits a key means.
_DIFFUSERS_DEFAULTS = {
    "in_channels": 3, "out_channels": 3, "down_block_types": (DOWN_BLOCK,),
    "up_block_types": (UP_BLOCK,), "block_out_channels": (64,), "layers_per_block": 1,
    "act_fn": "silu", "latent_channels": 4, "norm_num_groups": 32, "scaling_factor": 0.18215,
    "shift_factor": None, "latents_mean": None, "latents_std": None, "use_quant_conv": True,
    "use_post_quant_conv": True, "mid_block_add_attention": True,
}
_EPS = 1e-6  # every GroupNorm of the diffusers VAE (resnets, attention, conv_norm_out)


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """diffusers AutoencoderKL fields that change the maths; defaults: the FLUX.1 VAE."""

  in_channels: int = 3
  out_channels: int = 3
  latent_channels: int = 16
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  norm_num_groups: int = 32
  scaling_factor: float = 0.3611
  shift_factor: float = 0.1159
  use_quant_conv: bool = False
  use_post_quant_conv: bool = False
  mid_block_add_attention: bool = True
  dtype: Dtype = jnp.float32  # compute; GroupNorm always runs in float32
  param_dtype: Dtype = jnp.float32

  @property
  def downscale(self) -> int:
    """Pixels per latent along each side."""
    return 2 ** (len(self.block_out_channels) - 1)

  @classmethod
  def from_diffusers_config(cls, config: Mapping[str, Any], **overrides) -> VAEConfig:
    """A VAEConfig from a diffusers `config.json` dict (missing keys take diffusers'
    defaults; shift_factor None means 0); `overrides` set e.g. dtype. Raises ValueError for
    block types, activations or per-channel latent statistics this module does not build."""
    c = {**_DIFFUSERS_DEFAULTS, **config}
    n = len(c["block_out_channels"])
    errors = [f"{key} {list(c[key])} (need {n} x {block!r})"
              for key, block in (("down_block_types", DOWN_BLOCK), ("up_block_types", UP_BLOCK))
              if list(c[key]) != [block] * n]
    if c["act_fn"] != "silu":
      errors.append(f"act_fn {c['act_fn']!r} (need 'silu')")
    if c["latents_mean"] is not None or c["latents_std"] is not None:
      errors.append("per-channel latents_mean/latents_std")
    if errors:
      raise ValueError(f"unsupported diffusers AutoencoderKL config: {'; '.join(errors)}")
    return cls(in_channels=c["in_channels"], out_channels=c["out_channels"],
               latent_channels=c["latent_channels"],
               block_out_channels=tuple(c["block_out_channels"]),
               layers_per_block=c["layers_per_block"], norm_num_groups=c["norm_num_groups"],
               scaling_factor=c["scaling_factor"], shift_factor=c["shift_factor"] or 0.0,
               use_quant_conv=c["use_quant_conv"], use_post_quant_conv=c["use_post_quant_conv"],
               mid_block_add_attention=c["mid_block_add_attention"], **overrides)


def diffusers_config(cfg: VAEConfig) -> dict[str, Any]:
  """diffusers AutoencoderKL constructor kwargs for a VAEConfig."""
  n = len(cfg.block_out_channels)
  return {
      "in_channels": cfg.in_channels,
      "out_channels": cfg.out_channels,
      "down_block_types": (DOWN_BLOCK,) * n,
      "up_block_types": (UP_BLOCK,) * n,
      "block_out_channels": tuple(cfg.block_out_channels),
      "layers_per_block": cfg.layers_per_block,
      "act_fn": "silu",
      "latent_channels": cfg.latent_channels,
      "norm_num_groups": cfg.norm_num_groups,
      "scaling_factor": cfg.scaling_factor,
      "shift_factor": cfg.shift_factor,
      "use_quant_conv": cfg.use_quant_conv,
      "use_post_quant_conv": cfg.use_post_quant_conv,
      "mid_block_add_attention": cfg.mid_block_add_attention,
  }


def conv(cfg: VAEConfig, features: int, kernel: int = 3, stride: int = 1, padding: Any = 1,
         name: str | None = None) -> nn.Conv:
  return nn.Conv(features, (kernel, kernel), strides=stride, padding=padding, dtype=cfg.dtype,
                 param_dtype=cfg.param_dtype, name=name)


def group_norm(cfg: VAEConfig, x: jax.Array, name: str) -> jax.Array:
  """GroupNorm computed in float32 (two-pass variance, like torch), returned in x's dtype."""
  norm = nn.GroupNorm(num_groups=cfg.norm_num_groups, epsilon=_EPS, dtype=jnp.float32,
                      param_dtype=cfg.param_dtype, use_fast_variance=False, name=name)
  return norm(x.astype(jnp.float32)).astype(x.dtype)


class ResnetBlock(nn.Module):
  """norm-SiLU-conv twice plus a (1x1-projected where channels change) skip."""

  cfg: VAEConfig
  features: int

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    h = conv(cfg, self.features, name="conv1")(nn.silu(group_norm(cfg, x, "norm1")))
    h = conv(cfg, self.features, name="conv2")(nn.silu(group_norm(cfg, h, "norm2")))
    if x.shape[-1] != self.features:
      x = conv(cfg, self.features, kernel=1, padding=0, name="conv_shortcut")(x)
    return x + h


class Attention(nn.Module):
  """Single-head self-attention over all positions (head dim = channels, as the VAE's mid
  blocks set attention_head_dim to the channel count), with a residual connection."""

  cfg: VAEConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    height, c = x.shape[1], x.shape[-1]
    dense = lambda name: nn.Dense(c, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name)
    h = einops.rearrange(group_norm(cfg, x, "group_norm"), "b h w c -> b (h w) 1 c")
    out = jax.nn.dot_product_attention(dense("to_q")(h), dense("to_k")(h), dense("to_v")(h))
    out = einops.rearrange(out, "b (h w) 1 c -> b h w c", h=height)
    return x + dense("to_out_0")(out)


class Downsample(nn.Module):
  """Stride-2 3x3 conv after zero-padding only the bottom and right edges."""

  cfg: VAEConfig

  @nn.compact
  def __call__(self, x):
    return conv(self.cfg, x.shape[-1], stride=2, padding=((0, 1), (0, 1)), name="conv")(x)


class Upsample(nn.Module):
  """Nearest-neighbour 2x, then a 3x3 conv."""

  cfg: VAEConfig

  @nn.compact
  def __call__(self, x):
    x = einops.repeat(x, "b h w c -> b (h 2) (w 2) c")
    return conv(self.cfg, x.shape[-1], name="conv")(x)


class MidBlock(nn.Module):
  cfg: VAEConfig

  @nn.compact
  def __call__(self, x):
    x = ResnetBlock(self.cfg, x.shape[-1], name="resnets_0")(x)
    if self.cfg.mid_block_add_attention:
      x = Attention(self.cfg, name="attentions_0")(x)
    return ResnetBlock(self.cfg, x.shape[-1], name="resnets_1")(x)


class Block(nn.Module):
  """A diffusers DownEncoderBlock2D / UpDecoderBlock2D: resnets, then a resampler."""

  cfg: VAEConfig
  features: int
  num_resnets: int
  resample: str | None  # "down", "up" or None (the last block of each side)

  @nn.compact
  def __call__(self, x):
    for i in range(self.num_resnets):
      x = ResnetBlock(self.cfg, self.features, name=f"resnets_{i}")(x)
    if self.resample == "down":
      x = Downsample(self.cfg, name="downsamplers_0")(x)
    elif self.resample == "up":
      x = Upsample(self.cfg, name="upsamplers_0")(x)
    return x


class Encoder(nn.Module):
  """Images (B, H, W, in_channels) -> moments (B, H/f, W/f, 2 * latent_channels)."""

  cfg: VAEConfig

  @nn.compact
  def __call__(self, images):
    cfg = self.cfg
    x = conv(cfg, cfg.block_out_channels[0], name="conv_in")(images.astype(cfg.dtype))
    last = len(cfg.block_out_channels) - 1
    for i, features in enumerate(cfg.block_out_channels):
      x = Block(cfg, features, cfg.layers_per_block, "down" if i < last else None,
                name=f"down_blocks_{i}")(x)
    x = MidBlock(cfg, name="mid_block")(x)
    x = nn.silu(group_norm(cfg, x, "conv_norm_out"))
    return conv(cfg, 2 * cfg.latent_channels, name="conv_out")(x)


class Decoder(nn.Module):
  """Latents (B, h, w, latent_channels) -> images (B, h*f, w*f, out_channels)."""

  cfg: VAEConfig

  @nn.compact
  def __call__(self, latents):
    cfg = self.cfg
    x = conv(cfg, cfg.block_out_channels[-1], name="conv_in")(latents.astype(cfg.dtype))
    x = MidBlock(cfg, name="mid_block")(x)
    last = len(cfg.block_out_channels) - 1
    for i, features in enumerate(reversed(cfg.block_out_channels)):
      x = Block(cfg, features, cfg.layers_per_block + 1, "up" if i < last else None,
                name=f"up_blocks_{i}")(x)
    x = nn.silu(group_norm(cfg, x, "conv_norm_out"))
    return conv(cfg, cfg.out_channels, name="conv_out")(x)


class AutoencoderKL(nn.Module):
  """KL autoencoder; images are NHWC in [-1, 1]. Call a method with
  `model.apply(variables, x, method=AutoencoderKL.encode)`."""

  cfg: VAEConfig

  def setup(self):
    cfg = self.cfg
    self.encoder = Encoder(cfg)
    self.decoder = Decoder(cfg)
    latent = cfg.latent_channels
    self.quant_conv = conv(cfg, 2 * latent, 1, padding=0) if cfg.use_quant_conv else None
    self.post_quant_conv = conv(cfg, latent, 1, padding=0) if cfg.use_post_quant_conv else None

  def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Images -> the diagonal Gaussian posterior's (mean, logvar), logvar clipped to
    [-30, 20] as diffusers does."""
    moments = self.encoder(images)
    if self.quant_conv is not None:
      moments = self.quant_conv(moments)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def decode(self, latents: jax.Array) -> jax.Array:
    """Raw (unnormalised) latents -> images."""
    if self.post_quant_conv is not None:
      latents = self.post_quant_conv(latents)
    return self.decoder(latents)

  def encode_latents(self, images: jax.Array, key: jax.Array | None = None) -> jax.Array:
    """Images -> normalised latents `(z - shift) * scale`, the diffusion model's input space.
    z is the posterior mean (diffusers' "argmax" mode, what the Kontext pipeline conditions
    on), or a posterior sample given `key`."""
    mean, logvar = self.encode(images)
    z = mean
    if key is not None:
      z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)
    return (z - self.cfg.shift_factor) * self.cfg.scaling_factor

  def decode_latents(self, latents: jax.Array) -> jax.Array:
    """Normalised latents -> images (inverse of `encode_latents`' normalisation)."""
    return self.decode(latents / self.cfg.scaling_factor + self.cfg.shift_factor)

  def __call__(self, images: jax.Array) -> jax.Array:
    """Reconstruction through the posterior mean; it touches every parameter, so `init`
    uses it."""
    return self.decode(self.encode(images)[0])
