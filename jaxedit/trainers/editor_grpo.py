"""Flow-GRPO for the editor (docs/design.md section 5), starting from an editor SFT run.

    jaxedit train --config configs/shapes_editor_grpo.py --workdir DIR --config.init_from=SFT_DIR
    jaxedit eval  --config configs/shapes_editor_grpo.py --workdir DIR

Each iteration: P prompts x G samples are rolled out with the SDE sampler in chunks (the
host scores chunk j with the rewards while the device samples chunk j + 1), advantages are
normalised per group, then `inner_epochs` x `minibatches` clipped-ratio updates run in one
jitted program with the KL to a frozen reference. With `model.lora_rank` > 0 only the
adapters train and the reference is the SFT model itself (adapters disabled); otherwise all
parameters train and the reference is a frozen copy of the SFT parameters. With
`rollout.rollout_devices` the rollouts run on devices of their own, one iteration ahead of the
update (`jaxedit.overlap`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from jaxedit import flow_grpo, grpo, hparams, sharding
from jaxedit.config import ConfigError
from jaxedit.rl import driver, editor_policy, update as rl_update
from jaxedit.rl.driver import PolicyState
from jaxedit.rl.editor_policy import Setup


def check_config(config: ml_collections.ConfigDict) -> None:
  r = config.rollout
  if r.group_size < 2:
    raise ConfigError("config key 'rollout.group_size' must be >= 2: advantages compare "
                      "samples of the same prompt")
  editor_policy.check_rollouts(config)
  if r.noise_level <= 0:
    raise ConfigError("config key 'rollout.noise_level' must be > 0: the policy gradient "
                      "needs the log-probs of stochastic steps")
  if config.grpo.std_scope not in grpo.STD_SCOPES:
    raise ConfigError(f"grpo.std_scope must be one of {grpo.STD_SCOPES}, got "
                      f"{config.grpo.std_scope!r}")


def make_setup(config: ml_collections.ConfigDict, workdir: str, devices=None) -> Setup:
  check_config(config)
  return editor_policy.build_setup(config, workdir, devices)


def make_update(setup: Setup):
  """jitted (state, chunks, levels, trained_steps) -> (state, metrics): advantages, then
  inner_epochs x minibatches clipped-ratio updates on shuffled samples, EMA after each."""
  config, r, g = setup.config, setup.rollouts, setup.config.grpo
  velocity = editor_policy.make_velocity(setup.model, r.guidance_scale, setup.guidance)
  base_rng = jax.random.key(config.train.seed + 1)
  traj = editor_policy.trajectory_sharding(setup)
  def update(state: PolicyState, chunks, levels, trained_steps, hp):
    data = editor_policy.join_chunks(chunks)
    times = setup.sigmas(r.num_steps, data["source"].shape)  # the rollouts' times
    advantages = grpo.group_advantages(data["rewards"], r.group_size, std_scope=g.std_scope,
                                       clip=g.adv_clip)
    ref_params = jax.lax.stop_gradient(setup.reference(state))
    ref_velocity = None  # kl_beta = 0 in the config: no reference forward pass compiled
    if g.kl_beta:
      ref_velocity = lambda x, t, source, text: velocity(ref_params, x, t, source, text)
    policy_velocity = lambda p, x, t, source, text: velocity(setup.policy(p, state.base), x, t,
                                                            source, text)

    def loss_and_grads(params, idx):
      take = lambda x, axis: jnp.take(x, idx, axis=axis)
      mb = {"latents": jax.lax.with_sharding_constraint(take(data["latents"], 1), traj),
            "log_probs": take(data["log_probs"], 1),
            "source": jax.lax.with_sharding_constraint(take(data["source"], 0),
                                                       setup.batch_sharding),
            "text": {k: take(data[k], 0) for k in setup.text_fields},
            "advantages": take(advantages, 0)}
      return flow_grpo.minibatch_grads(
          lambda p, j: flow_grpo.step_loss(
              policy_velocity, p, ref_velocity, mb, j, times, levels, sde_type=r.sde_type,
              clip_range=hp["clip_range"], kl_beta=hp["kl_beta"]), params, trained_steps)

    params, ema, opt_state, metrics = rl_update.minibatch_updates(
        setup.optimizer, hp, state, jax.random.fold_in(base_rng, state.step),
        advantages.shape[0], r.inner_epochs, r.minibatches, loss_and_grads)
    metrics.update({"advantage_abs": jnp.mean(jnp.abs(advantages)),
                    "zero_advantage_fraction": jnp.mean(
                        (advantages == 0).astype(jnp.float32))})
    return state.replace(step=state.step + 1, params=params, ema_params=ema,
                         opt_state=opt_state), metrics

  ss = setup.state_shardings
  fn = jax.jit(update, in_shardings=(ss, None, None, None, None),
               out_shardings=(ss, sharding.replicated(setup.mesh)), donate_argnums=0)
  return sharding.Program(fn, setup.mesh, setup.rules,
                          hparams=hparams.values(config, hparams.GRPO))


algorithm = editor_policy.algorithms("GRPO", make_setup, make_update)


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  return driver.train(config, workdir, algorithm(config))


def run_eval(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """The GRPO policy and the SFT model it started from, on `eval.split`."""
  return driver.run_eval(config, workdir, algorithm(config))
