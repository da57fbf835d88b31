"""Device meshes, logical axis rules and the shardings of pytrees (docs/design.md section 8).

Parameters carry logical axis names (`nn.with_logical_partitioning`); the config maps them
to mesh axes, as MaxText does. State shardings come from `jax.eval_shape` of the init, so
nothing is allocated before its sharding is known.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def _fill(shape: Sequence[int], size: int, what: str) -> list[int]:
  shape = list(shape)
  if shape.count(-1) > 1:
    raise ValueError(f"at most one {what} axis may be -1")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if size % known:
      raise ValueError(f"{size} devices do not divide into {what} shape {tuple(shape)}")
    shape[shape.index(-1)] = size // known
  if math.prod(shape) != size:
    raise ValueError(f"{what} shape {tuple(shape)} needs {math.prod(shape)} devices, "
                     f"have {size}")
  return shape


def make_mesh(axes: Sequence[str], shape: Sequence[int], devices=None,
              dcn_shape: Sequence[int] | None = None, dcn_granule: str = "slice") -> Mesh:
  """A mesh of `axes`. With `dcn_shape` > 1 anywhere the mesh spans granules (slices, or
  processes) joined by the data-centre network: each axis is `dcn_shape[i] * shape[i]`
  long, laid out so that only the DCN part of an axis crosses granules."""
  devices = np.asarray(jax.devices() if devices is None else devices)
  if len(shape) != len(axes) or (dcn_shape is not None and len(dcn_shape) != len(axes)):
    raise ValueError(f"mesh shape {tuple(shape)} / dcn_shape {dcn_shape} do not match "
                     f"axes {tuple(axes)}")
  dcn = [int(d) for d in (dcn_shape or [1] * len(axes))]
  if min(dcn) < 1:
    raise ValueError(f"dcn_shape {tuple(dcn)} must be positive")
  granules = math.prod(dcn)
  if granules == 1:
    return Mesh(devices.reshape(_fill(shape, devices.size, "mesh")), tuple(axes))
  if dcn_granule not in ("slice", "process"):
    raise ValueError(f"dcn_granule must be 'slice' or 'process', got {dcn_granule!r}")
  if devices.size % granules:
    raise ValueError(f"{devices.size} devices do not split into {granules} granules "
                     f"(dcn_shape {tuple(dcn)})")
  if dcn_granule == "process" and jax.process_count() != granules:
    raise ValueError(f"dcn_shape {tuple(dcn)} spans {granules} processes; this run has "
                     f"{jax.process_count()}")
  if dcn_granule == "slice":
    slices = {getattr(d, "slice_index", None) for d in devices.flat}
    if None in slices or len(slices) != granules:
      raise ValueError(f"dcn_shape {tuple(dcn)} spans {granules} slices; the devices are in "
                       f"{'no slices' if None in slices else len(slices)} (on CPU, or to "
                       "test: dcn_granule='process')")
  ici = _fill(shape, devices.size // granules, "mesh (per granule)")
  from jax.experimental import mesh_utils

  grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, list(devices.flat),
                                              process_is_granule=dcn_granule == "process")
  return Mesh(grid, tuple(axes))


def mesh_from_config(config: ml_collections.ConfigDict, devices=None) -> Mesh:
  """The mesh of a config's `mesh` section."""
  return make_mesh(config.axes, config.shape, devices, config.dcn_shape, config.dcn_granule)


def rules(config: ml_collections.ConfigDict) -> tuple[tuple[str, Any], ...]:
  return tuple((name, tuple(axis) if isinstance(axis, list) else axis)
               for name, axis in config.rules)


def logical_shardings(boxed_tree, mesh: Mesh, axis_rules) -> Any:
  """NamedShardings for a tree of (possibly abstract) values boxed with logical names."""
  specs = nn.get_partition_spec(boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, axis_rules)


def bytes_per_device(tree, shardings=None) -> int:
  """Bytes one device holds of a tree of arrays or ShapeDtypeStructs, sharded by their own
  `.sharding` or by `shardings` (the most loaded device when shards are uneven)."""
  leaves = jax.tree.leaves(tree)
  shards = (jax.tree.leaves(shardings) if shardings is not None
            else [x.sharding for x in leaves])
  return sum(math.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
             for x, s in zip(leaves, shards))


