"""Online policy distillation for the editor (docs/design.md section 7): task teachers distilled
into one student along the student's own rollouts.

    jaxedit train --config configs/shapes_editor_opd.py --workdir DIR --config.init_from=SFT_DIR \
        --config.opd.teachers.colour=TEACHER_DIR --config.opd.teachers.geometry=TEACHER_DIR
    jaxedit eval  --config configs/shapes_editor_opd.py --workdir DIR

Each iteration the student samples its edits with the SDE sampler (or the ODE, noise level
0); each sample's teacher, chosen by the prompt's task tag (or round robin), gives its
velocity at every trained step from the student's own x_t, once, held fixed; then
`inner_epochs` x `minibatches` updates minimise the closed-form per-step KL between the two
equal-variance Gaussians (mean matching for the ODE). No reward enters the loss; the
rewards of the student's rollouts are only logged. Teachers are editor SFT or GRPO runs of
the same architecture and tokenizer (their LoRA merged), sharded like the student's base.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxedit import flow_grpo, hparams, lora, opd, sharding, workdirs
from jaxedit.config import ConfigError
from jaxedit.models.editor import Editor
from jaxedit.rl import driver, editor_policy, update as rl_update
from jaxedit.rl.driver import PolicyState
from jaxedit.rl.editor_policy import Setup


def check_config(config: ml_collections.ConfigDict) -> None:
  editor_policy.check_rollouts(config)
  o = config.opd
  if o.routing not in ("task", "round_robin"):
    raise ConfigError(f"opd.routing must be 'task' or 'round_robin', got {o.routing!r}")
  if config.rollout.noise_level < 0:
    raise ConfigError(f"rollout.noise_level must be >= 0, got {config.rollout.noise_level}")
  try:  # atomic edits are colour or geometry edits
    opd.check_teachers(opd.teacher_tasks(o.teachers), config.train.tasks or list(o.teachers),
                       o.routing)
  except ValueError as e:
    raise ConfigError(str(e)) from None


@dataclasses.dataclass
class TeacherFields:
  teacher_model: Editor  # the student's architecture without LoRA: teachers are merged

  @property
  def teacher_shardings(self):
    """A teacher's parameters are sharded like a whole student without adapters."""
    return self.base_shardings


@dataclasses.dataclass
class OPDSetup(TeacherFields, Setup):
  """On the shapes world."""


@dataclasses.dataclass
class RecordsOPDSetup(TeacherFields, editor_policy.RecordsSetup):
  """On edit records: teachers are editor runs on records of the same pipeline."""


def make_setup(config: ml_collections.ConfigDict, workdir: str, devices=None):
  check_config(config)
  setup = editor_policy.build_setup(config, workdir, devices)
  cfg = setup.model.cfg
  plain = dataclasses.replace(cfg, flux=dataclasses.replace(cfg.flux, lora_rank=0,
                                                            lora_targets=()))
  cls = RecordsOPDSetup if isinstance(setup, editor_policy.RecordsSetup) else OPDSetup
  return cls(**{f.name: getattr(setup, f.name) for f in dataclasses.fields(setup)},
             teacher_model=Editor(plain))


# ------------------------------------------------------------------------------------------
# Teachers.
# ------------------------------------------------------------------------------------------
def load_teacher(setup: OPDSetup, workdir: str):
  """A teacher's parameters (EMA where its eval uses them; LoRA merged) in the student's
  shardings. It must share the student's architecture and tokenizer."""
  loaded = workdirs.load_editor(workdir, batch_size=setup.config.eval.batch_size)
  ours, theirs = (None if s.tokenizer is None else s.tokenizer.to_str()
                  for s in (setup, loaded.setup))
  if ours != theirs:  # records runs have none: their prompts are T5 / CLIP embeddings
    raise ConfigError(f"teacher {workdir} uses another tokenizer than the student: token ids "
                      "would mean different words (start both from the same SFT run)")
  mismatched = editor_policy.model_mismatch(loaded.setup.config.model, setup.config.model)
  if mismatched:
    raise ConfigError(f"teacher {workdir} has another architecture: " + ", ".join(mismatched))
  params = loaded.params
  model = loaded.setup.config.model
  if model.lora_rank:
    params = lora.merge(params, model.lora_rank, model.lora_alpha or model.lora_rank)
  return jax.device_put(params, setup.teacher_shardings)


def load_teachers(setup: OPDSetup) -> list:
  return [load_teacher(setup, setup.config.opd.teachers[task])
          for task in opd.teacher_tasks(setup.config.opd.teachers)]


