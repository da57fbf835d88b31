"""Planner GRPO from a planner SFT run: G sampled plans per prompt, token-level clipped ratio
+ k3 KL to the SFT planner, and the dual-atomic rewards of docs/design.md section 6: cognitive (the
plan checklist) and visual (the plan run step by step by the editor of config key `editor`,
the detected final scene scored by the checklist).

    jaxedit train --config configs/shapes_planner_grpo.py --workdir DIR --config.init_from=SFT_DIR
    jaxedit eval  --config configs/shapes_planner_grpo.py --workdir DIR

Every parameter trains (the planner is small); the reference is a frozen copy of the start.
With `rollout.rollout_devices` the plans are sampled on devices of their own, one iteration
ahead of the update (`jaxedit.overlap`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from jaxedit import grpo, hparams, sharding
from jaxedit.config import ConfigError
from jaxedit.rl import driver, planner_policy, update as rl_update
from jaxedit.rl.driver import PolicyState


def check_config(config: ml_collections.ConfigDict) -> None:
  g = config.grpo
  planner_policy.check_rollouts(config)
  if config.rollout.group_size < 2:
    raise ConfigError("config key 'rollout.group_size' must be >= 2: advantages compare plans "
                      "of the same prompt")
  if g.aggregation not in grpo.AGGREGATIONS:
    raise ConfigError(f"grpo.aggregation must be one of {grpo.AGGREGATIONS}")


def make_setup(config: ml_collections.ConfigDict, workdir: str, devices=None):
  check_config(config)
  return planner_policy.build_setup(config, workdir, devices)


def make_update(setup):
  """jitted (state, batch, rewards) -> (state, metrics)."""
  config, r, g = setup.config, setup.config.rollout, setup.config.grpo
  base_rng = jax.random.key(config.train.seed + 1)
  def update(state: PolicyState, batch: dict, rewards, hp):
    logprobs = lambda p, b: planner_policy.sequence_logprobs(p, setup.model, b, r.temperature,
                                                             state.base)
    advantages = grpo.group_advantages(rewards, r.group_size, std_scope=g.std_scope,
                                       clip=g.adv_clip)
    old = jax.lax.stop_gradient(logprobs(state.params, batch))
    ref = jax.lax.stop_gradient(logprobs(state.reference, batch))

    def loss_and_grads(params, idx):
      mb = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(
          jnp.take(x, idx, axis=0), setup.batch_sharding), batch)
      take = lambda x: jnp.take(x, idx, axis=0)

      def loss_fn(p):
        return grpo.token_policy_loss(logprobs(p, mb), take(old), take(ref), take(advantages),
                                      mb["plan_valid"], clip_range=hp["clip_range"],
                                      kl_beta=hp["kl_beta"], aggregation=g.aggregation)
      (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
      return loss, grads, metrics

    params, ema, opt_state, metrics = rl_update.minibatch_updates(
        setup.optimizer, hp, state, jax.random.fold_in(base_rng, state.step),
        advantages.shape[0], r.inner_epochs, r.minibatches, loss_and_grads)
    metrics.update({"advantage_abs": jnp.mean(jnp.abs(advantages)),
                    "zero_advantage_fraction": jnp.mean((advantages == 0).astype(jnp.float32))})
    return state.replace(step=state.step + 1, params=params, ema_params=ema,
                         opt_state=opt_state), metrics

  shardings = planner_policy.state_shardings(setup)
  fn = jax.jit(update, in_shardings=(shardings, setup.batch_sharding, setup.batch_sharding,
                                     None),
               out_shardings=(shardings, sharding.replicated(setup.mesh)), donate_argnums=0)
  return sharding.Program(fn, setup.mesh, setup.rules,
                          hparams=hparams.values(config, hparams.GRPO))


GRPO = driver.Algorithm("GRPO", planner_policy.PlannerPolicy, make_setup, make_update)


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  return driver.train(config, workdir, GRPO)


def run_eval(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """The GRPO planner and the SFT planner it started from, on `eval.split`."""
  return driver.run_eval(config, workdir, GRPO)
