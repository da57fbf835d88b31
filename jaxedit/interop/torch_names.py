"""Generic mapping between flax parameter trees and PyTorch state dicts.

Flax Dense kernels are (in, out), torch Linear weights (out, in); scanned layer stacks carry
a leading layer axis that PyTorch spreads over `{stack}.{i}`; unrolled stacks are named
`{stack}_{i}` in flax. A `Layout` names the stacks, the per-model renames of path parts, and
the torch prefix of each top-level module. Loading names every missing, unexpected or
mis-shaped tensor.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping

import flax
import numpy as np

_LEAVES = {"kernel": "weight", "scale": "weight", "bias": "bias", "embedding": "weight"}


class MappingError(ValueError):
  """Tensors missing, unexpected or of the wrong shape when loading weights."""


@dataclasses.dataclass(frozen=True)
class Layout:
  stacks: tuple[str, ...]
  renames: Mapping[str, str] = dataclasses.field(default_factory=dict)
  prefix: Callable[[str], str] = lambda head: ""  # torch prefix of a top-level flax module


def _torch_entries(layout: Layout, path: tuple[str, ...], shape: tuple[int, ...]):
  """Yields (torch name, layer index or None, transpose) for one flax leaf."""
  head, *mid, leaf = path
  mid = [layout.renames.get(p, p) for p in mid]
  torch_leaf = _LEAVES[leaf]
  transpose = leaf == "kernel"
  prefix = layout.prefix(head)
  m = re.fullmatch(r"(.+)_(\d+)", head)
  if head in layout.stacks:  # scanned: leading layer axis
    for i in range(shape[0]):
      yield prefix + ".".join([head, str(i), *mid, torch_leaf]), i, transpose
  elif m and m.group(1) in layout.stacks:  # unrolled: layers_3
    yield prefix + ".".join([m.group(1), m.group(2), *mid, torch_leaf]), None, transpose
  else:
    yield prefix + ".".join([head, *mid, torch_leaf]), None, transpose


def to_torch(layout: Layout, params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Flax params (boxed or not) -> state dict of numpy arrays."""
  out = {}
  for path, value in flax.traverse_util.flatten_dict(flax.linen.unbox(params)).items():
    value = np.asarray(value)
    for name, index, transpose in _torch_entries(layout, path, value.shape):
      v = value if index is None else value[index]
      out[name] = np.ascontiguousarray(v.T if transpose else v)
  return out


def from_torch(layout: Layout, state_dict: Mapping[str, Any], template: Mapping[str, Any],
               ignore: Callable[[str], bool] = lambda name: False) -> dict:
  """State dict -> flax params shaped like `template` (e.g. from jax.eval_shape).

  Tensors for which `ignore(name)` holds may be absent or extra (e.g. a tied lm_head).
  Raises MappingError naming every missing, unexpected or mis-shaped tensor.
  """
  flat_template = flax.traverse_util.flatten_dict(flax.linen.unbox(template))
  wanted = {}
  for path, leaf in flat_template.items():
    for name, index, transpose in _torch_entries(layout, path, tuple(leaf.shape)):
      wanted[name] = (path, index, transpose)
  missing = sorted(n for n in set(wanted) - set(state_dict) if not ignore(n))
  unexpected = sorted(n for n in set(state_dict) - set(wanted) if not ignore(n))
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
