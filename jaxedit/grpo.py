"""GRPO maths shared by the editor (Flow-GRPO) and the planner: group-normalised advantages
and the clipped ratio objective (DESIGN.md sections 5 and 6). Pure jnp, so it runs inside
jit on global (sharded) arrays.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

STD_SCOPES = ("global", "group")


def group_advantages(rewards, group_size: int, *, std_scope: str = "global",
                     clip: float = 5.0, eps: float = 1e-4):
  """(N,) rewards of N = P * G samples, grouped as consecutive runs of `group_size` per
  prompt -> (N,) advantages (r - mean_group) / (std + eps), clipped to [-clip, clip].

  std is the population std of the group's rewards or of the whole batch's (`std_scope`).
  A group whose rewards are all equal gets exactly zero advantage either way.
  """
  if std_scope not in STD_SCOPES:
    raise ValueError(f"unknown advantage std scope {std_scope!r}; use one of {STD_SCOPES}")
  rewards = jnp.asarray(rewards, jnp.float32)
  if rewards.shape[0] % group_size:
    raise ValueError(f"{rewards.shape[0]} rewards do not split into groups of {group_size}")
  groups = rewards.reshape(-1, group_size)
  centred = groups - groups.mean(axis=1, keepdims=True)
  std = groups.std(axis=1, keepdims=True) if std_scope == "group" else rewards.std()
  return jnp.clip(centred / (std + eps), -clip, clip).reshape(-1)


def clipped_policy_loss(logp_new, logp_old, advantages, clip_range: float):
  """PPO's clipped surrogate per sample, max(-A r, -A clip(r, 1 - e, 1 + e)), with
  r = exp(logp_new - logp_old). Returns (loss (N,), ratio (N,))."""
  ratio = jnp.exp(logp_new - jax.lax.stop_gradient(logp_old))
  unclipped = -advantages * ratio
  clipped = -advantages * jnp.clip(ratio, 1.0 - clip_range, 1.0 + clip_range)
  return jnp.maximum(unclipped, clipped), ratio


def mean_kl(mean, mean_ref, sigma):
  """Flow-GRPO's per-step KL to the reference policy, ||mu - mu_ref||^2 / (2 sigma^2)
  averaged over non-batch dims (no -dt in the denominator: beta is tuned with that)."""
  dims = tuple(range(1, mean.ndim))
  return jnp.mean((mean - jax.lax.stop_gradient(mean_ref)) ** 2, axis=dims) / (2 * sigma**2)
