"""Flow-matching maths (docs/design.md section 4): t in [0, 1], t = 1 is noise, t = 0 is data.

x_t = (1 - t) x0 + t eps, target velocity v = eps - x0, sampling from t = 1 down to 0.
"""

from __future__ import annotations

import math
from typing import Callable

import einops
import jax
import jax.numpy as jnp
import optax


def shift_time(t, shift: float):
  """The SD3/Flux resolution shift: pushes t towards 1 (more noise) for shift > 1."""
  return shift * t / (1 + (shift - 1) * t)


def sample_time(rng, batch: int, *, kind: str = "logit_normal", mean: float = 0.0,
                std: float = 1.0, shift: float = 1.0):
  """Training timesteps: logit-normal or uniform, then shifted."""
  if kind == "logit_normal":
    t = jax.nn.sigmoid(mean + std * jax.random.normal(rng, (batch,)))
  elif kind == "uniform":
    t = jax.random.uniform(rng, (batch,))
  else:
    raise ValueError(f"unknown timestep sampling {kind!r}; use 'logit_normal' or 'uniform'")
  return shift_time(t, shift)


def interpolate(x0, eps, t):
  t = t.reshape(-1, *([1] * (x0.ndim - 1)))
  return (1 - t) * x0 + t * eps


def sft_loss(v_pred, x0, eps, weights=None):
  """mean((v_pred - (eps - x0))^2) over every element, or its `weights`-weighted mean
  (weights broadcast against x0)."""
  err = (v_pred.astype(jnp.float32) - (eps - x0).astype(jnp.float32)) ** 2
  if weights is None:
    return jnp.mean(err)
  weights = jnp.broadcast_to(weights, err.shape)
  return jnp.sum(weights * err) / jnp.sum(weights)


def changed_patch_weights(source, target, grid: tuple[int, int], patch: int,
                          changed_weight: float):
  """(B, rows * p, cols * p, 1) loss weights over the model's input (pixels or latents,
  p = `patch` of them per token side): `changed_weight` on the tokens of the `grid` (rows,
  cols) whose region of the images target differs from source in, 1 elsewhere. In editing
  most pixels are copies; this puts the gradient on the edit. Where the target is a
  function of (source, instruction), as in the shapes world, the minimiser is unchanged;
  with ambiguous targets it leans towards the edits."""
  changed = changed_regions(source, target, *grid)
  changed = einops.repeat(changed, "b h w -> b (h ph) (w pw) 1", ph=patch, pw=patch)
  return jnp.where(changed, changed_weight, 1.0)


def changed_regions(source, target, rows: int, cols: int):
  """(B, rows, cols) bool: whether target differs from source anywhere in each of the
  rows x cols equal regions of the (B, H, W, C) images."""
  diff = jnp.abs(target.astype(jnp.float32) - source.astype(jnp.float32))
  return einops.reduce(diff, "b (h ph) (w pw) c -> b h w", "max", h=rows, w=cols) > 0


def grounding_loss(cell_logits, source, target, keep=None):
  """Where-the-edit-acts loss: per-cell sigmoid cross-entropy of the editor's cell logits
  (B, n*n), predicted from the instruction alone, against the n x n regions that target
  changes, summed over cells, averaged over the examples `keep` selects (default all)."""
  n = math.isqrt(cell_logits.shape[-1])
  changed = changed_regions(source, target, n, n).reshape(cell_logits.shape)
  per_example = optax.sigmoid_binary_cross_entropy(cell_logits.astype(jnp.float32),
                                                   changed.astype(jnp.float32)).sum(-1)
  keep = jnp.ones(per_example.shape, bool) if keep is None else keep
  return jnp.where(keep, per_example, 0.0).sum() / jnp.maximum(keep.sum(), 1)


def sigmas(num_steps: int, shift: float = 1.0):
  """num_steps + 1 times from 1 down to 0, shifted."""
  return shift_time(jnp.linspace(1.0, 0.0, num_steps + 1), shift)


def guided(velocity: Callable, guidance_scale: float) -> Callable:
  """Classifier-free guidance: v_u + s (v_c - v_u); `velocity(x, t, cond: bool)`."""
  if guidance_scale == 1.0:
    return lambda x, t: velocity(x, t, True)
  return lambda x, t: (velocity(x, t, False)
                       + guidance_scale * (velocity(x, t, True) - velocity(x, t, False)))


def euler_sample(velocity: Callable, x1, times):
  """Deterministic Euler ODE from x1 at times[0] (= 1) to times[-1] (= 0): `sde_rollout`
  with no noise, keeping only the end point.

  `velocity(x, t)` takes t of shape (B,). Scanned, so compile time is flat in steps.
  """
  return sde_rollout(velocity, x1, times, None, jnp.zeros(times.shape[0] - 1))["sample"]


