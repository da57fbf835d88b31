"""The one RL loop, for any policy and algorithm: each iteration the policy's rollouts are
sampled and scored (on the update's devices, or with `rollout.rollout_devices` on devices of
their own one iteration ahead: `jaxedit.overlap`), the algorithm's update runs on them, and
`train.loop` does the rest (progress, logs, validation, samples, checkpoints, preemption).

A policy (`Policy`: the editor's, the planner's) knows how to start, sample, score and
evaluate; an algorithm (`Algorithm`: GRPO, OPD) is an update over a policy's rollouts."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable

import flax
import jax
import ml_collections

from jaxedit import checkpoint, evaluation, overlap
from jaxedit.config import ConfigError
from jaxedit.train import loop


@flax.struct.dataclass
class PolicyState:
  """The train state of an RL run. With LoRA the adapters (`params`) train over a frozen
  `base`; in full fine-tuning every parameter trains. `reference` is a frozen copy of the
  trained parameters at the start (over `base` under LoRA: the planner's adapters and vision
  prefix), or None where the reference is the base alone (the editor's LoRA)."""
  step: jax.Array  # RL iterations done
  params: Any  # the trained parameters: the LoRA adapters, or every parameter
  ema_params: Any
  opt_state: Any
  base: Any = None  # LoRA: the frozen base the adapters add to
  reference: Any = None  # the frozen start of `params`


class Policy:
  """What the RL loop asks of the model it trains. Built once per run, on the update's setup
  and the rollouts' (the same setup without rollout devices).

  A rollout is whatever `roll` returns and `update_inputs`, `scalars` and `samples` read."""

  start_kind = "a workdir"  # what `init_from` names, for the error of a run without one

  @staticmethod
  def abstract_state(setup) -> PolicyState:
    """The state's abstract arrays, carrying their shardings (restore targets)."""
    raise NotImplementedError

  @classmethod
  def evaluate(cls, setup, state: PolicyState, out: str) -> dict:
    """The trained policy and its start scored on `eval.split`, images written to `out`:
    the summary (after's figures at the top level, `before`, `change`)."""
    raise NotImplementedError

  def __init__(self, setup, rollout_setup, algorithm: Algorithm, run: loop.Run):
    self.setup, self.rollout_setup, self.algorithm, self.run = (setup, rollout_setup,
                                                                algorithm, run)
    self.overlapped = rollout_setup is not setup

  def start_state(self) -> PolicyState:
    """A fresh run's state, from `init_from`."""
    raise NotImplementedError

  def train_prompts(self):
    """The checkpointable iterator of this process's training prompts."""
    raise NotImplementedError

  def roll(self, step: int, params, base, data_iter):
    """Iteration `step`'s rollouts, sampled with (params, base) on the rollout setup's mesh,
    scored, ready for the update's."""
    raise NotImplementedError

  def update_inputs(self, rollouts, step: int) -> tuple:
    """The update's arguments after the state."""
    raise NotImplementedError

  def scalars(self, rollouts) -> dict:
    """Host figures of the rollouts (rewards), logged beside the update's metrics."""
    return {}

  def validate(self, state: PolicyState, step: int):
    """(summary, extras) of a validation pass (train.loop.Hooks.validate)."""
    raise NotImplementedError

  def samples(self, state: PolicyState, step: int, extras, rollouts) -> None:
    """Sample grids at `train.sample_every`; rollouts are the last iteration's (None at 0)."""


@dataclasses.dataclass(frozen=True)
class Algorithm:
  """An RL update over a policy's rollouts."""
  name: str
  policy: type[Policy]
  make_setup: Callable  # (config, workdir, devices=None) -> setup
  # setup -> update(state, *policy.update_inputs(rollouts, step)) -> (state, metrics)
  make_update: Callable
  # (setup, records) -> {name: per-row array}: fields the update needs beside the policy's
  extra_fields: Callable = lambda setup, records: {}


def train(config: ml_collections.ConfigDict, workdir: str, algorithm: Algorithm) -> dict:
  setup, rollout_setup = overlap.make_setups(algorithm.make_setup, config, workdir)
  run = loop.Run(setup.config, workdir)  # as set up: shapes read from init_from included
  if not run.resuming and not config.init_from:
    raise ConfigError(f"config key 'init_from' must name {algorithm.policy.start_kind} to "
                      "start from (--config.init_from=DIR)")
  policy = algorithm.policy(setup, rollout_setup, algorithm, run)
  overlapped = policy.overlapped
  data_iter = policy.train_prompts()
  state = run.restore_or_init(policy.abstract_state(setup), data_iter, policy.start_state)
  update = algorithm.make_update(setup)
  # The frozen base of the rollouts: the current state's (each update donates the state) or
  # a copy on the rollout mesh.
  base = {"rollout": overlap.to_mesh(state.base, rollout_setup.mesh) if overlapped
          else state.base}

  def roll(step, params):
    with jax.profiler.StepTraceAnnotation("rollout", step_num=step):
      return policy.roll(step, params, base["rollout"], data_iter)

  schedule = overlap.Schedule(roll, rollout_setup, data_iter, config.train.num_steps,
                              overlapped)
  schedule.start(loop.step_of(state), state.params, run.mngr)
  last = {"rollouts": None}

  def step_fn(state, step):
    if not overlapped:
      base["rollout"] = state.base
    rollouts = schedule.rollouts(step, state.params)
    with jax.profiler.StepTraceAnnotation("update", step_num=step):
      state, metrics = update(state, *policy.update_inputs(rollouts, step))  # not awaited
    schedule.after_update(step)  # overlapped: the next rollouts, while the update runs
    last["rollouts"] = rollouts
    return state, metrics, lambda: policy.scalars(rollouts)

  hooks = loop.Hooks(
      validate=policy.validate, validate_start=True, checkpoint_items=schedule.checkpoint_items,
      samples=lambda state, step, extras: policy.samples(state, step, extras,
                                                         last["rollouts"]))
  state, step, _, curve = loop.run(run, state, data_iter, step_fn, hooks, log_prefix="train/")
  return {"step": step, "curve": curve}


def run_eval(config: ml_collections.ConfigDict, workdir: str, algorithm: Algorithm) -> dict:
  """Scores the latest checkpoint on `eval.split`, before (the start) and after training;
  writes DIR/eval/metrics.json and the policy's images beside it."""
  setup = algorithm.make_setup(config, workdir)
  step, state = checkpoint.restore_latest(workdir, config.train.keep_checkpoints,
                                          algorithm.policy.abstract_state(setup))
  out = os.path.join(workdir, "eval")
  os.makedirs(out, exist_ok=True)
  start = time.time()
  summary = algorithm.policy.evaluate(setup, state, out)
  summary.update({"step": step, "eval_seconds": round(time.time() - start, 1)})
  evaluation.write_metrics(os.path.join(out, "metrics.json"), summary)
  print(json.dumps(summary, indent=1), flush=True)
  return summary


def change(before: dict, after: dict) -> dict:
  """after - before for every float figure, nested ones (held_out_families) included."""
  out = {}
  for k, v in after.items():
    if isinstance(v, float) and isinstance(before.get(k), float):
      out[k] = v - before[k]
    elif isinstance(v, dict) and isinstance(before.get(k), dict):
      out[k] = change(before[k], v)
  return out
