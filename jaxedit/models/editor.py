"""The editor: text conditioning + Flux transformer over pixel patches of (target, source).

Text conditioning is either a small trainable encoder over token ids (the shapes world) or
precomputed embeddings fed in by the data (`context`, `pooled`), as at scale where a frozen
T5/CLIP or the planner LM embeds the instruction once.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from jaxedit.models.flux import FluxConfig, FluxTransformer, layer_norm
from jaxedit.models.layers import dense
from jaxedit.models.vae import VAEConfig

# Flow-GRPO's Flux LoRA targets: attention projections and the double blocks' MLPs.
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out_0", "add_q_proj", "add_k_proj", "add_v_proj",
                "to_add_out", "net_0_proj", "net_2")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class TextConfig:
  vocab_size: int = 512
  width: int = 128
  num_layers: int = 2
  num_heads: int = 4
  max_len: int = 32
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32


@dataclasses.dataclass(frozen=True)
class EditorConfig:
  image_size: int = 32
  channels: int = 3
  patch_size: int = 4
  flux: FluxConfig = FluxConfig()
  text: TextConfig | None = TextConfig()  # None: precomputed embeddings

  @property
  def grid(self) -> tuple[int, int]:
    n = self.image_size // self.patch_size
    return n, n


class TextEncoder(nn.Module):
  """Pre-LN bidirectional transformer over token ids; returns (hidden states, pooled)."""

  cfg: TextConfig

  @nn.compact
  def __call__(self, ids, mask):
    cfg = self.cfg
    embed = nn.Embed(cfg.vocab_size, cfg.width, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                     embedding_init=nn.with_logical_partitioning(
                         nn.initializers.normal(0.02), ("vocab", "embed")), name="embed")
    pos = self.param("position", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                              (None, "embed")),
                     (cfg.max_len, cfg.width), cfg.param_dtype)
    x = embed(ids) + pos[:ids.shape[1]].astype(cfg.dtype)
    head_dim = cfg.width // cfg.num_heads
    bias = jnp.where(mask[:, None, None, :], 0.0, -1e9).astype(cfg.dtype)  # (B, 1, 1, L)
    for i in range(cfg.num_layers):
      h = layer_norm(x, 1e-5)
      split = lambda y: y.reshape(*y.shape[:2], cfg.num_heads, head_dim)
      q, k, v = (split(dense(cfg, cfg.width, ("embed", "heads"), f"layer_{i}_{n}")(h))
                 for n in ("q", "k", "v"))
      a = jax.nn.dot_product_attention(q, k, v, bias=bias)
      x = x + dense(cfg, cfg.width, ("heads", "embed"), f"layer_{i}_o")(a.reshape(x.shape))
      h = jax.nn.gelu(dense(cfg, 4 * cfg.width, ("embed", "mlp"), f"layer_{i}_fc1")(
          layer_norm(x, 1e-5)))
      x = x + dense(cfg, cfg.width, ("mlp", "embed"), f"layer_{i}_fc2")(h)
    x = layer_norm(x, 1e-5)
    weights = mask[..., None].astype(x.dtype)
    pooled = (x * weights).sum(1) / jnp.maximum(weights.sum(1), 1)
    return x, pooled


def patchify(images, p: int):
  """(B, H, W, C) -> (B, (H/p)*(W/p), C*p*p), channel order (c, ph, pw) as diffusers packs."""
  return einops.rearrange(images, "b (h ph) (w pw) c -> b (h w) (c ph pw)", ph=p, pw=p)


def unpatchify(tokens, p: int, grid: tuple[int, int]):
  return einops.rearrange(tokens, "b (h w) (c ph pw) -> b (h ph) (w pw) c", h=grid[0],
                          w=grid[1], ph=p, pw=p)


class Editor(nn.Module):
  """Velocity of the noisy target image x_t given the source image and the instruction."""

  cfg: EditorConfig

  @nn.compact
  def __call__(self, x_t, t, source, text: dict, guidance=None):
    cfg = self.cfg
    if cfg.text is not None:
      context, pooled = TextEncoder(cfg.text, name="text_encoder")(text["ids"], text["mask"])
    else:
      context, pooled = text["context"], text["pooled"]
    p = cfg.patch_size
    v = FluxTransformer(cfg.flux, name="transformer")(
        patchify(x_t, p), t, context, pooled, cfg.grid, source_tokens=patchify(source, p),
        guidance=guidance)
    return unpatchify(v, p, cfg.grid).astype(jnp.float32)


def model_config() -> ml_collections.ConfigDict:
  """The `model` section of editor configs."""
  return ml_collections.ConfigDict({
      "patch_size": 4,
      "num_heads": 4,
      "head_dim": 32,
      "axes_dims_rope": (8, 12, 12),
      "num_layers": 2,
      "num_single_layers": 4,
      "mlp_ratio": 4.0,
      "qk_norm_init": 1.0,
      # LoRA (rank 0: none). Targets are Dense names in the diffusers layout.
      "lora_rank": 0,
      "lora_alpha": 0.0,  # 0: equal to the rank (scale 1)
      "lora_targets": LORA_TARGETS,
      "guidance_embeds": False,
      "dtype": "float32",
      "param_dtype": "float32",
      "scan_layers": True,
      "remat_policy": "none",
      "attention": "auto",  # auto (cuDNN flash attention on GPU in bf16/fp16) | xla | cudnn
      "text_encoder": "shapes",  # shapes | precomputed
      "text_width": 128,
      "text_layers": 2,
      "text_heads": 4,
      "text_max_len": 32,
      "context_dim": 0,  # precomputed embeddings only: their width
      "pooled_dim": 0,  # precomputed embeddings only: the pooled embedding's width (0: same)
      # The pixel-latent path for real images: the transformer works on the latents of a
      # diffusers-layout AutoencoderKL (models.vae; defaults: the FLUX.1 VAE).
      "vae": {"enabled": False, "latent_channels": 16,
              "block_out_channels": (128, 256, 512, 512), "layers_per_block": 2,
              "norm_num_groups": 32, "scaling_factor": 0.3611, "shift_factor": 0.1159},
  })


def editor_config(model: ml_collections.ConfigDict, image_size: int,
                  vocab_size: int) -> EditorConfig:
  if model.dtype not in DTYPES or model.param_dtype not in DTYPES:
    raise ValueError(f"model.dtype/param_dtype must be one of {sorted(DTYPES)}")
  dtype, param_dtype = DTYPES[model.dtype], DTYPES[model.param_dtype]
  if model.lora_rank < 0 or (model.lora_rank and not model.lora_targets):
    raise ValueError("model.lora_rank must be >= 0, with model.lora_targets set when > 0")
  channels, size = 3, image_size
  if uses_vae(model):
    downscale = vae_config(model).downscale
    channels, size = model.vae.latent_channels, image_size // downscale
    if size * downscale != image_size:
      raise ValueError(f"image_size {image_size} is not divisible by the VAE's {downscale}x "
                       "downsampling")
  if size % model.patch_size:
    raise ValueError(f"the {size}x{size} {'latents' if uses_vae(model) else 'images'} are "
                     f"not divisible by model.patch_size {model.patch_size}")
  if model.text_encoder == "shapes":
    text = TextConfig(vocab_size, model.text_width, model.text_layers, model.text_heads,
                      model.text_max_len, dtype, param_dtype)
    context_dim = pooled_dim = model.text_width
  elif model.text_encoder == "precomputed":
    if model.context_dim <= 0:
      raise ValueError("model.context_dim must be set (> 0) for precomputed text embeddings")
    text, context_dim = None, model.context_dim
    pooled_dim = model.get("pooled_dim", 0) or model.context_dim
  else:
    raise ValueError(f"model.text_encoder must be 'shapes' or 'precomputed', got "
                     f"{model.text_encoder!r}")
  flux = FluxConfig(
      in_channels=channels * model.patch_size**2, num_layers=model.num_layers,
      num_single_layers=model.num_single_layers, attention_head_dim=model.head_dim,
      num_attention_heads=model.num_heads, joint_attention_dim=context_dim,
      pooled_projection_dim=pooled_dim, guidance_embeds=model.guidance_embeds,
      axes_dims_rope=tuple(model.axes_dims_rope), mlp_ratio=model.mlp_ratio,
      qk_norm_init=model.qk_norm_init, lora_rank=model.lora_rank,
      lora_alpha=model.lora_alpha or model.lora_rank, lora_targets=tuple(model.lora_targets),
      dtype=dtype,
      param_dtype=param_dtype, scan_layers=model.scan_layers, remat_policy=model.remat_policy,
      attention=model.get("attention", "auto"))  # runs saved before the key: auto
  return EditorConfig(image_size=size, channels=channels, patch_size=model.patch_size,
                      flux=flux, text=text)


def uses_vae(model: ml_collections.ConfigDict) -> bool:
  """Whether the editor works on VAE latents (configs saved before `model.vae` do not)."""
  return "vae" in model and model.vae.enabled


def vae_config(model: ml_collections.ConfigDict) -> VAEConfig:
  """The VAE of the `model` section (its `vae` entry), with the model's dtypes."""
  v = model.vae
  return VAEConfig(latent_channels=v.latent_channels,
                   block_out_channels=tuple(v.block_out_channels),
                   layers_per_block=v.layers_per_block, norm_num_groups=v.norm_num_groups,
                   scaling_factor=v.scaling_factor, shift_factor=v.shift_factor,
                   dtype=DTYPES[model.dtype], param_dtype=DTYPES[model.param_dtype])
