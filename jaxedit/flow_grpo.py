"""Flow-GRPO for the editor (docs/design.md section 5): SDE rollouts that record their trajectory
and log-probs, and the per-step clipped-ratio loss with the KL to a frozen reference.

Functions of a `velocity(params, x, t, source, text)`; the trainer jits and shards them.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxedit import flow, grpo

Velocity = Callable  # (params, x, t (B,), source, text) -> v


def step_schedule(num_steps: int, noise_level: float, timestep_fraction: float,
                  window_size: int = 0, window_start: int = 0):
  """Per-step noise levels (T,) and the indices of the trained steps.

  All steps are SDE steps unless `window_size` > 0 (Flow-GRPO-Fast): then only steps
  [window_start, window_start + window_size) are, with ODE steps outside. Trained steps are
  the SDE steps among the first int(T * timestep_fraction) (0.99 drops the last, whose
  Gaussian is too sharp); with noise level 0 (deterministic rollouts, for distillation's
  mean matching) all of those steps."""
  if not 0 < timestep_fraction <= 1:
    raise ValueError(f"timestep_fraction must be in (0, 1], got {timestep_fraction}")
  levels = np.full(num_steps, noise_level, np.float32)
  if window_size:
    if not 0 <= window_start <= num_steps - window_size:
      raise ValueError(f"SDE window [{window_start}, {window_start + window_size}) does not "
                       f"fit in {num_steps} steps")
    levels[:] = 0.0
    levels[window_start:window_start + window_size] = noise_level
  limit = int(num_steps * timestep_fraction)
  trained = np.array([i for i in range(limit) if levels[i] > 0 or noise_level == 0], np.int32)
  if trained.size == 0:
    raise ValueError("no step is trained: raise timestep_fraction or move the SDE window")
  return levels, trained


def rollout(velocity: Velocity, params, x1, source, text, times, levels, rng,
            sde_type: str = "sde"):
  """Samples N edits; returns {"sample", "log_probs" (T, N), "latents" (T + 1, N, ...)}."""
  return flow.sde_rollout(lambda x, t: velocity(params, x, t, source, text), x1, times, rng,
                          levels, sde_type, keep_trajectory=True)


def step_loss(velocity: Velocity, params, ref_velocity: Callable | None, batch: dict,
              step: jax.Array, times, levels, *, sde_type: str, clip_range: float,
              kl_beta: float):
  """Loss of trained step `step` (traced) for a minibatch of trajectories.

  batch: latents (T + 1, n, ...), log_probs (T, n), advantages (n,), source, text.
  ref_velocity(x, t, source, text): the frozen reference; None leaves the KL term out (for
  kl_beta == 0, which may be traced).
  Returns (scalar loss, metrics)."""
  x = batch["latents"][step]
  x_next = batch["latents"][step + 1]
  t, t_next, level = times[step], times[step + 1], levels[step]
  t_vec = jnp.full((x.shape[0],), t, x.dtype)
  v = velocity(params, x, t_vec, batch["source"], batch["text"])
  mean, std, kl_sigma = flow.sde_step_mean(x, v, t, t_next, level, sde_type)
  logp = flow.sde_log_prob(x_next, mean, std, sde_type)
  policy, ratio = grpo.clipped_policy_loss(logp, batch["log_probs"][step],
                                           batch["advantages"], clip_range)
  kl = jnp.zeros_like(policy)
  if ref_velocity is not None:
    v_ref = ref_velocity(x, t_vec, batch["source"], batch["text"])
    mean_ref, _, _ = flow.sde_step_mean(x, v_ref, t, t_next, level, sde_type)
    kl = grpo.mean_kl(mean, mean_ref, kl_sigma)
  loss = jnp.mean(policy + kl_beta * kl)
  metrics = {"policy_loss": jnp.mean(policy), "kl": jnp.mean(kl),
             "ratio_mean": jnp.mean(ratio), "ratio_min": jnp.min(ratio),
             "ratio_max": jnp.max(ratio),
             "clip_fraction": jnp.mean((jnp.abs(ratio - 1.0) > clip_range).astype(jnp.float32)),
             "logp_drift": jnp.mean(jnp.abs(logp - batch["log_probs"][step]))}
  return loss, metrics


def minibatch_grads(step_loss_fn: Callable, params, trained_steps):
  """Mean loss, gradient and metrics of `step_loss_fn(params, j) -> (loss, metrics)` over
  the trained steps j, accumulated one step at a time (a scan), so activation memory is
  that of one denoising step. Shared by Flow-GRPO and on-policy distillation."""
  grad_fn = jax.value_and_grad(step_loss_fn, has_aux=True)

  def body(acc, j):
    (loss, metrics), grads = grad_fn(params, j)
    acc_loss, acc_grads, acc_metrics = acc
    metrics = {k: REDUCE.get(k, jnp.add)(acc_metrics[k], v) for k, v in metrics.items()}
    return (acc_loss + loss, jax.tree.map(jnp.add, acc_grads, grads), metrics), None

  shapes = jax.eval_shape(grad_fn, params, trained_steps[0])[0][1]
  init_metrics = {k: jnp.full(s.shape, INIT.get(k, 0.0), s.dtype) for k, s in shapes.items()}
  init = (jnp.zeros(()), jax.tree.map(jnp.zeros_like, params), init_metrics)
  (loss, grads, metrics), _ = jax.lax.scan(body, init, trained_steps)
  n = trained_steps.shape[0]
  metrics = {k: v if k in REDUCE else v / n for k, v in metrics.items()}
  return loss / n, jax.tree.map(lambda g: g / n, grads), metrics


# Metrics reduced over steps by min/max rather than averaged.
REDUCE = {"ratio_min": jnp.minimum, "ratio_max": jnp.maximum}
INIT = {"ratio_min": jnp.inf, "ratio_max": -jnp.inf}
