"""Rollouts on devices of their own, overlapping the update one step off-policy (the GRPO
and on-policy distillation trainers of the editor and the planner).

With `rollout.rollout_devices` = k > 0, the last k devices of every
process form the rollout mesh (`rollout_mesh_shape`) and the rest the update's (`mesh.shape`).
Iteration t + 1's rollouts are dispatched right after iteration t's update, with the
parameters from before that update, so the two run at once on their own devices and the
rollouts are one update behind the policy they train. A checkpoint keeps those parameters
(`behaviour`) and the data state from before their prompts, so a resumed run samples them
again and continues exactly. With k = 0 both run on every device, one after the other.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Callable

import jax
import ml_collections

from jaxedit import checkpoint, sharding
from jaxedit.config import ConfigError


def check(rollout: ml_collections.ConfigDict) -> None:
  """Checks the `rollout` section's placement keys."""
  if rollout.rollout_devices < 0:
    raise ConfigError("config key 'rollout.rollout_devices' must be >= 0")


def split_devices(k: int) -> tuple[list, list]:
  """(update devices, rollout devices): the last `k` devices of every process sample
  rollouts, so each process feeds and scores its own rows on both meshes."""
  n = jax.local_device_count()
  if not 0 < k < n:
    raise ConfigError(f"config key 'rollout.rollout_devices' = {k} must be in [0, {n}): 0 "
                      "runs rollout and update on every device; k > 0 rollouts on k of each "
                      f"process's {n} devices, the update on the rest")
  by_process = [[d for d in jax.devices() if d.process_index == p]
                for p in range(jax.process_count())]
  return ([d for ds in by_process for d in ds[:n - k]],
          [d for ds in by_process for d in ds[n - k:]])


def make_setups(make_setup: Callable, config: ml_collections.ConfigDict, workdir: str):
  """(update setup, rollout setup) from `make_setup(config, workdir, devices)`: the same
  setup twice without rollout devices, else one on each side of `split_devices`."""
  rollout = config.rollout
  if not rollout.rollout_devices:
    setup = make_setup(config, workdir)
    return setup, setup
  update_devices, rollout_devices = split_devices(rollout.rollout_devices)
  rollout_config = copy.deepcopy(config)
  rollout_config.mesh.shape = tuple(rollout.rollout_mesh_shape)
  rollout_config.mesh.dcn_shape = (1,) * len(rollout_config.mesh.axes)
  setups = (make_setup(config, workdir, devices=update_devices),
            make_setup(rollout_config, workdir, devices=rollout_devices))
  logging.info("rollouts on their own mesh %s, one step off-policy, overlapping the update "
               "on %s", dict(setups[1].mesh.shape), dict(setups[0].mesh.shape))
  return setups


def to_mesh(tree, mesh):
  """Arrays moved onto `mesh` with the same partition specs (rollouts to the update, the
  policy to the rollouts)."""
  return jax.tree.map(lambda x: sharding.transfer(
      x, jax.sharding.NamedSharding(mesh, x.sharding.spec)), tree)


class Schedule:
  """Which parameters sample which iteration's rollouts, and when. `start` once, then per
  iteration `rollouts(step, params)` before dispatching the update (it reads `params` before
  the update donates them) and `after_update(step)`; `checkpoint_items()` for the save.

  roll(step, params) -> the rollouts of iteration `step`, sampled with `params` (on the
  rollout setup's mesh when overlapped, i.e. when `rollout_setup` is not the update's)."""

  def __init__(self, roll: Callable, rollout_setup, data_iter, num_steps: int,
               overlap: bool):
    self.roll, self.setup, self.data_iter = roll, rollout_setup, data_iter
    self.num_steps, self.overlap = num_steps, overlap
    self.behaviour: Any = None  # the parameters of the rollouts in flight
    self.data_state = None  # the data state from before their prompts
    self.pending = None

  def start(self, step: int, params, mngr) -> None:
    """After iteration `step` (0: a fresh run): the rollouts in flight, sampled with the
    behaviour parameters `mngr` saved at that step, else with `params` (a fresh run, or one
    saved without overlap, starts on-policy)."""
    if self.overlap and step < self.num_steps:
      self.behaviour = checkpoint.restore_extra(mngr, step, "behaviour",
                                                self.setup.abstract_state.params)
      if self.behaviour is None:
        self.behaviour = to_mesh(params, self.setup.mesh)
      self.data_state = self.data_iter.get_state()
      self.pending = self.roll(step + 1, self.behaviour)

  def rollouts(self, step: int, params):
    if not self.overlap:
      return self.roll(step, params)
    out, self.pending = self.pending, None
    self.behaviour = to_mesh(params, self.setup.mesh)  # sample the next iteration with these
    return out

  def after_update(self, step: int) -> None:
    if self.overlap:
      self.data_state = self.data_iter.get_state()
      if step < self.num_steps:
        self.pending = self.roll(step + 1, self.behaviour)

  def checkpoint_items(self) -> dict:
    """`checkpoint.save_if_due`'s data_state and extra."""
    if not self.overlap:
      return {}
    return {"data_state": self.data_state, "extra": {"behaviour": self.behaviour}}
