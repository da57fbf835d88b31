"""Sweeps declared next to the config they sweep (docs/design.md section 10).

A config file may define `get_sweep(arg=None)` returning a list of points, each a dict of
config overrides, built with `values`, `product` and `zip`:

    def get_sweep(arg=None):
      return sweep.product(sweep.values("train.lr", [1e-4, 3e-4]),
                           sweep.values("grpo.kl_beta", [0.0, 0.04]))

`launch/sweep.py` runs the points (locally, in parallel, or on pods) and writes a summary
table. Keys in `hparams.free_keys(trainer)` change no compiled program, so a sweep over them
compiles each step once (the persistent compilation cache carries it across processes).
"""

from __future__ import annotations

import builtins
import copy
import itertools
import os
import re
from typing import Any, Sequence

import ml_collections

from jaxedit import hparams
from jaxedit.config import ConfigError, apply_overrides, load_file, load_module

Point = dict[str, Any]


def values(key: str, choices: Sequence[Any]) -> list[Point]:
  """One axis: `key` set to each of `choices`."""
  if not choices:
    raise ConfigError(f"sweep over {key!r} has no values")
  return [{key: v} for v in choices]


def product(*axes: list[Point]) -> list[Point]:
  """Every combination of the axes' points (the first axis varies slowest)."""
  points = [{}]
  for axis in axes:
    points = [{**p, **q} for p, q in itertools.product(points, axis)]
  return points


def zip(*axes: list[Point]) -> list[Point]:  # noqa: A001 (the sweep vocabulary's word)
  """The axes' points side by side: the i-th point of each, merged. Equal lengths."""
  lengths = {len(a) for a in axes}
  if len(lengths) > 1:
    raise ConfigError(f"sweep.zip needs axes of equal length, got {sorted(lengths)}")
  return [{k: v for point in points for k, v in point.items()}
          for points in builtins.zip(*axes)]


def load(spec: str) -> list[Point]:
  """The points of `path.py[:arg]`'s get_sweep(arg); ConfigError if it has none."""
  path, _, arg = spec.partition(":")
  module = load_module(path)
  if not hasattr(module, "get_sweep"):
    raise ConfigError(f"config file {path!r} declares no sweep (no get_sweep() function)")
  points = module.get_sweep(arg) if arg else module.get_sweep()
  if not points or not all(isinstance(p, dict) for p in points):
    raise ConfigError(f"{spec}: get_sweep() must return a non-empty list of dicts")
  return points


def overrides(point: Point) -> list[str]:
  """`key=value` overrides of a point, as `--config.key=value` takes them."""
  return [f"{k}={v}" for k, v in point.items()]


def check(spec: str, points: list[Point]) -> ml_collections.ConfigDict:
  """Applies every point to the config before anything runs, so a misspelt key or a bad
  value fails the sweep at once, naming the point. Returns the unswept config."""
  base = load_file(spec)
  for i, point in enumerate(points):
    try:
      apply_overrides(copy.deepcopy(base), overrides(point))
    except ConfigError as e:
      raise ConfigError(f"sweep point {i} {point}: {e}") from None
  return base


def name(point: Point) -> str:
  """A folder name for a point: `lr=0.0003,kl_beta=0.04` (keys' last parts)."""
  text = lambda v: "-".join(map(str, v)) if isinstance(v, (tuple, list)) else str(v)
  parts = [f"{k.split('.')[-1]}={text(v)}" for k, v in point.items()]
  return re.sub(r"[^A-Za-z0-9_.=,+-]", "_", ",".join(parts)) or "base"


def recompiling_keys(trainer: str, points: list[Point]) -> list[str]:
  """Swept keys that change a compiled program (not traced, not host-side)."""
  free = hparams.free_keys(trainer)
  swept = sorted({k for p in points for k in p})
  return [k for k in swept
          if not any(k == f or (f.endswith(".") and k.startswith(f)) for f in free)]


def cache_entries(cache_dir: str) -> set[str]:
  """The compiled programs in a persistent compilation cache directory."""
  if not cache_dir or not os.path.isdir(cache_dir):
    return set()
  return {f for f in os.listdir(cache_dir) if f.endswith("-cache")}
