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
from typing import Any, Callable, Mapping, Protocol

import flax
import jax
import numpy as np

from jaxedit.errors import MappingError

_LEAVES = {"kernel": "weight", "scale": "weight", "bias": "bias", "embedding": "weight"}


@dataclasses.dataclass(frozen=True)
class Layout:
  stacks: tuple[str, ...]
  renames: Mapping[str, str] = dataclasses.field(default_factory=dict)
  prefix: Callable[[str], str] = lambda head: ""  # torch prefix of a top-level flax module
  native: bool = False  # jaxedit's own modules: flax path joined by '.', kernels (in, out)


def _torch_entries(layout: Layout, path: tuple[str, ...], shape: tuple[int, ...]):
  """Yields (torch name, layer index or None, transpose) for one flax leaf."""
  if layout.native:
    yield ".".join(path), None, False
    return
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


class TensorSource(Protocol):
  """Named tensors that can be read a slice at a time (a state dict, safetensors files)."""

  def names(self) -> set[str]: ...
  def shape(self, name: str) -> tuple[int, ...]: ...
  def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray: ...


class StateDict:
  """A TensorSource over an in-memory state dict (numpy arrays or torch tensors)."""

  def __init__(self, state_dict: Mapping[str, Any]):
    self._tensors = state_dict

  def names(self) -> set[str]:
    return set(self._tensors)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._tensors[name].shape)

  def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
    value = self._tensors[name]
    value = value.numpy() if hasattr(value, "numpy") else np.asarray(value)
    return value[index]


def plan(layout: Layout, source: TensorSource, template: Mapping[str, Any],
         ignore: Callable[[str], bool] = lambda name: False) -> dict:
  """flax path -> [(torch name, layer index or None, transpose)] for every leaf of
  `template`, after checking names and shapes (headers only, no tensor is read). Raises
  MappingError naming every missing, unexpected or mis-shaped tensor."""
  flat = flax.traverse_util.flatten_dict(flax.linen.unbox(template))
  entries, wanted = {}, {}
  for path, leaf in flat.items():
    entries[path] = list(_torch_entries(layout, path, tuple(leaf.shape)))
    for name, index, transpose in entries[path]:
      want = tuple(leaf.shape) if index is None else tuple(leaf.shape)[1:]
      wanted[name] = want[::-1] if transpose else want
  have = source.names()
  errors = []
  missing = sorted(n for n in set(wanted) - have if not ignore(n))
  unexpected = sorted(n for n in have - set(wanted) if not ignore(n))
  if missing:
    errors.append(f"missing tensors: {', '.join(missing)}")
  if unexpected:
    errors.append(f"unexpected tensors: {', '.join(unexpected)}")
  for name in sorted(set(wanted) & have):
    if source.shape(name) != wanted[name]:
      errors.append(f"tensor {name} has shape {source.shape(name)}, expected {wanted[name]}")
  if errors:
    raise MappingError("; ".join(errors))
  return {path: [e for e in es if e[0] in have] for path, es in entries.items()}


def _reader(source: TensorSource, entries, shape: tuple[int, ...], dtype):
  """index (slices of the flax leaf) -> numpy block, reading only that block's tensors."""

  def read(index):
    index = tuple(slice(*s.indices(n)) for s, n in zip(index, shape))
    if not entries:  # absent but allowed (ignored): zeros
      return np.zeros([len(range(*s.indices(n))) for s, n in zip(index, shape)], dtype)
    if entries[0][1] is None:
      [(name, _, transpose)] = entries
      block = source.read(name, index[::-1] if transpose else index)
      return np.asarray(block.T if transpose else block, dtype)
    layers, rest = index[0], index[1:]
    by_layer = {i: (name, transpose) for name, i, transpose in entries}
    blocks = []
    for i in range(*layers.indices(shape[0])):
      name, transpose = by_layer[i]
      block = source.read(name, rest[::-1] if transpose else rest)
      blocks.append(block.T if transpose else block)
    return np.asarray(np.stack(blocks), dtype)

  return read


def load(layout: Layout, source: TensorSource, template: Mapping[str, Any],
         shardings=None, ignore: Callable[[str], bool] = lambda name: False) -> dict:
  """Params shaped like `template` (e.g. from jax.eval_shape) from `source`.

  With `shardings` (a tree like `template`), each leaf is built by
  `jax.make_array_from_callback`: every process reads only the slices its devices hold,
  tensor by tensor, so no host holds a copy it does not need. Without, numpy arrays.
  Tensors for which `ignore(name)` holds may be absent (they load as zeros) or extra.
  """
  entries = plan(layout, source, template, ignore)
  flat = flax.traverse_util.flatten_dict(flax.linen.unbox(template))
  flat_shardings = (flax.traverse_util.flatten_dict(flax.linen.unbox(shardings))
                    if shardings is not None else None)
  out = {}
  for path, leaf in flat.items():
    shape, dtype = tuple(leaf.shape), np.dtype(leaf.dtype)
    read = _reader(source, entries[path], shape, dtype)
    if flat_shardings is None:
      out[path] = read(tuple(slice(None) for _ in shape))
    else:
      cache = {}  # replicated shards: read each distinct block once

      def cached(index, read=read, cache=cache, shape=shape):
        key = tuple(s.indices(n) for s, n in zip(index, shape))
        if key not in cache:
          cache[key] = read(index)
        return cache[key]

      out[path] = jax.make_array_from_callback(shape, flat_shardings[path], cached)
  return flax.traverse_util.unflatten_dict(out)


def from_torch(layout: Layout, state_dict: Mapping[str, Any], template: Mapping[str, Any],
               ignore: Callable[[str], bool] = lambda name: False) -> dict:
  """In-memory state dict -> flax params (numpy) shaped like `template`; MappingError names
  every missing, unexpected or mis-shaped tensor."""
  return load(layout, StateDict(state_dict), template, ignore=ignore)
