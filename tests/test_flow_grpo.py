"""Flow-GRPO maths against float64 references of docs/design.md section 5."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxedit import flow, grpo


def _reference_step(x, v, t, t_next, a, sde_type):
  """float64 numpy transcription of the formulas in docs/design.md section 5."""
  x, v = x.astype(np.float64), v.astype(np.float64)
  dt = t_next - t
  if sde_type == "sde":
    sigma = a * np.sqrt(t / (1 - (t_next if t == 1 else t)))
    mean = x * (1 + sigma**2 / (2 * t) * dt) + v * (1 + sigma**2 * (1 - t) / (2 * t)) * dt
    return mean, sigma * np.sqrt(-dt), sigma
  std = t_next * np.sin(a * np.pi / 2)
  mean = (x - t * v) * (1 - t_next) + (x + (1 - t) * v) * np.sqrt(t_next**2 - std**2)
  return mean, std, std


def _reference_log_prob(sample, mean, std, sde_type):
  sample = sample.astype(np.float64)
  if sde_type == "cps":
    return -((sample - mean) ** 2).mean(axis=(1, 2, 3))
  logp = -((sample - mean) ** 2) / (2 * std**2) - np.log(std) - 0.5 * np.log(2 * np.pi)
  return logp.mean(axis=(1, 2, 3))


@pytest.mark.parametrize("sde_type", ["sde", "cps"])
@pytest.mark.parametrize("t, t_next", [(1.0, 0.9), (0.6, 0.45), (0.2, 0.1)])
def test_sde_step_matches_float64_reference(sde_type, t, t_next):
  rng = np.random.default_rng(0)
  x, v, noise = (rng.normal(size=(3, 4, 4, 3)).astype(np.float32) for _ in range(3))
  mean, std, kl_sigma = flow.sde_step_mean(jnp.asarray(x), jnp.asarray(v), t, t_next, 0.7,
                                           sde_type)
  ref_mean, ref_std, ref_sigma = _reference_step(x, v, t, t_next, 0.7, sde_type)
  np.testing.assert_allclose(mean, ref_mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(std, ref_std, rtol=1e-6)
  np.testing.assert_allclose(kl_sigma, ref_sigma, rtol=1e-6)
  assert np.isfinite(ref_sigma) and ref_sigma > 0  # t = 1 uses t_next in the denominator
  sample = ref_mean + ref_std * noise
  logp = flow.sde_log_prob(jnp.asarray(sample, jnp.float32), mean, std, sde_type)
  np.testing.assert_allclose(logp, _reference_log_prob(sample, ref_mean, ref_std, sde_type),
                             rtol=2e-5, atol=2e-5)


def test_zero_noise_is_the_euler_step_for_both_types():
  rng = np.random.default_rng(1)
  x, v = (jnp.asarray(rng.normal(size=(2, 4, 4, 3)), jnp.float32) for _ in range(2))
  for sde_type in flow.SDE_TYPES:
    mean, std, _ = flow.sde_step_mean(x, v, 0.7, 0.5, 0.0, sde_type)
    np.testing.assert_allclose(mean, x - 0.2 * v, rtol=1e-6, atol=1e-6)
    assert float(std) == 0.0


def _toy_velocity(x, t):
  return jnp.tanh(x) * (1 + t[:, None, None, None])


def test_rollout_log_probs_match_recomputation_and_ode_outside_the_window():
  times = flow.sigmas(6, shift=3.0)
  levels = jnp.array([0.0, 0.7, 0.7, 0.7, 0.0, 0.0])  # an SDE window over steps 1-3
  x1 = jax.random.normal(jax.random.key(0), (3, 4, 4, 3))
  out = flow.sde_rollout(_toy_velocity, x1, times, jax.random.key(1), levels,
                         keep_trajectory=True)
  lat = out["latents"]
  assert lat.shape == (7, 3, 4, 4, 3)
  np.testing.assert_array_equal(out["sample"], lat[-1])
  for i in range(6):
    t = jnp.full((3,), times[i])
    mean, std, _ = flow.sde_step_mean(lat[i], _toy_velocity(lat[i], t), times[i], times[i + 1],
                                      levels[i])
    if levels[i] == 0:  # ODE steps are deterministic and carry no log-prob
      np.testing.assert_allclose(lat[i + 1], mean, rtol=1e-6, atol=1e-6)
      np.testing.assert_array_equal(out["log_probs"][i], 0.0)
    else:
      np.testing.assert_allclose(out["log_probs"][i], flow.sde_log_prob(lat[i + 1], mean, std),
                                 rtol=1e-5, atol=1e-5)
  # Without noise the rollout is the Euler sampler.
  ode = flow.sde_rollout(_toy_velocity, x1, times, None, jnp.zeros(6))["sample"]
  np.testing.assert_allclose(flow.euler_sample(_toy_velocity, x1, times), ode)


def test_group_advantages_against_numpy():
  rewards = np.array([1.0, 0.0, 0.5, 0.5, 0.2, 0.9, 0.3, 0.3, 0.3], np.float32)
  groups = rewards.reshape(3, 3)
  centred = groups - groups.mean(1, keepdims=True)
  want_global = np.clip(centred / (rewards.std() + 1e-4), -5, 5).reshape(-1)
  want_group = np.clip(centred / (groups.std(1, keepdims=True) + 1e-4), -5, 5).reshape(-1)
  np.testing.assert_allclose(grpo.group_advantages(rewards, 3), want_global, rtol=1e-5)
  np.testing.assert_allclose(grpo.group_advantages(rewards, 3, std_scope="group"),
                             want_group, rtol=1e-5, atol=1e-6)
  # The all-equal third group contributes exactly nothing, with either scope.
  for scope in grpo.STD_SCOPES:
    np.testing.assert_array_equal(grpo.group_advantages(rewards, 3, std_scope=scope)[6:], 0.0)
  assert float(jnp.abs(grpo.group_advantages(rewards, 3, clip=0.5)).max()) == 0.5
  with pytest.raises(ValueError, match="groups of 4"):
    grpo.group_advantages(rewards, 4)


def test_masked_rewards_are_left_out_of_the_group_statistics():
  """A NaN reward (a sample a judge could not score) gets zero advantage and the others are
  normalised as if it had never been sampled."""
  nan = np.nan
  rewards = np.array([1.0, nan, 0.5, 0.2, 0.2, nan, 0.3, 0.9, 0.4, nan, nan, 0.7],
                     np.float32)
  valid = ~np.isnan(rewards)
  groups = [rewards[i:i + 3][valid[i:i + 3]] for i in range(0, 12, 3)]
  everything = rewards[valid]
  for scope in grpo.STD_SCOPES:
    want = np.zeros(12, np.float64)
    for g, group in enumerate(groups):
      std = group.std() if scope == "group" else everything.std()
      adv = np.clip((group - group.mean()) / (std + 1e-4), -5, 5)
      want[3 * g:3 * g + 3][valid[3 * g:3 * g + 3]] = adv if np.ptp(group) else 0.0
    got = np.asarray(jax.jit(grpo.group_advantages, static_argnums=1,
                             static_argnames="std_scope")(rewards, 3, std_scope=scope))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert np.isfinite(got).all() and (got[~valid] == 0).all()
    # The all-equal second group (0.2, 0.2 and a masked one) and the one-valid last group:
    # exactly zero.
    assert (got[3:6] == 0).all() and (got[9:] == 0).all()


def test_clipped_loss_on_policy_ratio_is_one_and_gradient_is_policy_gradient():
  logp = jnp.array([-1.2, 0.3, 2.0])
  adv = jnp.array([1.0, -0.5, 2.0])
  loss, ratio = grpo.clipped_policy_loss(logp, logp, adv, 1e-4)
  np.testing.assert_array_equal(ratio, 1.0)
  np.testing.assert_array_equal(loss, -adv)
  grad = jax.grad(lambda lp: grpo.clipped_policy_loss(lp, logp, adv, 1e-4)[0].sum())(logp)
  np.testing.assert_allclose(grad, -adv)
  # Off policy beyond the clip range, the gradient vanishes on the clipped side.
  moved = logp + jnp.array([0.1, -0.1, -0.1])
  grad = jax.grad(lambda lp: grpo.clipped_policy_loss(lp, logp, adv, 1e-4)[0].sum())(moved)
  np.testing.assert_allclose(grad, [0.0, 0.0, -2.0 * np.exp(-0.1)], rtol=1e-6)


def test_mean_kl_is_zero_at_the_reference_and_matches_formula():
  rng = np.random.default_rng(2)
  mu, mu_ref = (jnp.asarray(rng.normal(size=(2, 4, 4, 3)), jnp.float32) for _ in range(2))
  np.testing.assert_array_equal(grpo.mean_kl(mu, mu, 0.3), 0.0)
  want = ((np.asarray(mu, np.float64) - np.asarray(mu_ref)) ** 2).mean((1, 2, 3)) / (2 * 0.09)
  np.testing.assert_allclose(grpo.mean_kl(mu, mu_ref, 0.3), want, rtol=1e-5)
