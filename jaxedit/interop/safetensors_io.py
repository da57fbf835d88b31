"""Safetensors folders as written by diffusers and transformers: one weights file, or shards
named by an `*.index.json` weight map. Only safetensors are read and written (nothing is
unpickled); reads go a slice at a time, so a host loads just the blocks its devices hold.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
from typing import Mapping

import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxedit.errors import MappingError

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
PICKLED = ("*.bin", "*.pt", "*.pth", "*.ckpt")


class SafetensorsFolder:
  """The tensors of `folder/{weights_name}` (or its shards): a `torch_names.TensorSource`."""

  def __init__(self, folder: str, weights_name: str):
    single = os.path.join(folder, weights_name)
    index = single + ".index.json"
    if os.path.exists(index):
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
      self._files = {name: os.path.join(folder, file) for name, file in weight_map.items()}
    elif os.path.exists(single):
      with safe_open(single, "np") as f:
        self._files = {name: single for name in f.keys()}
    else:
      pickled = sorted(os.path.basename(p) for pattern in PICKLED
                       for p in glob.glob(os.path.join(folder, pattern)))
      hint = (f"; it holds {', '.join(pickled)}, which are pickles and are never read: "
              "convert them to safetensors") if pickled else ""
      raise MappingError(f"{folder} has neither {weights_name} nor {weights_name}.index.json"
                         + hint)
    self._stack = contextlib.ExitStack()
    self._handles = {}

  def _handle(self, name: str):
    path = self._files[name]
    if path not in self._handles:
      if not os.path.exists(path):
        raise MappingError(f"tensor {name}: shard {path} is missing")
      self._handles[path] = self._stack.enter_context(safe_open(path, "np"))
    return self._handles[path]

  def names(self) -> set[str]:
    return set(self._files)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._handle(name).get_slice(name).get_shape())

  def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
    return np.asarray(self._handle(name).get_slice(name)[index])

  def close(self) -> None:
    self._stack.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def write(folder: str, weights_name: str, tensors: Mapping[str, np.ndarray], dtype: str,
          max_shard_bytes: int = 5 << 30) -> list[str]:
  """Writes `tensors` cast to `dtype` (floating tensors only) as `folder/{weights_name}`, or
  as numbered shards plus `{weights_name}.index.json` when larger than `max_shard_bytes`.
  Returns the files written."""
  if dtype not in DTYPES:
    raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
  cast = {name: np.ascontiguousarray(
      value.astype(DTYPES[dtype]) if np.issubdtype(value.dtype, np.floating)
      or value.dtype == ml_dtypes.bfloat16 else value) for name, value in tensors.items()}
  shards, size = [[]], 0
  for name in sorted(cast):
    nbytes = cast[name].nbytes
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(name)
    size += nbytes
  os.makedirs(folder, exist_ok=True)
  stem, ext = os.path.splitext(weights_name)
  files = ([weights_name] if len(shards) == 1 else
           [f"{stem}-{i + 1:05d}-of-{len(shards):05d}{ext}" for i in range(len(shards))])
  for file, names in zip(files, shards):
    save_file({n: cast[n] for n in names}, os.path.join(folder, file), metadata={"format": "pt"})
  if len(shards) > 1:
    index = {"metadata": {"total_size": sum(v.nbytes for v in cast.values())},
             "weight_map": {n: file for file, names in zip(files, shards) for n in names}}
    with open(os.path.join(folder, weights_name + ".index.json"), "w") as f:
      json.dump(index, f, indent=1)
    files.append(weights_name + ".index.json")
  return files
