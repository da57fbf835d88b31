"""Online policy distillation for the planner (docs/design.md section 7): task teachers distilled
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

from flax.traverse_util import flatten_dict, unflatten_dict

from jaxedit import hparams, lora, opd, planning, sharding, workdirs
from jaxedit.config import ConfigError
from jaxedit.rl import driver, planner_policy, update as rl_update
from jaxedit.rl.driver import PolicyState
from jaxedit.shapes.edits import TASKS

KLS = ("sampled", "full_vocab")


def check_config(config: ml_collections.ConfigDict) -> None:
  o = config.opd
  planner_policy.check_rollouts(config)
  if o.kl not in KLS:
    raise ConfigError(f"opd.kl must be one of {KLS}, got {o.kl!r}")
  if o.routing not in ("task", "round_robin"):
    raise ConfigError(f"opd.routing must be 'task' or 'round_robin', got {o.routing!r}")
  try:
    opd.check_teachers(opd.teacher_tasks(o.teachers), config.train.tasks or TASKS, o.routing)
  except ValueError as e:
    raise ConfigError(str(e)) from None


def make_setup(config: ml_collections.ConfigDict, workdir: str, devices=None):
  check_config(config)
  return planner_policy.build_setup(config, workdir, devices)


def load_teacher(setup, workdir: str):
  """A teacher planner's parameters (EMA where its eval uses them) in the student's
  shardings; it must share the student's model, prompt mode and tokenizer."""
  loaded = workdirs.load_planner(workdir, batch_size=setup.config.eval.batch_size)
  if loaded.setup.tokenizer.to_str() != setup.tokenizer.to_str():
    raise ConfigError(f"teacher {workdir} uses another tokenizer than the student")
  mismatched = planner_policy.model_mismatch(loaded.config.to_dict(), setup.config)
  if mismatched:
    raise ConfigError(f"teacher {workdir} has another model: " + ", ".join(mismatched))
  params = loaded.params
  if loaded.config.model.lora_rank:
    params = lora.merge(params, loaded.config.model.lora_rank,
                        loaded.config.model.lora_alpha or loaded.config.model.lora_rank)
  # Shaped as the student's whole model: zero adapters under a LoRA student (the teacher's
  # own merged in); an SFT teacher's cell head is left behind.
  flat = flatten_dict(params)
  return unflatten_dict({
      k: jax.device_put(jnp.zeros(a.shape, a.dtype) if lora.is_adapter(k) else flat[k],
                        a.sharding)
      for k, a in flatten_dict(planning.abstract_whole(setup)).items()})


def make_update(setup, teachers=None):
  """jitted (state, batch, rewards) -> (state, metrics); rewards are not used. Teachers'
  log-probs of the student's tokens (routed per sample) are held fixed."""
  config, o, r = setup.config, setup.config.opd, setup.config.rollout
  names = opd.teacher_tasks(config.opd.teachers)
  if teachers is None:
    teachers = [load_teacher(setup, o.teachers[task]) for task in names]
  base_rng = jax.random.key(config.train.seed + 1)
  logits_of = lambda p, b: planning.completion_logits(p, setup.model, b) / r.temperature

  def update(teachers, state: PolicyState, batch: dict, rewards, hp):
    del rewards
    student_logits = lambda p, b: logits_of(lora.whole(p, state.base), b)

    def loss_and_grads(params, idx):
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
        logits = student_logits(p, mb)
        if o.kl == "full_vocab":
          per_token = kl = opd.full_vocab_kl(logits, teacher_logits)
        else:
          per_token, kl = opd.sampled_token_kl(log_prob(logits), log_prob(teacher_logits))
        kl = jax.lax.stop_gradient(kl)
        per_teacher = onehot.T @ jnp.sum(kl * valid, axis=1) / tokens_per_teacher
        return token_mean(per_token), {
            "kl": token_mean(kl), **{f"kl_{name}": per_teacher[m] for m, name in enumerate(names)}}

      (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
      return loss, grads, metrics

    params, ema, opt_state, metrics = rl_update.minibatch_updates(
        setup.optimizer, hp, state, jax.random.fold_in(base_rng, state.step),
        batch["route"].shape[0], r.inner_epochs, r.minibatches, loss_and_grads)
    metrics["plan_tokens"] = jnp.mean(batch["plan_valid"].sum(1).astype(jnp.float32))
    return state.replace(step=state.step + 1, params=params, ema_params=ema,
                         opt_state=opt_state), metrics

  shardings = planner_policy.state_shardings(setup)
  whole = lora.whole(setup.state_shardings.params, setup.state_shardings.base)
  fn = jax.jit(update, in_shardings=([whole] * len(teachers), shardings,
                                     setup.batch_sharding, setup.batch_sharding, None),
               out_shardings=(shardings, sharding.replicated(setup.mesh)), donate_argnums=1)
  return sharding.Program(fn, setup.mesh, setup.rules, (teachers,),
                          hparams.values(config, hparams.OPD))


OPD = driver.Algorithm("OPD", planner_policy.PlannerPolicy, make_setup, make_update,
                       lambda setup, records: opd.route_field(setup.config.opd, records))


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  return driver.train(config, workdir, OPD)


def run_eval(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """The OPD student and the SFT planner it started from, on `eval.split`."""
  return driver.run_eval(config, workdir, OPD)
