"""Parameter mapping between jaxedit's FluxTransformer and diffusers FluxTransformer2DModel.

Names inside a block map one-to-one except `to_out_0 -> to_out.0`, `net_0_proj -> net.0.proj`,
`net_2 -> net.2`, and RMSNorm `scale -> weight` (generic rules: `interop.torch_names`).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from jaxedit.errors import MappingError
from jaxedit.interop.torch_names import Layout, from_torch, to_torch

__all__ = ["MappingError", "to_diffusers", "from_diffusers", "diffusers_config"]

LAYOUT = Layout(stacks=("transformer_blocks", "single_transformer_blocks"),
                renames={"to_out_0": "to_out.0", "net_0_proj": "net.0.proj", "net_2": "net.2"})


def to_diffusers(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Flax params (boxed or not) -> diffusers state dict of numpy arrays."""
  return to_torch(LAYOUT, params)


def from_diffusers(state_dict: Mapping[str, Any], template: Mapping[str, Any]) -> dict:
  """diffusers state dict -> flax params shaped like `template`; MappingError names every
  missing, unexpected or mis-shaped tensor."""
  return from_torch(LAYOUT, state_dict, template)


def diffusers_config(cfg, patch_size: int = 1) -> dict[str, Any]:
  """FluxTransformer2DModel constructor kwargs for a FluxConfig."""
  return {
      "patch_size": patch_size,
      "in_channels": cfg.in_channels,
      "out_channels": cfg.out_channels,
      "num_layers": cfg.num_layers,
      "num_single_layers": cfg.num_single_layers,
      "attention_head_dim": cfg.attention_head_dim,
      "num_attention_heads": cfg.num_attention_heads,
      "joint_attention_dim": cfg.joint_attention_dim,
      "pooled_projection_dim": cfg.pooled_projection_dim,
      "guidance_embeds": cfg.guidance_embeds,
      "axes_dims_rope": tuple(cfg.axes_dims_rope),
  }
