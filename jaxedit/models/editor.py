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
import numpy as np

from jaxedit.models import layers
from jaxedit.models.flux import FluxConfig, FluxTransformer, layer_norm
from jaxedit.models.layers import dense
from jaxedit.models.vae import VAEConfig

# The Flux layer stacks: scanned, one parameter tree each; unrolled, `{name}_{i}` per layer.
FLUX_STACKS = ("transformer_blocks", "single_transformer_blocks")

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# Keys of the config's `model` section that may differ from a run being fine-tuned (or whose
# architecture a run takes); all others must match it (scan_layers too: scanned and unrolled
# layers are differently shaped parameter trees).
FREE_MODEL_KEYS = ("lora_rank", "lora_alpha", "lora_targets", "dtype", "param_dtype",
                   "remat_policy", "attention", "splash_block", "architecture", "guidance",
                   "vae.init_from")  # where the same VAE's weights are read from


@dataclasses.dataclass(frozen=True)
class TextConfig:
  vocab_size: int = 512
  width: int = 128
  num_layers: int = 2
  num_heads: int = 4
  max_len: int = 32
  # Grounding: n > 0 predicts which cells of an n x n grid over the source image the
  # instruction's edit acts on, and adds n * n layout tokens that carry it (CellGrounding).
  layout_grid: int = 0
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
  """Pre-LN bidirectional transformer over token ids; returns (hidden states, pooled, cell
  logits). With `layout_grid` > 0 the hidden states end with the layout tokens of
  `CellGrounding` (which also reads the source image) and the cell logits are its; None
  otherwise."""

  cfg: TextConfig

  @nn.compact
  def __call__(self, ids, mask, source=None):
    cfg = self.cfg
    embed = nn.Embed(cfg.vocab_size, cfg.width, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                     embedding_init=nn.with_logical_partitioning(
                         nn.initializers.normal(0.02), ("vocab", "embed")), name="embed")
    pos = self.param("position", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                              (None, "embed")),
                     (cfg.max_len, cfg.width), cfg.param_dtype)
    x = layers.embed_lookup(embed, ids) + pos[:ids.shape[1]].astype(cfg.dtype)
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
    if not cfg.layout_grid:
      return x, pooled, None
    if source is None:
      raise ValueError("a text encoder with a layout grid grounds the instruction on the "
                       "source image: pass `source`")
    layout, cell_logits = CellGrounding(cfg, name="grounding")(ids, mask, source)
    return jnp.concatenate([x, layout], axis=1), pooled, cell_logits


