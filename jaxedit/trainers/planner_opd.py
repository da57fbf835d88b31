"""Online policy distillation for the planner (DESIGN.md section 7): task teachers distilled
into one student on the student's own sampled plans.

    jaxedit train --config configs/shapes_planner_opd.py --workdir DIR --config.init_from=SFT_DIR \
        --config.opd.teachers.colour=TEACHER_DIR --config.opd.teachers.geometry=TEACHER_DIR ...
    jaxedit eval  --config configs/shapes_planner_opd.py --workdir DIR

Each iteration the student samples plans; each plan's teacher (by the prompt's task tag, or
round robin) scores the same tokens, and the student minimises the per-token reverse KL:
on the sampled tokens (`opd.kl = "sampled"`, the score-function surrogate) or over the whole
vocabulary at every sampled position (`"full_vocab"`). Teachers are planner SFT or GRPO runs
of the same architecture and tokenizer, sharded like the student. The rewards of the
student's plans are only logged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxedit import grpo, hparams, opd, overlap, sharding
from jaxedit.config import ConfigError
from jaxedit.shapes.edits import TASKS
from jaxedit.trainers import editor_grpo, planner_grpo, planner_sft
from jaxedit.trainers.editor_grpo import GRPOState

KLS = ("sampled", "full_vocab")


def reference_config() -> ml_collections.ConfigDict:
  c = planner_grpo.reference_config()
  c.trainer = "planner_opd"
  del c.grpo
  c.opd = ml_collections.ConfigDict({
      "teachers": {task: "" for task in TASKS},  # task tag -> planner workdir; "" for none
      "routing": "task",  # task | round_robin
      "kl": "sampled",  # sampled | full_vocab
      "prompts_per_step": 32,
      "group_size": 1,  # student plans per prompt
      "temperature": 1.0,
      "inner_epochs": 1,
      "minibatches": 2,
      **overlap.mesh_config(),  # rollouts on devices of their own (jaxedit.overlap)
  })
  return c


def check_config(config: ml_collections.ConfigDict) -> None:
  o = config.opd
  if not config.init_from:
    raise ConfigError("config key 'init_from' must name a planner SFT workdir")
  for key in ("prompts_per_step", "group_size", "inner_epochs", "minibatches"):
    if o[key] <= 0:
      raise ConfigError(f"config key 'opd.{key}' must be > 0")
  if o.prompts_per_step * o.group_size % o.minibatches:
    raise ConfigError(f"P * G = {o.prompts_per_step * o.group_size} samples do not split into "
                      f"opd.minibatches {o.minibatches}")
  if o.temperature <= 0:
    raise ConfigError("config key 'opd.temperature' must be > 0 (the student samples)")
  if o.kl not in KLS:
    raise ConfigError(f"opd.kl must be one of {KLS}, got {o.kl!r}")
  if o.routing not in ("task", "round_robin"):
    raise ConfigError(f"opd.routing must be 'task' or 'round_robin', got {o.routing!r}")
  try:
    opd.check_teachers(opd.teacher_tasks(o.teachers), config.train.tasks or TASKS, o.routing)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  editor_grpo.check_tasks(config)
  overlap.check(o, "opd")
  if config.rewards.visual.weight and not config.editor:
    raise ConfigError("rewards.visual.weight > 0 needs config key 'editor'")


def make_setup(config: ml_collections.ConfigDict, workdir: str, devices=None):
  check_config(config)
  return planner_grpo.build_setup(config, workdir, devices)


def load_teacher(setup, workdir: str):
  """A teacher planner's parameters (EMA where its eval uses them) in the student's
  shardings; it must share the student's model, prompt mode and tokenizer."""
  from jaxedit import inference

  loaded = inference.load_planner(workdir, batch_size=setup.config.eval.batch_size)
  if loaded.setup.tokenizer.to_str() != setup.tokenizer.to_str():
    raise ConfigError(f"teacher {workdir} uses another tokenizer than the student")
  mismatched = planner_grpo.model_mismatch(loaded.config.to_dict(), setup.config)
  if mismatched:
    raise ConfigError(f"teacher {workdir} has another model: " + ", ".join(mismatched))
  shardings = setup.state_shardings.params  # an SFT teacher's cell head is left behind
  return jax.device_put({k: loaded.params[k] for k in shardings}, shardings)


