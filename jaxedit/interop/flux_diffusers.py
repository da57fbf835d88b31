"""Parameter mapping between jaxedit's FluxTransformer and diffusers FluxTransformer2DModel.

Flax Dense kernels are (in, out), torch Linear weights (out, in); scanned layer stacks carry
a leading layer axis that diffusers spreads over `transformer_blocks.{i}`. Names inside a
block map one-to-one except `to_out_0 -> to_out.0`, `net_0_proj -> net.0.proj`,
`net_2 -> net.2`, and RMSNorm `scale -> weight`.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import flax
import numpy as np

STACKS = ("transformer_blocks", "single_transformer_blocks")
_RENAMES = {"to_out_0": "to_out.0", "net_0_proj": "net.0.proj", "net_2": "net.2"}


class MappingError(ValueError):
  """Tensors missing, unexpected or of the wrong shape when loading weights."""


def _torch_entries(path: tuple[str, ...], shape: tuple[int, ...]):
  """Yields (torch name, layer index or None, transpose) for one flax leaf."""
  head, *mid, leaf = path
  mid = [_RENAMES.get(p, p) for p in mid]
  torch_leaf = {"kernel": "weight", "scale": "weight", "bias": "bias"}[leaf]
  transpose = leaf == "kernel"
  m = re.fullmatch(r"(.+)_(\d+)", head)
  if head in STACKS:  # scanned: leading layer axis
    for i in range(shape[0]):
      yield ".".join([head, str(i), *mid, torch_leaf]), i, transpose
  elif m and m.group(1) in STACKS:  # unrolled: transformer_blocks_3
    yield ".".join([m.group(1), m.group(2), *mid, torch_leaf]), None, transpose
  else:
    yield ".".join([head, *mid, torch_leaf]), None, transpose


def to_diffusers(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Flax params (boxed or not) -> diffusers state dict of numpy arrays."""
  out = {}
  for path, value in flax.traverse_util.flatten_dict(flax.linen.unbox(params)).items():
    value = np.asarray(value)
    for name, index, transpose in _torch_entries(path, value.shape):
      v = value if index is None else value[index]
      out[name] = np.ascontiguousarray(v.T if transpose else v)
  return out


def from_diffusers(state_dict: Mapping[str, Any], template: Mapping[str, Any]) -> dict:
  """diffusers state dict -> flax params shaped like `template` (e.g. from jax.eval_shape).

  Raises MappingError naming every missing, unexpected or mis-shaped tensor.
  """
  flat_template = flax.traverse_util.flatten_dict(flax.linen.unbox(template))
  wanted = {}
  for path, leaf in flat_template.items():
    for name, index, transpose in _torch_entries(path, tuple(leaf.shape)):
      wanted[name] = (path, index, transpose)
  missing = sorted(set(wanted) - set(state_dict))
  unexpected = sorted(set(state_dict) - set(wanted))
  errors = []
  if missing:
    errors.append(f"missing tensors: {', '.join(missing)}")
  if unexpected:
    errors.append(f"unexpected tensors: {', '.join(unexpected)}")
  out = {path: np.zeros(leaf.shape, leaf.dtype) for path, leaf in flat_template.items()}
  for name, (path, index, transpose) in wanted.items():
    if name not in state_dict:
      continue
    value = np.asarray(state_dict[name])
    value = value.T if transpose else value
    want = out[path].shape if index is None else out[path].shape[1:]
    if value.shape != want:
      errors.append(f"tensor {name} has shape {value.shape[::-1] if transpose else value.shape}, "
                    f"expected {want[::-1] if transpose else want}")
      continue
    if index is None:
      out[path] = value.astype(out[path].dtype)
    else:
      out[path][index] = value
  if errors:
    raise MappingError("; ".join(errors))
  return flax.traverse_util.unflatten_dict(out)


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
