"""LoRA adapters as parameters: split from the frozen base, merge for export.

The adapters live inside the model (`models.layers.LoRADense`, params `lora_a`, `lora_b`), so
scanned layers carry them with a leading layer axis like every other parameter. Training
updates only the adapters; the reference policy is the base alone (adapters disabled), so no
second copy of the base is kept.
"""

from __future__ import annotations

from typing import Iterable

import jax.numpy as jnp
from flax import traverse_util

ADAPTER_KEYS = ("lora_a", "lora_b")


def is_adapter(path: tuple[str, ...]) -> bool:
  return path[-1] in ADAPTER_KEYS


def split(params, within: tuple[str, ...] | None = None) -> tuple[dict, dict]:
  """params -> (trained, base), both nested dicts with the original paths: the base is every
  parameter but the adapters, or with `within` only those of these top-level modules (the
  others, e.g. a fresh vision prefix, train whole beside the adapters)."""
  flat = traverse_util.flatten_dict(params)
  frozen = lambda k: not is_adapter(k) and (within is None or k[0] in within)
  trained = {k: v for k, v in flat.items() if not frozen(k)}
  base = {k: v for k, v in flat.items() if frozen(k)}
  return traverse_util.unflatten_dict(trained), traverse_util.unflatten_dict(base)


def join(adapters, base) -> dict:
  flat = traverse_util.flatten_dict(base)
  flat.update(traverse_util.flatten_dict(adapters))
  return traverse_util.unflatten_dict(flat)


def whole(trained, base) -> dict:
  """The whole model's parameters: `trained` alone (no base: full fine-tuning), or LoRA
  adapters joined onto their frozen `base`."""
  return trained if base is None else join(trained, base)


def merge(params, rank: int, alpha: float) -> dict:
  """Folds every adapter into its kernel, W + (alpha / rank) A @ B (over any leading layer
  axis), and drops the adapters: the parameters of the same model without LoRA."""
  flat = traverse_util.flatten_dict(params)
  out = {k: v for k, v in flat.items() if not is_adapter(k)}
  for k, a in flat.items():
    if k[-1] != "lora_a":
      continue
    module = k[:-1]
    b = flat[module + ("lora_b",)]
    kernel = out[module + ("kernel",)]
    update = jnp.einsum("...ir,...ro->...io", a.astype(jnp.float32), b.astype(jnp.float32))
    out[module + ("kernel",)] = (kernel.astype(jnp.float32)
                                 + (alpha / rank) * update).astype(kernel.dtype)
  return traverse_util.unflatten_dict(out)


def check_targets(params, targets: Iterable[str]) -> None:
  """Raises if a configured target name matches no Dense layer of the model."""
  found = {k[-2] for k in traverse_util.flatten_dict(params) if k[-1] == "lora_a"}
  missing = sorted(set(targets) - found)
  if missing:
    raise ValueError(f"lora targets {missing} match no Dense layer of the model")

