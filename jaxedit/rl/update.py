"""The optimizer updates of one RL iteration, written once: `inner_epochs` x `minibatches`
steps over shuffled samples, one jitted `lax.scan`, the EMA after each step."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from jaxedit import grpo

# Metrics of an iteration's updates reduced by min/max rather than averaged.
ACROSS_UPDATES = {"ratio_min": jnp.min, "ratio_max": jnp.max}


def minibatch_updates(optimizer, hp: dict, state, rng, n: int, inner_epochs: int,
                      minibatches: int, loss_and_grads: Callable):
  """(params, ema, opt_state, metrics) after the iteration's updates of `state` (its
  `params`, `ema_params`, `opt_state` and `step`, the iterations done).

  loss_and_grads(params, idx) -> (loss, grads, metrics) of the minibatch of sample indices
  `idx`; a fresh permutation of the n samples per epoch (from `rng`) is cut into
  minibatches. Metrics are averaged over the updates (ratio_min/max: min/max), with the
  loss, learning rate and gradient norm of each."""
  order = grpo.minibatch_order(rng, n, inner_epochs, minibatches)
  per_step = inner_epochs * minibatches

  def one_update(carry, xs):
    params, ema, opt_state = carry
    i, idx = xs
    loss, grads, metrics = loss_and_grads(params, idx)
    params, ema, opt_state, rate = optimizer.update(hp, params, ema, opt_state, grads,
                                                    state.step * per_step + i)
    return (params, ema, opt_state), {**metrics, "loss": loss, "lr": rate,
                                      "grad_norm": optax.tree.norm(grads)}

  (params, ema, opt_state), per_update = jax.lax.scan(
      one_update, (state.params, state.ema_params, state.opt_state),
      (jnp.arange(per_step), order))
  metrics = {k: ACROSS_UPDATES.get(k, jnp.mean)(v) for k, v in per_update.items()}
  return params, ema, opt_state, metrics
