"""Rejection-sampling fine-tuning for the editor (RAFT: best-of-N SFT), for edit data without
target images (Edit-R1 / flow_grpo rows carry only an instruction and a source).

    jaxedit train --config configs/flux_kontext_rft.py --workdir DIR --config.init_from=PIPELINE \
        --config.data.records=RECORDS --config.rewards.judge.base_url=http://judge:8000/v1

Each iteration the editor samples G edits of each of P prompts (`rollout`: the ODE from
different noise with `noise_level` 0, or the SDE), the rewards (a judge) score them, and the
best-scored edit of each prompt, if its reward reaches `rft.min_reward`, becomes that
prompt's target for the flow-matching loss of SFT (`inner_epochs` x `minibatches` updates
over the P targets, each minibatch padded with rows of weight 0 to split over the
data-parallel devices).
Prompts whose edits are all masked or below the bar train nothing. The run is an editor
start like an SFT run: GRPO and OPD take it as `init_from`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from jaxedit import flow, hparams, sharding
from jaxedit.config import ConfigError
from jaxedit.rl import driver, editor_policy, update as rl_update
from jaxedit.rl.driver import PolicyState
from jaxedit.rl.editor_policy import Setup
from jaxedit.train import setup as setup_lib


def check_config(config: ml_collections.ConfigDict) -> None:
  editor_policy.check_rollouts(config)
  r = config.rollout
  if r.noise_level < 0:
    raise ConfigError(f"rollout.noise_level must be >= 0, got {r.noise_level}")
  if r.prompts_per_step % r.minibatches:
    raise ConfigError(f"rollout.prompts_per_step {r.prompts_per_step} (one target per prompt) "
                      f"must split into rollout.minibatches {r.minibatches}")


def make_setup(config: ml_collections.ConfigDict, workdir: str, devices=None) -> Setup:
  check_config(config)
  return editor_policy.build_setup(config, workdir, devices)


def minibatch_size(setup: Setup) -> int:
  """A minibatch's P / minibatches targets, padded up to split over the data-parallel
  devices."""
  r = setup.rollouts
  parallel = setup_lib.data_parallel_size(setup.mesh, setup.batch_sharding)
  return -(-(r.prompts_per_step // r.minibatches) // parallel) * parallel


def best_of_groups(rewards, group_size: int, min_reward: float):
  """(P,) index of each group's best-scored sample among N = P * G rewards (NaN: masked,
  never chosen), and (P,) 1.0 where that reward is finite and reaches `min_reward`."""
  groups = rewards.reshape(-1, group_size)
  scored = jnp.where(jnp.isnan(groups), -jnp.inf, groups)
  best = jnp.argmax(scored, axis=1)
  reward = jnp.take_along_axis(scored, best[:, None], axis=1)[:, 0]
  keep = (jnp.isfinite(reward) & (reward >= min_reward)).astype(jnp.float32)
  return best + jnp.arange(groups.shape[0]) * group_size, keep


def make_update(setup: Setup):
  """jitted (state, chunks, levels, trained_steps) -> (state, metrics): each group's best edit
  becomes its target, then inner_epochs x minibatches flow-matching updates. The noise of a
  target depends on the target and its minibatch, not on the mesh: any device count trains
  alike."""
  config, r = setup.config, setup.rollouts
  velocity = editor_policy.make_velocity(setup.model, r.guidance_scale, setup.guidance)
  base_rng = jax.random.key(config.train.seed + 1)
  f = config.flow
  size = minibatch_size(setup)

  def update(state: PolicyState, chunks, levels, trained_steps, hp):
    del levels, trained_steps  # the rollouts' noise schedule; the loss is SFT's
    data = editor_policy.join_chunks(chunks)
    best, keep = best_of_groups(data["rewards"], r.group_size, config.rft.min_reward)
    targets = {"target": data["latents"][-1][best], "source": data["source"][best],
               "keep": keep, **{k: data[k][best] for k in setup.text_fields}}
    rng = jax.random.fold_in(base_rng, state.step)

    def noise(idx, salt):
      """(t, eps) of each target of a minibatch, from (its index, the minibatch's first)."""
      def one(i):
        r_t, r_eps = jax.random.split(jax.random.fold_in(jax.random.fold_in(rng, salt), i))
        t = flow.sample_time(r_t, 1, kind=f.timesteps, mean=f.logit_mean, std=f.logit_std,
                             shift=f.shift)[0]
        return t, jax.random.normal(r_eps, targets["target"].shape[1:])
      return jax.vmap(one)(idx)

    def loss_and_grads(params, idx):
      pad = size - idx.shape[0]  # rows of weight 0, so the minibatch splits over the devices
      weight = jnp.concatenate([jnp.ones(idx.shape), jnp.zeros(pad)])
      idx = jnp.concatenate([idx, jnp.resize(idx, pad)])
      mb = jax.tree.map(lambda x: jnp.take(x, idx, axis=0), targets)
      mb = jax.lax.with_sharding_constraint(mb, setup.batch_sharding)
      keep = mb["keep"] * weight
      t, eps = noise(idx, idx[0])
      x0 = mb["target"]

      def loss_fn(p):
        v = velocity(setup.policy(p, state.base), flow.interpolate(x0, eps, t), t,
                     mb["source"], {k: mb[k] for k in setup.text_fields})
        err = (v.astype(jnp.float32) - (eps - x0).astype(jnp.float32)) ** 2
        per_sample = jnp.mean(err, axis=tuple(range(1, err.ndim)))
        # The mean over kept targets; an all-rejected minibatch has zero loss and gradients.
        return jnp.sum(keep * per_sample) / jnp.maximum(keep.sum(), 1.0)

      loss, grads = jax.value_and_grad(loss_fn)(params)
      return loss, grads, {}

    params, ema, opt_state, metrics = rl_update.minibatch_updates(
        setup.optimizer, hp, state, rng, r.prompts_per_step, r.inner_epochs, r.minibatches,
        loss_and_grads)
    metrics["kept_fraction"] = keep.mean()
    return state.replace(step=state.step + 1, params=params, ema_params=ema,
                         opt_state=opt_state), metrics

  ss = setup.state_shardings
  fn = jax.jit(update, in_shardings=(ss, None, None, None, None),
               out_shardings=(ss, sharding.replicated(setup.mesh)), donate_argnums=0)
  return sharding.Program(fn, setup.mesh, setup.rules, hparams=hparams.values(config,
                                                                               hparams.SFT))


algorithm = editor_policy.algorithms("RFT", make_setup, make_update)


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  return driver.train(config, workdir, algorithm(config))


def run_eval(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """The fine-tuned editor and its start, on `eval.split`."""
  return driver.run_eval(config, workdir, algorithm(config))
