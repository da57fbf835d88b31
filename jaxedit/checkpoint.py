"""Orbax checkpoints of a run: train state, data iterator state and config (docs/design.md 9).

Saves are asynchronous and atomic (orbax writes to a temporary directory and renames), the
last `keep` are kept, and restoring takes abstract arrays that carry the *target*
shardings, so a run saved on one mesh restores onto another. The data iterator's state is
the same on every process (`data.pipeline.make_dataset`), so it is saved once, as JSON, and
restores onto any number of processes.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from jaxedit import schema
from jaxedit.config import ConfigError


# Optional pytree items beside the state: the behaviour policy of a rollout in flight
# (trainers that overlap rollout and update).
EXTRA_ITEMS = ("behaviour",)
# Train-state fields that older runs saved under another name: old -> the new names, of
# which the one a state holds takes the saved value (an RL state's `frozen` was its LoRA
# base, or its full fine-tuning reference).
RENAMED_FIELDS = {"frozen": ("base", "reference")}


def manager(workdir: str, keep: int, async_save: bool = True) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), "checkpoints"),
      item_names=("state", "data", "config") + EXTRA_ITEMS,
      item_handlers={name: ocp.PyTreeCheckpointHandler(
          type_handler_registry=_type_handlers(jax.default_backend() == "tpu"))
                     for name in ("state",) + EXTRA_ITEMS},
      options=ocp.CheckpointManagerOptions(max_to_keep=keep,
                                           enable_async_checkpointing=async_save))


def _type_handlers(replica_parallel: bool) -> ocp.type_handlers.TypeHandlerRegistry:
  """Orbax's standard handlers, with replica-parallel array writes only on TPU.

  Replica-parallel writes split every replicated shard among its replicas, which pays off
  when many hosts hold replicas of large arrays; elsewhere it costs one eagerly dispatched
  slice (and a compile per shape) per array and replica: 10k slices and a third of a
  tiny 8-step run on 8 CPU devices. Off, replica 0 writes each shard whole.
  """
  th = ocp.type_handlers
  scalar = th.ScalarHandler()
  return th.create_type_handler_registry(
      (int, scalar), (float, scalar), (bytes, scalar), (np.number, scalar),
      (np.ndarray, th.NumpyHandler()),
      (jax.Array, th.ArrayHandler(use_replica_parallel=replica_parallel)),
      (str, th.StringHandler()))


def save(mngr: ocp.CheckpointManager, step: int, state, data_iterator,
         config: ml_collections.ConfigDict, force: bool = False, data_state=None,
         extra: dict | None = None) -> bool:
  """`data_state`: the iterator state to save, where it is not the iterator's current one
  (prompts drawn for a rollout in flight); `extra`: {EXTRA_ITEMS name: pytree}."""
  items = {"state": ocp.args.PyTreeSave(state),
           "config": ocp.args.JsonSave(config.to_dict()),
           **{name: ocp.args.PyTreeSave(tree) for name, tree in (extra or {}).items()}}
  if data_state is None and data_iterator is not None:
    data_state = data_iterator.get_state()
  if data_state is not None:
    items["data"] = ocp.args.JsonSave(data_state)
  return mngr.save(step, args=ocp.args.Composite(**items), force=force)


def abstract_like(tree, shardings):
  """ShapeDtypeStructs of `tree` carrying `shardings`: the restore target."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state, data_iterator=None):
  """Restores the state onto the shardings in `abstract_state` (fields saved under their old
  names included: RENAMED_FIELDS); the data iterator in place."""
  target, renamed = _saved_names(mngr, step, abstract_state)
  items = {"state": _pytree_restore(target)}
  legacy = False  # before the JSON data item: grain's one file per process
  if data_iterator is not None:
    data_dir = os.path.join(str(mngr.directory), str(step), "data")
    legacy = any(name.startswith("process_") for name in _listdir(data_dir))
    items["data"] = (grain.checkpoint.CheckpointRestore(data_iterator) if legacy
                     else ocp.args.JsonRestore())
  restored = mngr.restore(step, args=ocp.args.Composite(**items))
  if data_iterator is not None and not legacy:
    data_iterator.set_state(restored.data)
  if target is abstract_state:
    return restored.state
  return abstract_state.replace(**{new: restored.state[old] for old, new in renamed.items()},
                                **{k: v for k, v in restored.state.items() if k not in renamed})


def _saved_fields(mngr: ocp.CheckpointManager, step: int) -> set[str]:
  """The top-level names of the train state saved at `step`, from its metadata."""
  meta = ocp.PyTreeCheckpointHandler().metadata(mngr.directory / str(step) / "state")
  return set(getattr(meta, "tree", meta))