class CellGrounding(nn.Module):
  """Which cells of an n x n grid over the source image (n = `layout_grid`) the
  instruction's edit acts on, and n * n layout tokens that tell the transformer; returns
  (tokens, logits).

  Its own text encoder (the same architecture, without a grid) embeds the instruction. A
  cell's logit is a text-only term (an MLP from the pooled text to n * n logits: cells named
  in words, "at row 2, column 3") plus a match term (an MLP on each source cell's pixels,
  its learned position and the pooled text: cells named by content, "the red circle").
  Trained by `flow.grounding_loss` from the pixels each edit changes. Layout token i is a
  shared learned vector plus a shared "here" vector scaled by cell i's probability, and
  `layout_ids` puts it at cell i's RoPE position. Why: a Flux transformer places content at
  a cell within a hundred steps when a token at that cell carries one cell-independent
  signal, but does not learn to bind "row 2, column 3" to a position from the flow loss
  alone (README, Editor SFT). The probabilities enter the tokens without gradient and the
  encoder is the grounding's own, so only the grounding loss trains this module's encoder
  and heads (a text-only head on the editor's own encoder reached 10.9% validation success
  at step 1000, the same head with its own encoder 68%).
  """

  cfg: TextConfig

  @nn.compact
  def __call__(self, ids, mask, source):
    cfg, n = self.cfg, self.cfg.layout_grid
    _, pooled, _ = TextEncoder(dataclasses.replace(cfg, layout_grid=0), name="encoder")(
        ids, mask)
    by_text = dense(cfg, n * n, ("mlp", None), "text_out")(
        jax.nn.gelu(dense(cfg, cfg.width, ("embed", "mlp"), "text_fc")(pooled)))
    cells = patchify(source.astype(cfg.dtype), source.shape[1] // n)  # (B, n*n, pixels)
    position = self.param("cell_position", nn.with_logical_partitioning(
        nn.initializers.normal(0.02), (None, "embed")), (n * n, cfg.width), cfg.param_dtype)
    e = dense(cfg, cfg.width, (None, "embed"), "cell_embed")(cells) + position.astype(cfg.dtype)
    h = jax.nn.gelu(dense(cfg, cfg.width, ("embed", "mlp"), "cell_fc")(e)
                    + dense(cfg, cfg.width, ("embed", "mlp"), "text_proj")(pooled)[:, None])
    h = jax.nn.gelu(dense(cfg, cfg.width, ("mlp", "embed"), "match_fc")(h))
    cell_logits = dense(cfg, 1, ("embed", None), "match_out")(h)[..., 0] + by_text
    base, here = (self.param(name, nn.with_logical_partitioning(nn.initializers.normal(1.0),
                                                                ("embed",)),
                             (cfg.width,), cfg.param_dtype).astype(cfg.dtype)
                  for name in ("layout_base", "layout_here"))
    gate = jax.nn.sigmoid(jax.lax.stop_gradient(cell_logits))[..., None].astype(cfg.dtype)
    return base + gate * here, cell_logits.astype(jnp.float32)


def layout_ids(layout_grid: int, grid: tuple[int, int]) -> np.ndarray:
  """(n*n, 3) RoPE ids of the layout tokens: (0, row, column) at the centre of the image
  tokens each cell covers, so a layout token sits where its cell's target tokens sit."""
  if grid[0] % layout_grid or grid[1] % layout_grid:
    raise ValueError(f"model.text_layout_grid {layout_grid} must divide the "
                     f"{grid[0]}x{grid[1]} token grid")
  centres = [(np.arange(layout_grid) + 0.5) * (g / layout_grid) - 0.5 for g in grid]
  rows, cols = np.meshgrid(*centres, indexing="ij")
  return np.stack([np.zeros(rows.size), rows.reshape(-1), cols.reshape(-1)], -1)


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
  def __call__(self, x_t, t, source, text: dict, guidance=None, with_cell_logits=False):
    """The velocity; with `with_cell_logits`, (velocity, cell logits or None)."""
    cfg = self.cfg
    cell_logits = text_ids = None
    if cfg.text is not None:
      context, pooled, cell_logits = TextEncoder(cfg.text, name="text_encoder")(
          text["ids"], text["mask"], source)
      if cfg.text.layout_grid:
        text_ids = np.concatenate([np.zeros((text["ids"].shape[1], 3)),
                                   layout_ids(cfg.text.layout_grid, cfg.grid)])
    else:
      context, pooled = text["context"], text["pooled"]
    p = cfg.patch_size
    grid = (x_t.shape[1] // p, x_t.shape[2] // p)  # any bucket's shape, not only the config's
    v = FluxTransformer(cfg.flux, name="transformer")(
        patchify(x_t, p), t, context, pooled, grid, source_tokens=patchify(source, p),
        guidance=guidance, text_ids=text_ids)
    v = unpatchify(v, p, grid).astype(jnp.float32)
    return (v, cell_logits) if with_cell_logits else v


def init_params(model: "Editor", rng, *inputs) -> dict:
  """The editor's initial parameters (boxed), the same draw with scanned or unrolled layers."""
  cfg = model.cfg
  scanned = model if cfg.flux.scan_layers else Editor(
      dataclasses.replace(cfg, flux=dataclasses.replace(cfg.flux, scan_layers=True)))
  return layers.init_as_scanned(model, scanned, FLUX_STACKS, rng, *inputs)


def editor_config(model: ml_collections.ConfigDict, image_size: int,
                  vocab_size: int) -> EditorConfig:
  if model.dtype not in DTYPES or model.param_dtype not in DTYPES:
    raise ValueError(f"model.dtype/param_dtype must be one of {sorted(DTYPES)}")
  dtype, param_dtype = DTYPES[model.dtype], DTYPES[model.param_dtype]
  splash_block = model.splash_block
  layers.check_splash_block(splash_block, "model.splash_block")
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
    layout_grid = model.text_layout_grid
    if layout_grid < 0:
      raise ValueError(f"model.text_layout_grid must be >= 0, got {layout_grid}")
    text = TextConfig(vocab_size, model.text_width, model.text_layers, model.text_heads,
                      model.text_max_len, layout_grid, dtype, param_dtype)
    context_dim = pooled_dim = model.text_width
  elif model.text_encoder == "precomputed":
    if model.text_layout_grid:
      raise ValueError("model.text_layout_grid needs the 'shapes' text encoder; precomputed "
                       "embeddings carry no grounding head")
    if model.context_dim <= 0:
      raise ValueError("model.context_dim must be set (> 0) for precomputed text embeddings")
    text, context_dim = None, model.context_dim
    pooled_dim = model.pooled_dim or model.context_dim
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
      attention=model.attention,
      splash_block=splash_block)
  if text is not None and text.layout_grid:
    layout_ids(text.layout_grid, (size // model.patch_size,) * 2)  # raises if it cannot fit
  return EditorConfig(image_size=size, channels=channels, patch_size=model.patch_size,
                      flux=flux, text=text)


def uses_vae(model: ml_collections.ConfigDict) -> bool:
  """Whether the editor works on VAE latents (configs saved before `model.vae` do not)."""
  return "vae" in model and model.vae.enabled


def vae_config(model: ml_collections.ConfigDict) -> VAEConfig:
  """The VAE of the `model` section (its `vae` entry), with the model's dtypes; the latents'
  shift and scale are FLUX.1's until a folder's are read (jaxedit.codec)."""
  v = model.vae
  return VAEConfig(latent_channels=v.latent_channels,
                   block_out_channels=tuple(v.block_out_channels),
                   layers_per_block=v.layers_per_block, norm_num_groups=v.norm_num_groups,
                   use_quant_conv=v.use_quant_conv, use_post_quant_conv=v.use_post_quant_conv,
                   mid_block_add_attention=v.mid_block_add_attention,
                   dtype=DTYPES[model.dtype], param_dtype=DTYPES[model.param_dtype])
