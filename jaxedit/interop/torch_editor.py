"""An exported editor run in plain PyTorch: diffusers' FluxTransformer2DModel, the shapes text
encoder rebuilt in torch from `text_encoder.safetensors`, a latent editor's AutoencoderKL
(`vae/`), and an Euler sampling loop with classifier-free guidance, the same maths as
jaxedit's sampler (docs/design.md sections 3, 4).

    editor = torch_editor.load("OUT")
    images = torch_editor.sample(editor, sources_uint8, ["make the red circle blue"], noise)
"""

from __future__ import annotations

import dataclasses
import json
import os

import einops
import numpy as np
import tokenizers
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FluxTransformer2DModel
from safetensors.torch import load_file

from jaxedit.text import tokenizer as tokenizer_lib


def _layer_norm(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
  return F.layer_norm(x, x.shape[-1:], eps=eps)


class TextEncoder(torch.nn.Module):
  """jaxedit's shapes text encoder (models.editor.TextEncoder): pre-LN transformer over ids,
  returning (hidden states, masked-mean pooled); with a layout grid the hidden states end
  with the layout tokens of its grounding on the source image (models.editor.CellGrounding).
  Weights keep flax names and (in, out)."""

  def __init__(self, weights: dict[str, torch.Tensor], num_layers: int, num_heads: int,
               layout_grid: int = 0):
    super().__init__()
    weights = {k.replace(".", "/"): v for k, v in weights.items()}
    encoder = "grounding/encoder/"
    self.w = torch.nn.ParameterDict({k: torch.nn.Parameter(v, False) for k, v in weights.items()
                                     if not k.startswith(encoder)})
    self.num_layers, self.num_heads, self.layout_grid = num_layers, num_heads, layout_grid
    if layout_grid:
      self.grounding_encoder = TextEncoder(
          {k[len(encoder):]: v for k, v in weights.items() if k.startswith(encoder)},
          num_layers, num_heads)

  def _dense(self, name: str, x: torch.Tensor) -> torch.Tensor:
    return x @ self.w[f"{name}/kernel"] + self.w[f"{name}/bias"]

  def forward(self, ids: torch.Tensor, mask: torch.Tensor, source: torch.Tensor | None = None):
    """`source`: (B, H, W, C) in [-1, 1], needed with a layout grid."""
    x = self.w["embed/embedding"][ids] + self.w["position"][:ids.shape[1]]
    bias = torch.where(mask[:, None, None, :], 0.0, -1e9).to(x.dtype)
    heads = lambda y: einops.rearrange(y, "b l (h d) -> b h l d", h=self.num_heads)
    for i in range(self.num_layers):
      h = _layer_norm(x)
      q, k, v = (heads(self._dense(f"layer_{i}_{n}", h)) for n in "qkv")
      a = einops.rearrange(F.scaled_dot_product_attention(q, k, v, attn_mask=bias),
                           "b h l d -> b l (h d)")
      x = x + self._dense(f"layer_{i}_o", a)
      h = F.gelu(self._dense(f"layer_{i}_fc1", _layer_norm(x)), approximate="tanh")
      x = x + self._dense(f"layer_{i}_fc2", h)
    x = _layer_norm(x)
    weights = mask[..., None].to(x.dtype)
    pooled = (x * weights).sum(1) / weights.sum(1).clamp(min=1)
    if not self.layout_grid:
      return x, pooled
    n, gelu = self.layout_grid, lambda y: F.gelu(y, approximate="tanh")
    g = lambda name, y: self._dense(f"grounding/{name}", y)
    text = self.grounding_encoder(ids, mask)[1]
    by_text = g("text_out", gelu(g("text_fc", text)))
    cells = einops.rearrange(source, "b (h ph) (w pw) c -> b (h w) (c ph pw)", h=n, w=n)
    e = g("cell_embed", cells) + self.w["grounding/cell_position"]
    h = gelu(g("cell_fc", e) + g("text_proj", text)[:, None])
    logits = g("match_out", gelu(g("match_fc", h)))[..., 0] + by_text
    layout = (self.w["grounding/layout_base"]
              + torch.sigmoid(logits)[..., None] * self.w["grounding/layout_here"])
    return torch.cat([x, layout], 1), pooled


def layout_ids(layout_grid: int, grid: int) -> torch.Tensor:
  """(n*n, 3) RoPE ids of the layout tokens: (0, row, column) at their cells' centres."""
  centres = (torch.arange(layout_grid, dtype=torch.float64) + 0.5) * (grid / layout_grid) - 0.5
  rows, cols = torch.meshgrid(centres, centres, indexing="ij")
  return torch.stack([torch.zeros(rows.numel(), dtype=torch.float64), rows.reshape(-1),
                      cols.reshape(-1)], -1).float()


@dataclasses.dataclass
class ExportedEditor:
  transformer: FluxTransformer2DModel
  text_encoder: TextEncoder
  tokenizer: tokenizers.Tokenizer
  meta: dict  # jaxedit_editor.json
  vae: AutoencoderKL | None = None  # a latent editor's (the folder's vae/)

  def encode(self, images: torch.Tensor) -> torch.Tensor:
    """NHWC [-1, 1] images -> the transformer's space (normalised posterior-mean latents)."""
    if self.vae is None:
      return images
    c = self.vae.config
    mean = self.vae.encode(images.permute(0, 3, 1, 2)).latent_dist.mode()
    return ((mean - (c.shift_factor or 0.0)) * c.scaling_factor).permute(0, 2, 3, 1)

  def decode(self, x: torch.Tensor) -> torch.Tensor:
    if self.vae is None:
      return x
    c = self.vae.config
    z = x.permute(0, 3, 1, 2) / c.scaling_factor + (c.shift_factor or 0.0)
    return self.vae.decode(z).sample.permute(0, 2, 3, 1)


def load(folder: str, dtype: torch.dtype = torch.float32) -> ExportedEditor:
  """An editor written by `jaxedit export --to diffusers` (with the shapes text encoder)."""
  with open(os.path.join(folder, "jaxedit_editor.json")) as f:
    meta = json.load(f)
  if meta["text_encoder"] is None:
    raise ValueError(f"{folder} has no text encoder (precomputed embeddings): feed context "
                     "and pooled embeddings to the transformer yourself")
  transformer = FluxTransformer2DModel.from_pretrained(folder, torch_dtype=dtype).eval()
  weights = {k: v.to(dtype) for k, v in
             load_file(os.path.join(folder, "text_encoder.safetensors")).items()}
  te = meta["text_encoder"]
  text_encoder = TextEncoder(weights, te["num_layers"], te["num_heads"],
                             te.get("layout_grid", 0)).eval()
  tok = tokenizers.Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
  vae = None
  if meta.get("vae"):
    vae = AutoencoderKL.from_pretrained(os.path.join(folder, meta["vae"]),
                                        torch_dtype=dtype).eval()
  return ExportedEditor(transformer, text_encoder, tok, meta, vae)


def position_ids(height: int, width: int, index: int) -> torch.Tensor:
  rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
  return torch.stack([torch.full((height * width,), index), rows.reshape(-1),
                      cols.reshape(-1)], -1).float()


def sigmas(num_steps: int, shift: float) -> np.ndarray:
  """num_steps + 1 times from 1 down to 0 with the Flux/SD3 shift, in float32."""
  t = np.linspace(1.0, 0.0, num_steps + 1, dtype=np.float32)
  return (shift * t / (1 + (shift - 1) * t)).astype(np.float32)


@torch.no_grad()
def sample(editor: ExportedEditor, sources: np.ndarray, instructions: list[str],
           noise: np.ndarray, num_steps: int | None = None, shift: float | None = None,
           guidance_scale: float | None = None) -> np.ndarray:
  """uint8 edits of uint8 (N, H, W, 3) `sources` from `noise` at t = 1 (the transformer's
  input shape: (N, H, W, 3), or a latent editor's (N, H/f, W/f, C)), by Euler steps of the
  exported transformer (settings default to the run's `sample` section)."""
  m, s = editor.meta, editor.meta["sample"]
  num_steps = num_steps or s["num_steps"]
  shift = shift or s["shift"]
  guidance_scale = s["guidance_scale"] if guidance_scale is None else guidance_scale
  p, size = m["patch_size"], m["image_size"]
  pixels = size
  if editor.vae is not None:
    pixels = size * 2 ** (len(editor.vae.config.block_out_channels) - 1)
  if sources.shape[1:] != (pixels, pixels, 3):
    raise ValueError(f"sources must be (N, {pixels}, {pixels}, 3), got {sources.shape}")
  dtype = editor.transformer.dtype
  pack = lambda x: einops.rearrange(x, "b (h ph) (w pw) c -> b (h w) (c ph pw)", ph=p, pw=p)
  grid = size // p
  image = editor.encode(torch.from_numpy(np.asarray(sources, np.float32) / 127.5 - 1.0).to(
      dtype))
  source = pack(image)
  ids, mask = tokenizer_lib.encode(editor.tokenizer, list(instructions),
                                   m["text_encoder"]["text_len"])
  ids, mask = torch.from_numpy(ids).long(), torch.from_numpy(mask)
  cond = editor.text_encoder(ids, mask, image)
  uncond = editor.text_encoder(torch.zeros_like(ids), torch.zeros_like(mask), image)
  img_ids = torch.cat([position_ids(grid, grid, 0), position_ids(grid, grid, 1)])
  txt_ids = torch.zeros(ids.shape[1], 3)
  if editor.text_encoder.layout_grid:
    txt_ids = torch.cat([txt_ids, layout_ids(editor.text_encoder.layout_grid, grid)])
  n = grid * grid

  def velocity(x, t, text):
    context, pooled = text
    out = editor.transformer(hidden_states=torch.cat([x, source], 1),
                             encoder_hidden_states=context, pooled_projections=pooled,
                             timestep=t, img_ids=img_ids, txt_ids=txt_ids,
                             return_dict=False)[0]
    return out[:, :n]

  x = pack(torch.tensor(np.asarray(noise, np.float32), dtype=dtype))
  times = sigmas(num_steps, shift)
  for t, t_next in zip(times[:-1], times[1:]):
    tt = torch.full((x.shape[0],), float(t), dtype=dtype)
    v = velocity(x, tt, cond)
    if guidance_scale != 1.0:
      v_u = velocity(x, tt, uncond)
      v = v_u + guidance_scale * (v - v_u)
    x = x + float(t_next - t) * v
  x = editor.decode(einops.rearrange(x, "b (h w) (c ph pw) -> b (h ph) (w pw) c", h=grid,
                                     ph=p, pw=p)).float()
  return torch.clamp(torch.round((x + 1.0) * 127.5), 0, 255).to(torch.uint8).numpy()
