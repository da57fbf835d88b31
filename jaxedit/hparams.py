"""Hyperparameters that change no shape are arguments of the jitted steps, not constants.

A step compiled with the learning rate, KL beta or clip range folded in as constants is a
new program for every value; passed as float32 scalars they are inputs, so a sweep over
them, a resume with another value, or K values trained at once (`population`) reuses one
compiled program (and the persistent compilation cache across processes). Noise levels and
reward weights never reach a compiled program as constants either: the noise levels are an
input array and the rewards are computed on the host.
"""

from __future__ import annotations

from typing import Mapping

import ml_collections
import numpy as np

from jaxedit import registry

# The traced hyperparameters of each step (name -> config key): one home, the registry.
SFT = registry.SUPERVISED_HPARAMS
GRPO = registry.GRPO_HPARAMS
OPD = registry.OPD_HPARAMS
# Keys that change no compiled program because they stay on the host.
HOST_SIDE = ("rollout.noise_level", "rewards.")


def get(config: ml_collections.ConfigDict, key: str):
  node = config
  for part in key.split("."):
    node = node[part]
  return node


def values(config: ml_collections.ConfigDict, keys: Mapping[str, str]) -> dict:
  """{name: float32 scalar} of a config's traced hyperparameters."""
  return {name: np.float32(get(config, key)) for name, key in keys.items()}


def free_keys(trainer: str) -> tuple[str, ...]:
  """Config keys a sweep may vary without compiling anything new (prefixes end in '.')."""
  known = registry.BY_NAME.get(trainer)
  return tuple(known.hparams.values() if known else ()) + HOST_SIDE