# ------------------------------------------------------------------------------------------
# The update: teacher velocities once, then KL steps.
# ------------------------------------------------------------------------------------------
def make_update(setup: OPDSetup, teachers=None):
  """jitted (state, chunks, levels, trained_steps) -> (state, metrics), the teachers bound.

  The teachers' velocities at the trained steps of the student's trajectories are computed
  once per iteration (each sample's routed teacher) and held fixed; the student then
  minimises the per-step KL (per dimension: divided by the image size) over
  inner_epochs x minibatches updates, EMA after each."""
  config, r = setup.config, setup.rollouts
  teachers = load_teachers(setup) if teachers is None else teachers
  names = opd.teacher_tasks(config.opd.teachers)
  velocity = editor_policy.make_velocity(setup.model, r.guidance_scale, setup.guidance)
  teacher_velocity = editor_policy.make_velocity(setup.teacher_model, r.guidance_scale,
                                                 setup.guidance)
  base_rng = jax.random.key(config.train.seed + 1)
  traj = editor_policy.trajectory_sharding(setup)

  def update(teachers, state: PolicyState, chunks, levels, trained_steps, hp):
    data = editor_policy.join_chunks(chunks)
    source = data["source"]  # encoded by the rollout
    times = setup.sigmas(r.num_steps, source.shape)  # the rollouts' times
    text = {k: data[k] for k in setup.text_fields}

    def teacher_at(j):
      x = data["latents"][j]
      t = jnp.full((x.shape[0],), times[j], x.dtype)
      per_teacher = jnp.stack([teacher_velocity(p, x, t, source, text) for p in teachers])
      return opd.routed(per_teacher, data["route"])

    v_teacher = jax.lax.stop_gradient(jax.lax.map(teacher_at, trained_steps))  # (S, N, ...)
    v_teacher = jax.lax.with_sharding_constraint(v_teacher, traj)
    dims = float(np.prod(data["latents"].shape[2:]))

    def loss_and_grads(params, idx):
      take = lambda x, axis: jnp.take(x, idx, axis=axis)
      latents = jax.lax.with_sharding_constraint(take(data["latents"], 1), traj)
      v_t = jax.lax.with_sharding_constraint(take(v_teacher, 1), traj)
      mb_source = jax.lax.with_sharding_constraint(take(source, 0), setup.batch_sharding)
      mb_text = {k: take(data[k], 0) for k in setup.text_fields}
      routes = jax.nn.one_hot(take(data["route"], 0), len(names))  # (n, K)

      def step_loss(p, k):
        j = trained_steps[k]
        x = latents[j]
        t = jnp.full((x.shape[0],), times[j], x.dtype)
        v_s = velocity(setup.policy(p, state.base), x, t, mb_source, mb_text)
        kl = opd.step_kl(x, v_s, v_t[k], times[j], times[j + 1], levels[j], r.sde_type) / dims
        per_teacher = (routes * kl[:, None]).sum(0) / jnp.maximum(routes.sum(0), 1.0)
        return jnp.mean(kl), {"kl": jnp.mean(kl),
                              **{f"kl_{name}": per_teacher[m] for m, name in enumerate(names)}}

      return flow_grpo.minibatch_grads(step_loss, params, jnp.arange(trained_steps.shape[0]))

    params, ema, opt_state, metrics = rl_update.minibatch_updates(
        setup.optimizer, hp, state, jax.random.fold_in(base_rng, state.step),
        data["route"].shape[0], r.inner_epochs, r.minibatches, loss_and_grads)
    return state.replace(step=state.step + 1, params=params, ema_params=ema,
                         opt_state=opt_state), metrics

  ss = setup.state_shardings
  fn = jax.jit(update, in_shardings=([setup.teacher_shardings] * len(teachers), ss, None, None,
                                     None, None),
               out_shardings=(ss, sharding.replicated(setup.mesh)), donate_argnums=1)
  return sharding.Program(fn, setup.mesh, setup.rules, (teachers,),
                          hparams.values(config, hparams.OPD))


def route(setup, prompts: dict) -> dict:
  return opd.route_field(setup.config.opd, prompts)


algorithm = editor_policy.algorithms("OPD", make_setup, make_update, route)


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  return driver.train(config, workdir, algorithm(config))


def run_eval(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Like GRPO's: the student after, the SFT start before, per task (edit_success_by_task)."""
  return driver.run_eval(config, workdir, algorithm(config))
