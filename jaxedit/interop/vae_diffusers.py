"""Parameter mapping between jaxedit's AutoencoderKL and diffusers AutoencoderKL.

Flax names are diffusers' with `.i` written `_i` (`down_blocks_0` -> `down_blocks.0`,
`to_out_0` -> `to_out.0`); kernel/scale -> weight. Conv kernels are (kh, kw, in, out) in
flax and (out, in, kh, kw) in torch, Dense kernels (in, out) and (out, in). The generic
`torch_names` layout does not fit: it reverses every kernel's axes (swapping kh and kw) and
numbers only top-level stacks.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping

import flax
import numpy as np

from jaxedit.interop import safetensors_io
from jaxedit.errors import MappingError
from jaxedit.models.vae import diffusers_config

__all__ = ["MappingError", "to_diffusers", "from_diffusers", "diffusers_config", "write_folder"]

_LEAVES = {"kernel": "weight", "scale": "weight", "bias": "bias"}
_KERNEL_TO_TORCH = {4: (3, 2, 0, 1), 2: (1, 0)}  # flax axes in torch order, by ndim


def _torch_name(path: tuple[str, ...]) -> str:
  *modules, leaf = path
  return ".".join([re.sub(r"_(\d+)$", r".\1", m) for m in modules] + [_LEAVES[leaf]])


def _to_torch_axes(path: tuple[str, ...], ndim: int) -> tuple[int, ...]:
  return _KERNEL_TO_TORCH[ndim] if path[-1] == "kernel" else tuple(range(ndim))


def to_diffusers(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Flax params (boxed or not) -> diffusers state dict of numpy arrays."""
  out = {}
  for path, value in flax.traverse_util.flatten_dict(flax.linen.unbox(params)).items():
    value = np.asarray(value)
    axes = _to_torch_axes(path, value.ndim)
    out[_torch_name(path)] = np.array(value.transpose(axes), order="C")  # writable for torch
  return out


def from_diffusers(state_dict: Mapping[str, Any], template: Mapping[str, Any]) -> dict:
  """diffusers state dict -> flax params shaped like `template` (e.g. from jax.eval_shape);
  MappingError names every missing, unexpected or mis-shaped tensor."""
  flat = flax.traverse_util.flatten_dict(flax.linen.unbox(template))
  wanted = {_torch_name(path): path for path in flat}
  errors = []
  if missing := sorted(set(wanted) - set(state_dict)):
    errors.append(f"missing tensors: {', '.join(missing)}")
  if unexpected := sorted(set(state_dict) - set(wanted)):
    errors.append(f"unexpected tensors: {', '.join(unexpected)}")
  out = {}
  for name, path in wanted.items():
    if name not in state_dict:
      continue
    leaf = flat[path]
    axes = _to_torch_axes(path, len(leaf.shape))
    value = np.asarray(state_dict[name])
    expected = tuple(leaf.shape[a] for a in axes)
    if value.shape != expected:
      errors.append(f"tensor {name} has shape {value.shape}, expected {expected}")
      continue
    out[path] = value.transpose(np.argsort(axes)).astype(leaf.dtype)
  if errors:
    raise MappingError("; ".join(errors))
  return flax.traverse_util.unflatten_dict(out)


def write_folder(folder: str, params: Mapping[str, Any], cfg, dtype: str = "float32") -> list[str]:
  """A diffusers AutoencoderKL folder of `params` (host or device arrays) and VAEConfig
  `cfg`: config.json and diffusion_pytorch_model.safetensors, which
  `AutoencoderKL.from_pretrained` loads. Returns the files written."""
  files = safetensors_io.write(folder, "diffusion_pytorch_model.safetensors",
                               to_diffusers(params), dtype)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump({"_class_name": "AutoencoderKL", **diffusers_config(cfg)}, f, indent=1)
  return files + ["config.json"]
