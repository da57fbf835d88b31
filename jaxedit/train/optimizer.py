"""One optimizer for every trainer: AdamW with global-norm clipping at unit learning rate,
the rate (the traced peak `hp['lr']` times a schedule) applied outside it, and an EMA of the
parameters with a warm-up.

The peak rate is an input of the compiled steps (`jaxedit.hparams`), so a sweep over it or
a population of rates reuses one program; scaling a unit-rate AdamW update by the rate is
the same arithmetic as AdamW at that rate.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax


@dataclasses.dataclass(frozen=True)
class Optimizer:
  tx: optax.GradientTransformation  # unit rate; optax.MultiSteps when accumulating
  schedule: Callable  # optimizer update -> the rate relative to the peak
  ema_decay: float
  accumulate: int = 1  # gradients summed into one update (optax.MultiSteps)
  # (top-level module, factor): that module's rate is the peak's times the factor.
  rate_factors: tuple[tuple[str, float], ...] = ()

  def init(self, params):
    return self.tx.init(params)

  def update(self, hp: dict, params, ema, opt_state, grads, count):
    """(params, ema, opt_state, rate) after one step on `grads`; `count` steps were taken
    before (minibatch steps when accumulating). The EMA decay warms up as
    min(ema_decay, (1 + count) / (10 + count)), so early on the average does not stay at
    the initialisation; when accumulating, the EMA moves only where an update applied."""
    updates, opt_state = self.tx.update(grads, opt_state, params)
    rate = hp["lr"] * self.schedule(count // self.accumulate)
    factors = dict(self.rate_factors)
    if factors:
      updates = {k: jax.tree.map(lambda u, f=factors.get(k, 1.0): u * f, v)
                 for k, v in updates.items()}
    params = apply_at_rate(params, updates, rate)
    decay = jnp.minimum(self.ema_decay, (1.0 + count) / (10.0 + count))
    new_ema = optax.incremental_update(params, ema, 1.0 - decay)
    if self.accumulate > 1:
      applied = self.tx.has_updated(opt_state)
      new_ema = jax.tree.map(lambda a, b: jnp.where(applied, a, b), new_ema, ema)
    return params, new_ema, opt_state, rate


def apply_at_rate(params, updates, rate):
  """Parameters after a unit-rate optimizer's `updates` scaled by the (traced) rate."""
  return optax.apply_updates(params, jax.tree.map(lambda u: (u * rate).astype(u.dtype),
                                                  updates))


def _adamw(tc: ml_collections.ConfigDict) -> optax.GradientTransformation:
  return optax.chain(optax.clip_by_global_norm(tc.grad_clip),
                     optax.adamw(1.0, b1=tc.b1, b2=tc.b2, weight_decay=tc.weight_decay))


def supervised(tc: ml_collections.ConfigDict,
               rate_factors: tuple[tuple[str, float], ...] = ()) -> Optimizer:
  """From a `train` section: linear warm-up, then cosine decay to `end_lr_fraction` of the
  peak at `num_steps`; `rate_factors` scale the rate of top-level modules."""
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, 1.0, tc.warmup_steps, max(tc.num_steps, tc.warmup_steps + 1),
      end_value=tc.end_lr_fraction)
  return Optimizer(_adamw(tc), schedule, tc.ema_decay, rate_factors=rate_factors)


def on_policy(tc: ml_collections.ConfigDict, accumulate: int = 1) -> Optimizer:
  """For the RL trainers (rollouts then updates): a linear warm-up over optimizer updates,
  then constant; `accumulate` minibatch gradients summed into each update."""
  warmup = optax.linear_schedule(0.0, 1.0, tc.warmup_steps) if tc.warmup_steps else None
  schedule = warmup or (lambda count: jnp.ones((), jnp.float32))
  tx = _adamw(tc)
  if accumulate > 1:
    tx = optax.MultiSteps(tx, accumulate)
  return Optimizer(tx, schedule, tc.ema_decay, accumulate)


