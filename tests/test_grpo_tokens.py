"""Token-level GRPO loss of the planner against a float64 reference of docs/design.md section 6."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxedit import grpo


def batch(seed=0, n=6, t=7):
  rng = np.random.default_rng(seed)
  logp_old = -rng.uniform(0.1, 3.0, (n, t))
  logp = logp_old + rng.normal(0, 0.3, (n, t))
  logp_ref = logp_old + rng.normal(0, 0.3, (n, t))
  mask = np.arange(t)[None] < rng.integers(1, t + 1, (n, 1))
  adv = rng.normal(size=n)
  return logp, logp_old, logp_ref, adv, mask


def reference(logp, logp_old, logp_ref, adv, mask, clip, beta, aggregation):
  ratio = np.exp(logp - logp_old)
  surrogate = np.maximum(-adv[:, None] * ratio, -adv[:, None] * np.clip(ratio, 1 - clip, 1 + clip))
  kl = np.exp(logp_ref - logp) - (logp_ref - logp) - 1
  per_token = (surrogate + beta * kl) * mask
  if aggregation == "sequence_mean":
    return np.mean(per_token.sum(1) / mask.sum(1))
  return per_token.sum() / mask.sum()


@pytest.mark.parametrize("aggregation", ["sequence_mean", "token_mean"])
def test_loss_matches_float64_formula(aggregation):
  args = batch()
  loss, _ = grpo.token_policy_loss(*(jnp.asarray(a, jnp.float32) for a in args), clip_range=0.2,
                                   kl_beta=0.04, aggregation=aggregation)
  want = reference(*args, 0.2, 0.04, aggregation)
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)


def test_on_policy_ratio_is_one_and_kl_zero_at_the_reference():
  logp, _, _, adv, mask = batch()
  logp = jnp.asarray(logp, jnp.float32)
  loss, m = grpo.token_policy_loss(logp, logp, logp, jnp.asarray(adv), mask, clip_range=0.2,
                                   kl_beta=0.04)
  assert float(m["ratio_min"]) == float(m["ratio_max"]) == 1.0
  assert float(m["kl"]) == 0.0 and float(m["clip_fraction"]) == 0.0
  # On-policy the gradient is -A * grad logp per token (mean over the sequence's tokens).
  grad = jax.grad(lambda lp: grpo.token_policy_loss(lp, logp, logp, jnp.asarray(adv), mask,
                                                    clip_range=0.2, kl_beta=0.04)[0])(logp)
  want = -adv[:, None] * mask / mask.sum(1, keepdims=True) / len(adv)
  np.testing.assert_allclose(np.asarray(grad), want, rtol=1e-5, atol=1e-8)


def test_padding_tokens_do_not_count():
  logp, logp_old, logp_ref, adv, mask = batch()
  noisy = np.where(mask, logp, 50.0)  # garbage where masked
  a = grpo.token_policy_loss(*(jnp.asarray(x) for x in (logp, logp_old, logp_ref, adv, mask)),
                             clip_range=0.2, kl_beta=0.04)[0]
  b = grpo.token_policy_loss(*(jnp.asarray(x) for x in (noisy, logp_old, logp_ref, adv, mask)),
                             clip_range=0.2, kl_beta=0.04)[0]
  np.testing.assert_allclose(float(a), float(b), rtol=1e-6)


def test_unknown_aggregation_is_an_error():
  with pytest.raises(ValueError, match="unknown loss aggregation 'sum'"):
    grpo.token_policy_loss(*(jnp.zeros((1, 2)),) * 3, jnp.zeros(1), jnp.ones((1, 2)),
                           clip_range=0.2, kl_beta=0.0, aggregation="sum")
