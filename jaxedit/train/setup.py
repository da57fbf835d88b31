"""What a trainer builds from its config before any work, shared by its train and eval: the
model, mesh and logical rules, the optimizer, and the state's shardings from `eval_shape`
(nothing allocated)."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxedit import checkpoint, sharding
from jaxedit.config import ConfigError
from jaxedit.data import job as data_job
from jaxedit.data.pipeline import ShapesSource
from jaxedit.train.optimizer import Optimizer


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any  # the trained parameters: every one, or LoRA adapters over `base`
  ema_params: Any
  opt_state: Any
  base: Any = None  # LoRA (editor SFT on edit records): the frozen model the adapters add to


@dataclasses.dataclass
class RunSetup:
  """A trainer's model, mesh, rules, optimizer and state shardings (each model's setup
  subclasses it with its helpers)."""

  config: ml_collections.ConfigDict
  world: Any
  tokenizer: Any
  model: Any
  mesh: jax.sharding.Mesh
  rules: tuple
  optimizer: Optimizer
  init: Callable  # rng -> boxed state
  state_shardings: Any
  abstract_state: Any
  batch_sharding: jax.sharding.NamedSharding

  @property
  def param_shardings(self):
    return self.state_shardings.params

  @functools.cached_property
  def dataset_dir(self) -> str:
    """Built (TFDS) on first use, so inference from a workdir never builds data."""
    return data_job.dataset_dir(self.world, self.config.data)

  def source(self, split: str) -> ShapesSource:
    return ShapesSource(self.dataset_dir, split, self.world)


def mesh_and_rules(config: ml_collections.ConfigDict, devices=None):
  """(mesh, logical rules, batch sharding) of a config's `mesh` section."""
  try:
    mesh = sharding.mesh_from_config(config.mesh, devices)
  except ValueError as e:
    raise ConfigError(f"config mesh: {e}") from None
  rules = sharding.rules(config.mesh)
  return mesh, rules, sharding.batch_sharding(mesh, rules)


def data_parallel_size(mesh, batch_sharding) -> int:
  """How many ways a batch is split: the product of the mesh axes of its sharding."""
  return int(np.prod([mesh.shape[a] for a in _axes(batch_sharding.spec)]))


def check_batch_size(name: str, size: int, mesh, batch_sharding) -> None:
  """Global batch sizes must split evenly over the data-parallel devices and processes."""
  parallel = data_parallel_size(mesh, batch_sharding)
  if size % parallel or size % jax.process_count():
    raise ConfigError(f"{name} = {size} must divide over the {parallel} data-parallel "
                      f"devices and {jax.process_count()} processes")


def _axes(spec) -> set[str]:
  names = set()
  for entry in spec:
    names.update(entry if isinstance(entry, tuple) else [entry] if entry else [])
  return names


def assemble(cls, config: ml_collections.ConfigDict, parts, optimizer: Optimizer,
             init_state_fn: Callable, batch_keys=("train.batch_size", "eval.batch_size"),
             **fields) -> RunSetup:
  """`cls` (a RunSetup) from (world, tokenizer, model, mesh, rules, batch sharding): the
  `batch_keys` checked, and the state's shardings from eval_shape of
  `init_state_fn(rng, model=, tx=)`; `fields`: `cls`'s own."""
  world, tok, model, mesh, rules, batch_sharding = parts
  for key in batch_keys:
    section, name = key.split(".")
    check_batch_size(f"config key {key!r}", config[section][name], mesh, batch_sharding)
  init = functools.partial(init_state_fn, model=model, tx=optimizer.tx)
  boxed = jax.eval_shape(init, jax.random.key(0))
  state_shardings = sharding.logical_shardings(boxed, mesh, rules)
  abstract_state = checkpoint.abstract_like(nn.unbox(boxed), state_shardings)
  return cls(config, world, tok, model, mesh, rules, optimizer, init, state_shardings,
             abstract_state, batch_sharding, **fields)


def init_state(setup: RunSetup):
  """The state `setup.init` makes from `train.seed`, in its shardings."""
  fn = jax.jit(lambda rng: nn.unbox(setup.init(rng)), out_shardings=setup.state_shardings)
  return sharding.Program(fn, setup.mesh, setup.rules)(jax.random.key(setup.config.train.seed))


def fresh_state(params, tx, base=None) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                    opt_state=tx.init(params), base=base)


def with_params(state: TrainState, loaded: dict) -> TrainState:
  """`state` with the top-level modules in `loaded` (e.g. a pretrained transformer) as both
  params and EMA; the rest keeps its initialisation."""
  params = {**state.params, **loaded}
  return state.replace(params=params, ema_params=jax.tree.map(lambda x: x.copy(), params))
