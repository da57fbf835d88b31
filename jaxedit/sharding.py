"""Device meshes, logical axis rules and the shardings of pytrees (DESIGN.md section 8).

Parameters carry logical axis names (`nn.with_logical_partitioning`); the config maps them
to mesh axes, as MaxText does. State shardings come from `jax.eval_shape` of the init, so
nothing is allocated before its sharding is known.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def mesh_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "axes": ("data", "fsdp", "tensor"),
      "shape": (-1, 1, 1),  # -1: all remaining devices
      "rules": (
          ("batch", ("data", "fsdp")),
          ("activation_batch", ("data", "fsdp")),
          ("embed", "fsdp"),
          ("mlp", "tensor"),
          ("heads", "tensor"),
          ("mod", "tensor"),
          ("vocab", "tensor"),
      ),
  })


def make_mesh(axes: Sequence[str], shape: Sequence[int], devices=None) -> Mesh:
  devices = np.asarray(jax.devices() if devices is None else devices)
  shape = list(shape)
  if len(shape) != len(axes):
    raise ValueError(f"mesh shape {tuple(shape)} does not match axes {tuple(axes)}")
  if shape.count(-1) > 1:
    raise ValueError("at most one mesh axis may be -1")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if devices.size % known:
      raise ValueError(f"{devices.size} devices do not divide into mesh shape {tuple(shape)}")
    shape[shape.index(-1)] = devices.size // known
  if math.prod(shape) != devices.size:
    raise ValueError(f"mesh shape {tuple(shape)} needs {math.prod(shape)} devices, "
                     f"have {devices.size}")
  return Mesh(devices.reshape(shape), tuple(axes))


def rules(config: ml_collections.ConfigDict) -> tuple[tuple[str, Any], ...]:
  return tuple((name, tuple(axis) if isinstance(axis, list) else axis)
               for name, axis in config.rules)


def logical_shardings(boxed_tree, mesh: Mesh, axis_rules) -> Any:
  """NamedShardings for a tree of (possibly abstract) values boxed with logical names."""
  specs = nn.get_partition_spec(boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, axis_rules)


def in_context(fn, mesh: Mesh, axis_rules):
  """Calls (and so traces) the jitted `fn` with the mesh and logical rules active, so
  activation constraints (`nn.with_logical_constraint`) resolve to mesh axes."""
  def wrapped(*args, **kwargs):
    with jax.set_mesh(mesh), nn.logical_axis_rules(axis_rules):
      return fn(*args, **kwargs)
  return wrapped


def batch_sharding(mesh: Mesh, axis_rules) -> NamedSharding:
  """Leading (batch) axis split over the mesh axes that `batch` maps to."""
  spec = nn.logical_to_mesh_axes(("batch",), axis_rules)
  return NamedSharding(mesh, spec)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local: dict, sharding: NamedSharding) -> dict:
  """This process's slice of the batch -> global arrays (multi-host ready)."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local.items()}


def pad_rows(array, rows: int) -> np.ndarray:
  """Pads the leading axis to `rows` by repeating the last row (a fixed eval batch shape)."""
  array = np.asarray(array)
  return np.concatenate([array, np.repeat(array[-1:], rows - len(array), 0)])


def local_rows(array: jax.Array, sharding: NamedSharding) -> np.ndarray:
  """This process's rows of a global batch-sharded array: the inverse of `global_batch`."""
  from jax.experimental import multihost_utils

  return np.asarray(multihost_utils.global_array_to_host_local_array(array, sharding.mesh,
                                                                     sharding.spec))
