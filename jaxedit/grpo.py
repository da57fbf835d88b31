"""GRPO maths shared by the editor (Flow-GRPO) and the planner: group-normalised advantages
and the clipped ratio objective (docs/design.md sections 5 and 6). Pure jnp, so it runs inside
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
  A group whose rewards are all equal gets exactly zero advantage either way. A NaN reward
  is a masked sample (a judge that could not score it, `jaxedit.rewards`): it is left out
  of the means and stds and gets zero advantage.
  """
  if std_scope not in STD_SCOPES:
    raise ValueError(f"unknown advantage std scope {std_scope!r}; use one of {STD_SCOPES}")
  rewards = jnp.asarray(rewards, jnp.float32)
  if rewards.shape[0] % group_size:
    raise ValueError(f"{rewards.shape[0]} rewards do not split into groups of {group_size}")
  valid = ~jnp.isnan(rewards)
  # Without masked samples, the plain statistics (the same float operations as always).
  groups = rewards.reshape(-1, group_size)
  centred = groups - groups.mean(axis=1, keepdims=True)
  std = groups.std(axis=1, keepdims=True) if std_scope == "group" else rewards.std()
  plain = jnp.clip(centred / (std + eps), -clip, clip).reshape(-1)
  return jnp.where(valid.all(), plain, _masked_advantages(rewards, valid, group_size,
                                                          std_scope, clip, eps))


def _masked_advantages(rewards, valid, group_size: int, std_scope: str, clip: float,
                       eps: float):
  """group_advantages over the valid samples only; zero for the others."""
  m = valid.astype(jnp.float32).reshape(-1, group_size)
  r = jnp.where(valid, rewards, 0.0).reshape(-1, group_size)
  count = m.sum(axis=1, keepdims=True)
  centred = (r - r.sum(axis=1, keepdims=True) / jnp.maximum(count, 1.0)) * m
  lo = jnp.where(m > 0, r, jnp.inf).min(axis=1, keepdims=True)
  hi = jnp.where(m > 0, r, -jnp.inf).max(axis=1, keepdims=True)
  centred = jnp.where(lo == hi, 0.0, centred)  # equal rewards: exactly zero, as unmasked
  if std_scope == "group":
    std = jnp.sqrt((centred**2).sum(axis=1, keepdims=True) / jnp.maximum(count, 1.0))
  else:
    total = jnp.maximum(m.sum(), 1.0)
    spread = (r - r.sum() / total) * m
    std = jnp.sqrt((spread**2).sum() / total)
  return (jnp.clip(centred / (std + eps), -clip, clip) * m).reshape(-1)


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


AGGREGATIONS = ("sequence_mean", "token_mean")


def k3_kl(logp, logp_ref):
  """Per-token k3 estimator of KL(policy || reference) on tokens sampled from the policy:
  exp(ref - logp) - (ref - logp) - 1 >= 0, zero where the two agree."""
  delta = jax.lax.stop_gradient(logp_ref) - logp
  return jnp.exp(delta) - delta - 1.0


def token_policy_loss(logp, logp_old, logp_ref, advantages, mask, *, clip_range: float,
                      kl_beta: float, aggregation: str = "sequence_mean"):
  """Token-level GRPO loss for the planner (docs/design.md section 6).

  logp, logp_old, logp_ref, mask: (N, T) log-probs of the sampled tokens under the policy
  being trained, the policy that sampled them and the frozen reference; advantages: (N,),
  shared by every token of a sequence. Per token: the clipped surrogate plus
  kl_beta * k3 KL. `sequence_mean` averages over each sequence's tokens, then over
  sequences (GRPO); `token_mean` averages over all tokens of the batch (DAPO).
  Returns (loss, metrics).
  """
  if aggregation not in AGGREGATIONS:
    raise ValueError(f"unknown loss aggregation {aggregation!r}; use one of {AGGREGATIONS}")
  mask = mask.astype(jnp.float32)
  surrogate, ratio = clipped_policy_loss(logp, logp_old, advantages[:, None], clip_range)
  kl = k3_kl(logp, logp_ref)
  per_token = surrogate + kl_beta * kl
  if aggregation == "sequence_mean":
    lengths = jnp.maximum(mask.sum(1), 1.0)
    reduce = lambda x: jnp.mean((x * mask).sum(1) / lengths)
  else:
    reduce = lambda x: (x * mask).sum() / jnp.maximum(mask.sum(), 1.0)
  clipped = (jnp.abs(ratio - 1.0) > clip_range).astype(jnp.float32)
  big = jnp.where(mask > 0, ratio, -jnp.inf).max()
  small = jnp.where(mask > 0, ratio, jnp.inf).min()
  metrics = {"policy_loss": reduce(surrogate), "kl": reduce(kl), "ratio_mean": reduce(ratio),
             "ratio_min": small, "ratio_max": big, "clip_fraction": reduce(clipped)}
  return reduce(per_token), metrics


def minibatch_order(rng, n: int, inner_epochs: int, minibatches: int):
  """(inner_epochs * minibatches, n // minibatches) sample indices: a fresh permutation of
  the n samples per epoch, cut into minibatches."""
  order = jnp.concatenate([jax.random.permutation(k, n)
                           for k in jax.random.split(rng, inner_epochs)])
  return order.reshape(inner_epochs * minibatches, n // minibatches)