# ------------------------------------------------------------------------------------------
# Stochastic sampling with log-probabilities (Flow-GRPO, docs/design.md section 5).
# ------------------------------------------------------------------------------------------
SDE_TYPES = ("sde", "cps")


def sde_sigma(t, t_next, noise_level):
  """Flow-GRPO's sigma_t = a sqrt(t / (1 - t)); at t = 1 the denominator uses t_next."""
  return noise_level * jnp.sqrt(t / (1 - jnp.where(t >= 1, t_next, t)))


def sde_step_mean(x, v, t, t_next, noise_level, sde_type: str = "sde"):
  """Mean and std of x_{t_next} given x_t and the velocity, and the sigma the KL divides by.

  Scalars t, t_next, noise_level (noise_level 0 is the Euler ODE step for either type).
  Computed in float32. Returns (mean, std, kl_sigma).
  """
  x, v = x.astype(jnp.float32), v.astype(jnp.float32)
  t, t_next = jnp.float32(t), jnp.float32(t_next)
  dt = t_next - t
  if sde_type == "sde":
    sigma = sde_sigma(t, t_next, noise_level)
    mean = x * (1 + sigma**2 / (2 * t) * dt) + v * (1 + sigma**2 * (1 - t) / (2 * t)) * dt
    return mean, sigma * jnp.sqrt(-dt), sigma
  if sde_type == "cps":
    std = t_next * jnp.sin(noise_level * jnp.pi / 2)
    x0_hat, x1_hat = x - t * v, x + (1 - t) * v
    mean = x0_hat * (1 - t_next) + x1_hat * jnp.sqrt(t_next**2 - std**2)
    return mean, std, std
  raise ValueError(f"unknown sde_type {sde_type!r}; use one of {SDE_TYPES}")


def sde_log_prob(sample, mean, std, sde_type: str = "sde"):
  """Log-density of the stop-gradient `sample`, averaged (not summed) over non-batch dims.

  "sde": the Gaussian N(mean, std^2); "cps": -(sample - mean)^2 without constants. Where
  std is 0 (an ODE step) the value is meaningless and callers mask it out.
  """
  sample = jax.lax.stop_gradient(sample.astype(jnp.float32))
  dims = tuple(range(1, sample.ndim))
  if sde_type == "cps":
    return -jnp.mean((sample - mean) ** 2, axis=dims)
  std = jnp.where(std > 0, std, 1.0)
  logp = (-((sample - mean) ** 2) / (2 * std**2) - jnp.log(std)
          - 0.5 * jnp.log(2 * jnp.pi))
  return jnp.mean(logp, axis=dims)


def sde_rollout(velocity: Callable, x1, times, rng, noise_levels, sde_type: str = "sde",
                keep_trajectory: bool = False):
  """Samples from times[0] to times[-1]; step i uses noise level `noise_levels[i]` (0: an
  ODE step, so a zero outside a window gives Flow-GRPO-Fast's SDE window).

  Returns {"sample": x at times[-1], "log_probs": (T, B) (0 at ODE steps)} and, with
  keep_trajectory, "latents": (T + 1, B, ...) the states x_{t_0} ... x_{t_T}.
  """
  num_steps = times.shape[0] - 1
  # Per-step noise keys; without an rng (an ODE) a dummy per-step input instead.
  keys = (jax.random.key_data(jax.random.split(rng, num_steps)) if rng is not None
          else jnp.zeros((num_steps,), jnp.uint32))

  def step(x, inputs):
    t, t_next, level, key = inputs
    v = velocity(x, jnp.full((x.shape[0],), t, x.dtype))
    mean, std, _ = sde_step_mean(x, v, t, t_next, level, sde_type)
    x_next = mean
    if rng is not None:  # without an rng every step must be an ODE step
      x_next = mean + std * jax.random.normal(jax.random.wrap_key_data(key), x.shape)
    logp = jnp.where(std > 0, sde_log_prob(x_next, mean, std, sde_type), 0.0)
    x_next = x_next.astype(x.dtype)
    return x_next, (x_next if keep_trajectory else None, logp)

  x, (latents, log_probs) = jax.lax.scan(
      step, x1, (times[:-1], times[1:], jnp.asarray(noise_levels, jnp.float32), keys))
  out = {"sample": x, "log_probs": log_probs}
  if keep_trajectory:
    out["latents"] = jnp.concatenate([x1[None], latents], axis=0)
  return out


def to_model_space(images_uint8):
  return images_uint8.astype(jnp.float32) / 127.5 - 1.0


def to_uint8(x):
  return jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255).astype(jnp.uint8)