def _saved_names(mngr: ocp.CheckpointManager, step: int, abstract_state):
  """(restore target, {saved name: field}): `abstract_state` itself where the checkpoint
  has today's field names, else a dict of its fields under the names saved (fields added
  since, None in `abstract_state`, left out)."""
  if not dataclasses.is_dataclass(abstract_state):
    return abstract_state, {}
  saved = _saved_fields(mngr, step)
  fields = {f.name: getattr(abstract_state, f.name) for f in dataclasses.fields(abstract_state)}
  renamed = {old: new for old, news in RENAMED_FIELDS.items() if old in saved
             for new in news if new not in saved and fields.get(new) is not None}
  if not renamed and all(k in saved for k, v in fields.items() if v is None):
    return abstract_state, {}
  target = {k: v for k, v in fields.items() if v is not None and k not in renamed.values()}
  target.update({old: fields[new] for old, new in renamed.items()})
  return target, renamed


def _listdir(path: str) -> list[str]:
  return os.listdir(path) if os.path.isdir(path) else []


def _latest(workdir: str, keep: int, problem: str) -> tuple[ocp.CheckpointManager, int]:
  """(manager, latest step) of `workdir`; ConfigError(`problem`) if it has no checkpoint."""
  mngr = manager(workdir, keep, async_save=False)
  step = mngr.latest_step()
  if step is None:
    raise ConfigError(problem)
  return mngr, step


def latest_step(workdir: str, what: str) -> tuple[ocp.CheckpointManager, int]:
  """(manager, latest step) of another run's workdir; ConfigError if it has no checkpoint."""
  return _latest(workdir, 1, f"init_from: no checkpoint in {os.path.abspath(workdir)}/"
                 f"checkpoints; point it at {what}")


def restore_latest(workdir: str, keep: int, abstract_state):
  """(step, state) of this run's latest checkpoint, for eval; ConfigError if it has none."""
  mngr, step = _latest(workdir, keep, f"no checkpoint in {workdir}/checkpoints: train first")
  return step, restore(mngr, step, abstract_state)


def restore_extra(mngr: ocp.CheckpointManager, step: int, name: str, abstract):
  """An EXTRA_ITEMS pytree onto the shardings of `abstract`; None where the step has none."""
  if name not in _listdir(os.path.join(str(mngr.directory), str(step))):
    return None
  return getattr(mngr.restore(step, args=ocp.args.Composite(
      **{name: _pytree_restore(abstract)})), name)


def saved_config(mngr: ocp.CheckpointManager, step: int) -> dict:
  """The config a run saved with its checkpoint, as a plain dict in today's schema
  (`schema.migrate`)."""
  return schema.migrate(
      mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config)


def restore_subtree(mngr: ocp.CheckpointManager, step: int, key: str, abstract):
  """One entry of a saved train state (e.g. `ema_params`; RENAMED_FIELDS followed) onto the
  shardings of `abstract`, without reading the rest (optimizer state, ...)."""
  saved = _saved_fields(mngr, step)
  if key not in saved:
    key = next((old for old, news in RENAMED_FIELDS.items() if key in news and old in saved),
               key)
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=_pytree_restore({key: abstract}, partial_restore=True)))
  return restored.state[key]


def restore_subtree_on_host(mngr: ocp.CheckpointManager, step: int, key: str):
  """One entry of a saved train state as numpy arrays on the host, shaped as saved (no
  target needed: for small parts of another run, such as its LoRA adapters)."""
  meta = ocp.PyTreeCheckpointHandler().metadata(mngr.directory / str(step) / "state")
  tree = getattr(meta, "tree", meta)
  if key not in tree:
    raise ConfigError(f"{mngr.directory} step {step} saved no {key!r} (it has {sorted(tree)})")
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree[key])
  restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      {key: tree[key]}, restore_args={key: args}, partial_restore=True)))
  return restored.state[key]


def _pytree_restore(abstract, **kwargs) -> ocp.args.PyTreeRestore:
  """Restore arguments placing every array onto the sharding its abstract value carries."""
  return ocp.args.PyTreeRestore(
      abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract), **kwargs)


class Preemption:
  """Turns SIGTERM into a flag the loop checks, so it can save and exit cleanly."""

  def __init__(self):
    self.requested = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    logging.warning("SIGTERM: saving a checkpoint and stopping")
    self.requested = True

  def restore(self):
    signal.signal(signal.SIGTERM, self._previous)


def save_if_due(mngr: ocp.CheckpointManager, step: int, state, data_iterator,
                config: ml_collections.ConfigDict, *, every: int, last: bool,
                preemption: Preemption, data_state=None, extra: dict | None = None) -> bool:
  """Saves every `every` steps, at the last step and on SIGTERM; True when the loop must
  stop (preempted). `data_state`, `extra`: as `save`'s."""
  if (every and step % every == 0) or last or preemption.requested:
    save(mngr, step, state, data_iterator, config, force=True, data_state=data_state,
         extra=extra)
  if preemption.requested:
    logging.warning("preempted at step %d; checkpoint saved", step)
  return preemption.requested
