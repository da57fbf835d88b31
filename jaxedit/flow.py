"""Flow-matching maths (DESIGN.md section 4): t in [0, 1], t = 1 is noise, t = 0 is data.

x_t = (1 - t) x0 + t eps, target velocity v = eps - x0, sampling from t = 1 down to 0.
"""

from __future__ import annotations

from typing import Callable

import einops
import jax
import jax.numpy as jnp


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


def changed_patch_weights(source, target, patch: int, changed_weight: float):
  """(B, H, W, 1) loss weights: `changed_weight` on the p x p patches (tokens) where target
  differs from source, 1 elsewhere. In editing most pixels are copies; this puts the gradient
  on the edit. Where the target is a function of (source, instruction), as in the shapes
  world, the minimiser is unchanged; with ambiguous targets it leans towards the edits."""
  diff = jnp.abs(target.astype(jnp.float32) - source.astype(jnp.float32))
  changed = einops.reduce(diff, "b (h ph) (w pw) c -> b h w", "max", ph=patch, pw=patch) > 0
  changed = einops.repeat(changed, "b h w -> b (h ph) (w pw) 1", ph=patch, pw=patch)
  return jnp.where(changed, changed_weight, 1.0)


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
  """Deterministic Euler ODE from x1 at times[0] (= 1) to times[-1] (= 0).

  `velocity(x, t)` takes t of shape (B,). Scanned, so compile time is flat in steps.
  """
  def step(x, ts):
    t, t_next = ts
    v = velocity(x, jnp.full((x.shape[0],), t, x.dtype))
    return x + (t_next - t) * v, None

  x, _ = jax.lax.scan(step, x1, (times[:-1], times[1:]))
  return x


def to_model_space(images_uint8):
  return images_uint8.astype(jnp.float32) / 127.5 - 1.0


def to_uint8(x):
  return jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255).astype(jnp.uint8)
