"""Population mode: K settings of the traced hyperparameters trained at once, in one compiled
program, for models small enough that K copies of the state fit (editor SFT).

    jaxedit train --config configs/shapes_editor_sft.py --workdir DIR \
        --config.population='[{"train.lr": 1e-3}, {"train.lr": 2e-3}, {"train.lr": 4e-3}]'

The train step is `jax.vmap`ped over a leading member axis of the state and of the
hyperparameters; the batch and the random streams are shared, so member k follows exactly
the run it would be alone with its settings. A small model leaves a CPU or accelerator
under-used; K members fill it (`python -m jaxedit.benchmarks.population` measures this).
The editor SFT trainer runs it when `population` is set: each member writes
DIR/member_K/metrics.jsonl and TensorBoard scalars, and the last validation of every member
goes to DIR/population.json.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxedit import hparams, sharding, sweep
from jaxedit.config import ConfigError, apply_overrides


def members(config: ml_collections.ConfigDict) -> list[dict]:
  """The population's settings, checked: a JSON list of {config key: value} over traced
  hyperparameters only (anything else would need another program)."""
  allowed = set(hparams.SFT.values())
  try:
    points = json.loads(config.population)
  except json.JSONDecodeError as e:
    raise ConfigError(f"config key 'population' must be a JSON list of settings: {e}") from None
  if not isinstance(points, list) or len(points) < 2 or not all(
      isinstance(p, dict) for p in points):
    raise ConfigError("config key 'population' must list at least 2 settings, e.g. "
                      '[{"train.lr": 1e-3}, {"train.lr": 2e-3}]')
  for p in points:
    for key in p:
      if key not in allowed:
        raise ConfigError(f"population setting {key!r} changes the compiled program; a "
                          f"population varies only {sorted(allowed)} (sweep the rest)")
    apply_overrides(ml_collections.ConfigDict(config.to_dict()), sweep.overrides(p))
  return points


def stacked(tree_shardings):
  """Shardings with a leading, unsharded member axis."""
  return jax.tree.map(lambda s: NamedSharding(s.mesh, P(None, *s.spec)), tree_shardings)


def member_hparams(config: ml_collections.ConfigDict, points: list[dict]) -> dict:
  return {name: np.asarray([p.get(key, hparams.get(config, key)) for p in points], np.float32)
          for name, key in hparams.SFT.items()}


def make_step(setup, step_fn):
  """jitted (stacked state, batch, stacked hp) -> (stacked state, metrics of shape (K,)) of
  the unjitted `step_fn(codec, state, batch, hp)`, vmapped over the members."""
  shardings = stacked(setup.state_shardings)
  replicated = sharding.replicated(setup.mesh)
  step = jax.jit(jax.vmap(step_fn, in_axes=(None, 0, None, 0)),
                 in_shardings=(replicated, shardings, setup.batch_sharding, None),
                 out_shardings=(shardings, replicated), donate_argnums=1)
  return sharding.Program(step, setup.mesh, setup.rules, (setup.codec,))


def replicate_members(state, k: int, setup):
  """K copies of one initial state (every member starts where a single run would)."""
  fn = jax.jit(lambda s: jax.tree.map(lambda x: jnp.broadcast_to(x, (k, *x.shape)), s),
               out_shardings=stacked(setup.state_shardings))
  return fn(state)


def abstract_state(setup, k: int):
  """The stacked state's ShapeDtypeStructs (to restore into)."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct((k, *a.shape), a.dtype, sharding=s),
                      setup.abstract_state, stacked(setup.state_shardings))


def member(tree, k: int, shardings):
  """Member k's slice of a stacked tree, in the single-run shardings."""
  return jax.jit(lambda t: jax.tree.map(lambda x: x[k], t), out_shardings=shardings)(tree)
