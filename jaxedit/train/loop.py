"""The one training loop: restore or initialise, then steps with progress, metrics logs,
validation, sample grids and checkpoints at their periods, a clean stop on SIGTERM, and
everything flushed however the loop ends. Trainers give it their step and their hooks."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np

from jaxedit import checkpoint
from jaxedit.train import records


@dataclasses.dataclass
class Hooks:
  """What a trainer adds to the loop; every hook is optional.

  validate(state, step) -> (summary, extras): a validation pass, recorded in the curve and
    TensorBoard every `train.eval_every` steps (and at the last);
  samples(state, step, extras) at `train.sample_every`: extras are validate's at this step
    (None when it did not run);
  validate_start: a fresh run also validates (and samples) its starting point as step 0;
  checkpoint_items() -> extra keywords of `checkpoint.save_if_due` (rollouts in flight)."""

  validate: Callable[[Any, int], tuple[dict, Any]] | None = None
  samples: Callable[[Any, int, Any], None] | None = None
  validate_start: bool = False
  checkpoint_items: Callable[[], dict] = dict


class Run:
  """A run's folder, metric writer and checkpoints, opened before the setup is built (a
  trainer may need to know whether it resumes)."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, writer=None):
    from clu import metric_writers  # imports TensorFlow: only when training

    os.makedirs(workdir, exist_ok=True)
    self.config, self.workdir = config, workdir
    tc = config.train
    self.writer = writer or metric_writers.create_default_writer(
        workdir, just_logging=jax.process_index() > 0)
    self.mngr = checkpoint.manager(workdir, tc.keep_checkpoints, tc.async_checkpoints)

  @property
  def resuming(self) -> bool:
    return self.mngr.latest_step() is not None

  def restore_or_init(self, abstract_state, data_iter, init: Callable[[], Any]):
    """The latest checkpoint's state (and `data_iter`'s position), or `init()`."""
    if not self.resuming:
      return init()
    state = checkpoint.restore(self.mngr, self.mngr.latest_step(), abstract_state, data_iter)
    logging.info("resumed from step %d", step_of(state))
    return state


def step_of(state) -> int:
  """The steps a state has taken (a population's members all have taken the same)."""
  return int(np.ravel(jax.device_get(state.step))[0])


def run(run: Run, state, data_iter, step_fn: Callable, hooks: Hooks = Hooks(),
        logs: Sequence[records.MetricsLog] | None = None, log_prefix: str = ""):
  """Trains `state` from its step to `train.num_steps`.

  step_fn(state, step) -> (state, metrics, host_scalars): one step, dispatched; metrics stay
  on device until logged, host_scalars is a dict or a function computing one (called only
  at logged steps). Returns (state, the last step run, its metrics, the curve's points)."""
  from clu import periodic_actions

  config, tc = run.config, run.config.train
  start = step_of(state)
  curve = records.Curve(run.workdir, start)
  logs = logs or [records.MetricsLog(run.writer, run.workdir, prefix=log_prefix)]
  progress = periodic_actions.ReportProgress(num_train_steps=tc.num_steps, writer=run.writer)
  preemption = checkpoint.Preemption()

  def validate(state, step):
    began = time.time()
    summary, extras = hooks.validate(state, step)
    minutes = curve.add(step, summary, time.time() - began)
    run.writer.write_scalars(step, records.scalars(summary, "val"))
    logging.info("step %d (%.1f min): validation %s", step, minutes, summary)
    return extras

  metrics, step = None, start
  try:
    if start == 0 and hooks.validate_start and hooks.validate and tc.eval_every > 0:
      extras = validate(state, 0)
      if hooks.samples:
        hooks.samples(state, 0, extras)
    for step in range(start + 1, tc.num_steps + 1):
      state, metrics, host_scalars = step_fn(state, step)
      progress(step)
      last = step == tc.num_steps
      if step % tc.log_every == 0 or last:
        host = host_scalars() if callable(host_scalars) else host_scalars
        for log in logs:
          log(step, metrics, host)
      extras = None
      if hooks.validate and records.due(tc.eval_every, step, last):
        extras = validate(state, step)
      if hooks.samples and records.due(tc.get("sample_every", -1), step, last):
        hooks.samples(state, step, extras)
      if checkpoint.save_if_due(run.mngr, step, state, data_iter, config,
                                every=tc.checkpoint_every, last=last, preemption=preemption,
                                **hooks.checkpoint_items()):
        break
  finally:
    for log in logs:
      log.flush()
    run.mngr.wait_until_finished()
    preemption.restore()
    run.writer.flush()
  return state, step, metrics, curve.points