@dataclasses.dataclass(frozen=True)
class Program:
  """A jitted step and what it runs with: the mesh and logical rules it is traced under (so
  activation constraints, `nn.with_logical_constraint`, resolve to mesh axes), arguments
  bound ahead of the caller's (a codec, teachers' parameters) and the traced
  hyperparameters passed last (`jaxedit.hparams`; None: the step takes none).

  `program(*args)` runs it; `lower` and `eval_shape` take the same arguments, so a dry run
  compiles exactly what training runs."""

  jitted: Any  # the jax.jit of the step, with its shardings and donation
  mesh: Mesh
  rules: Any
  leading: tuple = ()
  hparams: Any = None

  def arguments(self, *args) -> tuple:
    """The jitted function's full argument list for the caller's `args`."""
    return (*self.leading, *args) + (() if self.hparams is None else (self.hparams,))

  def __call__(self, *args):
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return self.jitted(*self.arguments(*args))

  def lower(self, *args):
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return self.jitted.lower(*self.arguments(*args))

  def eval_shape(self, *args):
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return jax.eval_shape(self.jitted, *self.arguments(*args))

  def with_hparams(self, hparams) -> "Program":
    return dataclasses.replace(self, hparams=hparams)


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


def global_from_full(full: dict, sharding: NamedSharding) -> dict:
  """Global arrays from host arrays that every process holds whole (fixed eval batches):
  each process places only the rows its devices hold."""
  return {k: jax.make_array_from_callback(np.shape(v), sharding,
                                          lambda index, v=np.asarray(v): v[index])
          for k, v in full.items()}


def to_host(array: jax.Array) -> np.ndarray:
  """The whole of a global array on every process's host (gathered across processes when
  it spans several)."""
  if array.is_fully_addressable:
    return np.asarray(array)
  from jax.experimental import multihost_utils

  return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def all_rows(local) -> np.ndarray:
  """Host arrays of this process's rows -> the rows of every process, in global order
  (for statistics over the whole batch, such as the mean reward)."""
  if jax.process_count() == 1:
    return np.asarray(local)
  from jax.experimental import multihost_utils

  return np.asarray(multihost_utils.process_allgather(np.asarray(local), tiled=True))


def pad_rows(array, rows: int) -> np.ndarray:
  """Pads the leading axis to `rows` by repeating the last row (a fixed eval batch shape)."""
  array = np.asarray(array)
  return np.concatenate([array, np.repeat(array[-1:], rows - len(array), 0)])


def transfer(array: jax.Array, target: NamedSharding) -> jax.Array:
  """`array` placed as `target` says, on devices that may not hold it now (from the update's
  mesh to the rollouts' and back). One process: a device-to-device copy. Several: each
  process assembles its target shards from the shards it holds, through host memory (JAX
  moves arrays between different device sets of several processes only on TPU's TFRT
  runtime); a ValueError where a target shard needs data this process does not hold."""
  if jax.process_count() == 1:
    return jax.device_put(array, target)
  held = {}  # region -> host data, one copy of replicated shards
  for shard in array.addressable_shards:
    region = tuple(s.indices(n)[:2] for s, n in zip(shard.index, array.shape))
    if region not in held:
      held[region] = np.asarray(shard.data)

  def assemble(index):
    want = [s.indices(n)[:2] for s, n in zip(index, array.shape)]
    out = np.empty([stop - start for start, stop in want], array.dtype)
    covered = np.zeros(out.shape, bool)
    for region, data in held.items():
      both = [(max(a, c), min(b, d)) for (a, b), (c, d) in zip(region, want)]
      if any(lo >= hi for lo, hi in both):
        continue
      into = tuple(slice(lo - c, hi - c) for (lo, hi), (c, _) in zip(both, want))
      out[into] = data[tuple(slice(lo - a, hi - a) for (lo, hi), (a, _) in zip(both, region))]
      covered[into] = True
    if not covered.all():
      raise ValueError(f"process {jax.process_index()} holds too little of a {array.shape} "
                       f"array to place it as {target.spec} on {dict(target.mesh.shape)}: "
                       "lay both meshes out with the same rows on each process")
    return out
  return jax.make_array_from_callback(array.shape, target, assemble)


def local_rows(array: jax.Array, sharding: NamedSharding) -> np.ndarray:
  """This process's rows of a global batch-sharded array: the inverse of `global_batch`."""
  from jax.experimental import multihost_utils

  return np.asarray(multihost_utils.global_array_to_host_local_array(array, sharding.mesh,
                                                                     sharding.spec))