def routes(setup, records: dict) -> dict:
  """Per sample: the index of its teacher among `opd.teacher_tasks`."""
  teachers = opd.teacher_tasks(setup.config.opd.teachers)
  route = opd.route([str(t) for t in records["task"]], teachers,
                    setup.config.opd.routing)
  return {"route": np.asarray(route, np.int32)}


def make_update(setup, teachers=None):
  """jitted (state, batch, rewards) -> (state, metrics); rewards are not used. Teachers'
  log-probs of the student's tokens (routed per sample) are held fixed."""
  config, o = setup.config, setup.config.opd
  names = opd.teacher_tasks(config.opd.teachers)
  if teachers is None:
    teachers = [load_teacher(setup, o.teachers[task]) for task in names]
  base_rng = jax.random.key(config.train.seed + 1)
  updates_per_step = o.inner_epochs * o.minibatches
  logits_of = lambda p, b: planner_sft.completion_logits(p, setup.model, b) / o.temperature

  def update(state: GRPOState, teachers, batch: dict, rewards, hp):
    del rewards
    n = batch["route"].shape[0]
    rng = jax.random.fold_in(base_rng, state.step)
    order = grpo.minibatch_order(rng, n, o.inner_epochs, o.minibatches)

    def one_update(carry, xs):
      params, ema, opt_state = carry
      i, idx = xs
      mb = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(
          jnp.take(x, idx, axis=0), setup.batch_sharding), batch)
      teacher_logits = jax.lax.stop_gradient(opd.routed(
          jnp.stack([logits_of(t, mb) for t in teachers]), mb["route"]))
      valid = mb["plan_valid"].astype(jnp.float32)
      onehot = jax.nn.one_hot(mb["route"], len(names))  # (n, K)
      tokens_per_teacher = jnp.maximum(onehot.T @ valid.sum(1), 1.0)  # (K,)
      token_mean = lambda x: jnp.sum(x * valid) / jnp.maximum(valid.sum(), 1.0)
      log_prob = lambda z: jnp.take_along_axis(jax.nn.log_softmax(z, axis=-1),
                                               mb["plan"][..., None], -1)[..., 0]

      def loss_fn(p):
        logits = logits_of(p, mb)
        if o.kl == "full_vocab":
          per_token = kl = opd.full_vocab_kl(logits, teacher_logits)
        else:
          per_token, kl = opd.sampled_token_kl(log_prob(logits), log_prob(teacher_logits))
        kl = jax.lax.stop_gradient(kl)
        per_teacher = onehot.T @ jnp.sum(kl * valid, axis=1) / tokens_per_teacher
        return token_mean(per_token), {
            "kl": token_mean(kl), **{f"kl_{name}": per_teacher[m] for m, name in enumerate(names)}}

      (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
      params, ema, opt_state, rate = setup.optimizer.update(
          hp, params, ema, opt_state, grads, state.step * updates_per_step + i)
      return (params, ema, opt_state), {**metrics, "loss": loss, "lr": rate,
                                        "grad_norm": optax.tree.norm(grads)}

    (params, ema, opt_state), per_update = jax.lax.scan(
        one_update, (state.params, state.ema_params, state.opt_state),
        (jnp.arange(updates_per_step), order))
    metrics = jax.tree.map(jnp.mean, per_update)
    metrics["plan_tokens"] = jnp.mean(batch["plan_valid"].sum(1).astype(jnp.float32))
    return GRPOState(state.step + 1, params, ema, opt_state, state.frozen), metrics

  shardings = planner_grpo.abstract_state_shardings(setup)
  fn = jax.jit(update, in_shardings=(shardings, [setup.state_shardings.params] * len(teachers),
                                     setup.batch_sharding, setup.batch_sharding, None),
               out_shardings=(shardings, sharding.replicated(setup.mesh)), donate_argnums=0)
  fn = sharding.in_context(fn, setup.mesh, setup.rules)

  def with_teachers(state, batch, rewards, hp):
    return fn(state, teachers, batch, rewards, hp)
  return hparams.bind(with_teachers, hparams.values(config, hparams.OPD))


OPD = planner_grpo.Method("OPD", make_setup, make_update, routes)


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  return planner_grpo.train(config, workdir, OPD)


def run_eval(config: ml_collections.ConfigDict, workdir: str) -> dict:
  return planner_grpo.run_eval(config, workdir, OPD)
