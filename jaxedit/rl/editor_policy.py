"""The editor as an RL policy (`EditorPolicy`, for `rl.driver`): the setup of a trainer on
the editor's own SDE rollouts (LoRA adapters over a frozen base, or every parameter beside a
frozen reference), starting from an SFT run, chunked rollouts scored by host rewards, and
the evaluation of the trained policy against its start."""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxedit import (checkpoint, editing, evaluation, flow, flow_grpo, flux_editing, lora,
                     overlap, sharding)
from jaxedit import rewards as rewards_lib
from jaxedit.config import ConfigError, plain
from jaxedit.data import edit_records
from jaxedit.data.pipeline import make_dataset
from jaxedit.interop import pretrained
from jaxedit.models import editor as editor_model
from jaxedit.rl import driver
from jaxedit.rl.driver import PolicyState
from jaxedit.shapes.edits import TASKS
from jaxedit.text import tokenizer as tokenizer_lib
from jaxedit.train import optimizer as optimizer_lib, records, setup as setup_lib

PROMPT_FIELDS = ("source_image", "target_image", "instruction", "checklist", "source_scene",
                 "target_scene", "family", "task")
DEVICE_FIELDS = ("source_image", "ids", "mask")  # the prompt fields the rollouts need


# ------------------------------------------------------------------------------------------
# Setup.
# ------------------------------------------------------------------------------------------
@dataclasses.dataclass
class PolicyFields:
  """What an RL setup adds to the editor's (shapes world or edit records)."""

  full_shardings: Any  # of the whole parameter tree (base and adapters joined)
  use_lora: bool
  levels_and_steps: Any  # iteration -> (noise levels (T,), trained step indices)
  rollouts: ml_collections.ConfigDict  # the config's `rollout` section

  @property
  def param_shardings(self):
    return self.full_shardings

  def policy(self, trained, base):
    """The parameters the policy samples with: the adapters joined onto the base (LoRA), or
    the trained parameters (full fine-tuning: base is None)."""
    return lora.whole(trained, base)

  def reference(self, state: PolicyState):
    """The frozen reference: the base with its adapters disabled (zeroed), or the start."""
    if self.use_lora:
      return lora.join(jax.tree.map(jnp.zeros_like, state.params), state.base)
    return state.reference

  @property
  def base_shardings(self):
    """Of a whole model without adapters: the base's (LoRA) or the trained parameters'."""
    return self.state_shardings.base if self.use_lora else self.state_shardings.params

  @property
  def abstract_base(self):
    """The abstract arrays of a whole model without adapters (an SFT start, a teacher)."""
    return self.abstract_state.base if self.use_lora else self.abstract_state.params


@dataclasses.dataclass
class Setup(PolicyFields, editing.Setup):
  """On the shapes world: prompts are token ids, sources are images the codec encodes."""

  text_fields = ("ids", "mask")
  device_fields = DEVICE_FIELDS
  guidance = None  # the shapes editors embed no guidance


@dataclasses.dataclass
class RecordsSetup(PolicyFields, flux_editing.RecordsSetup):
  """On edit records: prompts are T5 / CLIP embeddings, sources are latents."""

  text_fields = ("context", "pooled")
  device_fields = ("source_latents", "context", "pooled")


def check_rollouts(config: ml_collections.ConfigDict) -> None:
  """Checks what every trainer on the editor's own rollouts shares: the `rollout` section,
  the start and the tasks."""
  g = config.rollout
  if flux_editing.on_records(config):
    if g.guidance_scale != 1.0:
      raise ConfigError("rollout.guidance_scale must be 1 on edit records: FLUX models are "
                        "guidance-distilled (model.guidance), with no unconditional branch")
  elif config.model.text_encoder != "shapes":
    raise ConfigError("model.text_encoder must be 'shapes' for the shapes world")
  for key in ("prompts_per_step", "group_size", "rollout_chunks", "num_steps", "inner_epochs",
              "minibatches"):
    if g[key] <= 0:
      raise ConfigError(f"config key 'rollout.{key}' must be > 0")
  if g.prompts_per_step % g.rollout_chunks:
    raise ConfigError(f"rollout.prompts_per_step {g.prompts_per_step} must split into "
                      f"rollout.rollout_chunks {g.rollout_chunks} whole groups")
  if g.prompts_per_step * g.group_size % g.minibatches:
    raise ConfigError(f"{g.prompts_per_step * g.group_size} samples per iteration do not split "
                      f"into rollout.minibatches {g.minibatches}")
  if g.accumulate <= 0:
    raise ConfigError("config key 'rollout.accumulate' must be > 0")
  if g.minibatches * g.inner_epochs % g.accumulate:
    raise ConfigError(f"rollout.accumulate {g.accumulate} must divide the "
                      f"{g.minibatches * g.inner_epochs} minibatches of an iteration "
                      "(inner_epochs x minibatches)")
  if g.sde_type not in flow.SDE_TYPES:
    raise ConfigError(f"rollout.sde_type must be one of {flow.SDE_TYPES}, got {g.sde_type!r}")
  if config.init_params not in ("ema", "params"):
    raise ConfigError(f"init_params must be 'ema' or 'params', got {config.init_params!r}")
  overlap.check(g)
  check_tasks(config)


def check_tasks(config: ml_collections.ConfigDict) -> None:
  unknown = sorted(set(config.train.tasks) - set(TASKS))
  if unknown:
    raise ConfigError(f"config key 'train.tasks': unknown task {unknown[0]!r}; the tasks are "
                      f"{list(TASKS)}")


def step_schedule_fn(g: ml_collections.ConfigDict, seed: int):
  """iteration -> (levels, trained steps); a random SDE window start is drawn per iteration
  from (seed, iteration), so a resumed run draws the same windows."""
  if not g.window_size or g.window_start >= 0:
    fixed = flow_grpo.step_schedule(g.num_steps, g.noise_level, g.timestep_fraction,
                                    g.window_size, max(g.window_start, 0))
    return lambda step: fixed
  last = int(g.num_steps * g.timestep_fraction) - g.window_size
  if last < 0:
    raise ConfigError(f"rollout.window_size {g.window_size} does not fit in the "
                      f"{int(g.num_steps * g.timestep_fraction)} trained steps")

  def schedule(step):
    start = int(np.random.default_rng((seed, step)).integers(0, last + 1))
    return flow_grpo.step_schedule(g.num_steps, g.noise_level, g.timestep_fraction,
                                   g.window_size, start)
  return schedule


def build_setup(config: ml_collections.ConfigDict, workdir: str, devices) -> Setup:
  """The setup of a trainer on the SDE rollouts of the config's `rollout` section (already
  checked): on the shapes world with the tokenizer of `init_from`, or on edit records."""
  if flux_editing.on_records(config):
    config = flux_editing.with_architecture(config)
    records, model, mesh, rules, batch_sharding = flux_editing.make_parts(config, devices)
    world = tok = None
    dummy = flux_editing.dummy_inputs(model.cfg, flux_editing.first_bucket(records),
                                      editor_model.vae_config(config.model).downscale,
                                      config.model.text_max_len)
    cls, fields = RecordsSetup, {"records": records}
  else:
    pretrained.copy_tokenizer(config.init_from, workdir)
    world, tok, model, mesh, rules, batch_sharding = editing.make_parts(config, workdir,
                                                                        devices)
    dummy = editing.dummy_inputs(model.cfg, config.model.text_max_len)
    cls, fields = Setup, {}
  g = config.rollout
  n = g.prompts_per_step * g.group_size
  setup_lib.check_batch_size("a rollout chunk (P * G / rollout.rollout_chunks)",
                             n // g.rollout_chunks, mesh, batch_sharding)
  setup_lib.check_batch_size("a minibatch (P * G / rollout.minibatches)",
                             n // g.minibatches, mesh, batch_sharding)
  setup_lib.check_batch_size("config key 'eval.batch_size'", config.eval.batch_size, mesh,
                             batch_sharding)
  optimizer = optimizer_lib.on_policy(config.train, g.accumulate)
  use_lora = config.model.lora_rank > 0
  init = functools.partial(initial_state, model=model, tx=optimizer.tx, use_lora=use_lora,
                           dummy=dummy)
  boxed = jax.eval_shape(init, jax.random.key(0))
  state_shardings = sharding.logical_shardings(boxed, mesh, rules)
  abstract_state = checkpoint.abstract_like(nn.unbox(boxed), state_shardings)
  full = (lora.join(state_shardings.params, state_shardings.base) if use_lora
          else state_shardings.params)
  if use_lora:
    try:
      lora.check_targets(abstract_state.params, config.model.lora_targets)
    except ValueError as e:
      raise ConfigError(f"config key 'model.lora_targets': {e}") from None
  return cls(config=config, world=world, tokenizer=tok, model=model, mesh=mesh, rules=rules,
             optimizer=optimizer, init=init, state_shardings=state_shardings,
             abstract_state=abstract_state, batch_sharding=batch_sharding,
             full_shardings=full, use_lora=use_lora,
             levels_and_steps=step_schedule_fn(g, config.train.seed), rollouts=g, **fields)


def initial_state(rng, *, model, tx, use_lora, dummy) -> PolicyState:
  """A fresh policy state: the model initialised, split into adapters and base with LoRA."""
  params = editor_model.init_params(model, rng, *dummy)
  if use_lora:
    (trained, base), reference = lora.split(params), None
  else:
    trained, base, reference = params, None, params
  return PolicyState(step=jnp.zeros((), jnp.int32), params=trained, ema_params=trained,
                     opt_state=tx.init(trained), base=base, reference=reference)


# ------------------------------------------------------------------------------------------
# Starting from the SFT run.
# ------------------------------------------------------------------------------------------
def load_sft(setup: Setup, init_from: str):
  """The starting parameters (base model, no adapters) in this run's shardings: an editor
  run's (SFT, RFT, GRPO, OPD; LoRA adapters merged into their base), or a diffusers
  folder's (`interop.pretrained`)."""
  config = setup.config
  abstract = setup.abstract_base
  if pretrained.folder_kind(init_from):
    params = pretrained.load_editor(init_from, abstract, setup.model.cfg)
    if set(params) != set(abstract):
      raise ConfigError(f"init_from: {init_from} has no weights for "
                        f"{sorted(set(abstract) - set(params))}: start from an editor SFT "
                        "workdir, or a jaxedit export of one")
    return params
  mngr, step = checkpoint.latest_step(init_from, "an editor workdir")
  key = "ema_params" if config.init_params == "ema" else "params"
  saved = checkpoint.saved_config(mngr, step)
  mismatched = model_mismatch(saved["model"], config.model)
  if mismatched:
    raise ConfigError("init_from was trained with a different model: " + ", ".join(mismatched))
  rank = saved["model"].get("lora_rank", 0)
  if rank:  # an RL run's adapters (small: read on the host) folded into its frozen base
    adapters = checkpoint.restore_subtree_on_host(mngr, step, key)
    base = checkpoint.restore_subtree(mngr, step, "base", abstract)
    merged = lora.merge(lora.join(adapters, base), rank, saved["model"].get("lora_alpha") or rank)
    params = jax.tree.map(lambda x, a: jax.device_put(x, a.sharding), merged, abstract)
  else:
    params = checkpoint.restore_subtree(mngr, step, key, abstract)
  logging.info("initialised from %s (step %d, %s%s)", init_from, step, key,
               f", LoRA rank {rank} merged" if rank else "")
  return params


def model_mismatch(saved, model) -> list[str]:
  """'model.K = A there, B here' for every architecture key (not models.editor.FREE_MODEL_KEYS; nested
  ones dotted, e.g. vae.latent_channels) of a saved run's model section that differs from
  `model`."""
  saved, model = (flax.traverse_util.flatten_dict(plain(m), sep=".") for m in (saved, model))
  return [f"model.{k} = {saved[k]!r} there, {model[k]!r} here" for k in sorted(saved)
          if k not in editor_model.FREE_MODEL_KEYS and k in model and model[k] != saved[k]]


def init_state(setup: Setup, sft_params) -> PolicyState:
  """Fresh adapters (B = 0, so the policy starts as the SFT model) over the SFT parameters as
  the base or, for full fine-tuning, the SFT parameters trained and, as separate buffers,
  the reference."""
  state = setup_lib.init_state(setup)
  copy = lambda tree: jax.tree.map(lambda x: x.copy(), tree)
  if setup.use_lora:
    return state.replace(base=sft_params)
  return state.replace(params=sft_params, ema_params=copy(sft_params),
                       reference=copy(sft_params))


# ------------------------------------------------------------------------------------------
# Rollout and update, each one jitted program.
# ------------------------------------------------------------------------------------------
def make_velocity(model, guidance_scale: float, guidance: float | None = None):
  """velocity(params, x, t, source, text) with classifier-free guidance when scale != 1
  (shapes text only: its empty prompt), and the embedded `guidance` of dev-type models."""
  def velocity(params, x, t, source, text):
    g = None if guidance is None else jnp.full((x.shape[0],), guidance, jnp.float32)
    empty = (None if guidance_scale == 1.0 else
             {"ids": jnp.zeros_like(text["ids"]), "mask": jnp.zeros_like(text["mask"])})
    fn = lambda x, t, cond: model.apply({"params": params}, x, t, source,
                                        text if cond else empty, guidance=g)
    return flow.guided(fn, guidance_scale)(x, t)
  return velocity


def trajectory_sharding(setup: Setup):
  """(T(+1), N, ...) arrays: the sample axis split like a batch."""
  return jax.sharding.NamedSharding(setup.mesh, jax.sharding.PartitionSpec(
      None, *setup.batch_sharding.spec))


def make_rollout(setup: Setup):
  """jitted (trained, base, chunk, levels, rng) -> images (uint8, decoded by the codec),
  source (the encoded sources, for the update), latents (the trajectory in the model's
  space), log_probs."""
  g = setup.rollouts
  velocity = make_velocity(setup.model, g.guidance_scale, setup.guidance)
  def rollout(codec, trained, base, chunk, levels, rng):
    source = (chunk["source_latents"] if "source_latents" in chunk
              else codec.encode(chunk["source_image"]))
    times = setup.sigmas(g.num_steps, source.shape)
    r_noise, r_sde = jax.random.split(rng)
    if g.shared_noise:  # one initial noise per group of G consecutive samples
      x1 = jax.random.normal(r_noise, (source.shape[0] // g.group_size, *source.shape[1:]))
      x1 = jnp.repeat(x1, g.group_size, axis=0)
    else:
      x1 = jax.random.normal(r_noise, source.shape)
    out = flow_grpo.rollout(velocity, setup.policy(trained, base), x1, source,
                            {k: chunk[k] for k in setup.text_fields}, times, levels, r_sde,
                            g.sde_type)
    return {"images": codec.decode(out["sample"]), "source": source,
            "latents": out["latents"], "log_probs": out["log_probs"]}

  ss, traj = setup.state_shardings, trajectory_sharding(setup)
  fn = jax.jit(rollout, in_shardings=(sharding.replicated(setup.mesh), ss.params, ss.base,
                                      setup.batch_sharding, None, None),
               out_shardings={"images": setup.batch_sharding, "source": setup.batch_sharding,
                              "latents": traj, "log_probs": traj})
  return sharding.Program(fn, setup.mesh, setup.rules, (setup.codec,))


# ------------------------------------------------------------------------------------------
# Rollouts scored on the host.
# ------------------------------------------------------------------------------------------
def rollout_and_score(setup: Setup, rollout, reward_fn, trained, base, prompts: dict,
                      levels, rng, extra_fields=()):
  """Samples G edits of each of this process's prompts in `rollout_chunks` jitted calls, with
  the policy of parameters (trained, base). Chunk j's images go to the host rewards while
  the device samples chunk j + 1.

  Returns (chunks for the update: the setup's device fields and `extra_fields`, encoded
  sources, latents, log-probs, rewards; host dict of the rollout: images, rewards, parts,
  and the per-sample prompt fields)."""
  g = setup.rollouts
  grouped = {k: np.repeat(np.asarray(v), g.group_size, axis=0) for k, v in prompts.items()}
  size = len(grouped[setup.text_fields[0]]) // g.rollout_chunks
  device_fields = setup.device_fields + tuple(extra_fields)
  pieces = [{k: v[j * size:(j + 1) * size] for k, v in grouped.items()}
            for j in range(g.rollout_chunks)]
  inputs, outs, pending, images = [], [], [], []

  def score(j):
    local = sharding.local_rows(outs[j]["images"], setup.batch_sharding)
    images.append(local)
    pending.append(reward_fn.submit(local, pieces[j]))

  for j, piece in enumerate(pieces):
    inputs.append(sharding.global_batch({k: piece[k] for k in device_fields},
                                        setup.batch_sharding))
    outs.append(rollout(trained, base,
                        {k: inputs[j][k] for k in setup.device_fields}, levels,
                        jax.random.fold_in(rng, j)))
    if j:
      score(j - 1)
  score(len(pieces) - 1)
  results = [p.result() for p in pending]
  chunks = [{**inputs[j], **{k: outs[j][k] for k in ("source", "latents", "log_probs")},
             "rewards": sharding.global_batch({"r": results[j][0]}, setup.batch_sharding)["r"]}
            for j in range(len(pieces))]
  host = {**grouped, "images": np.concatenate(images),
          "rewards": np.concatenate([r[0] for r in results]),
          "parts": {k: np.concatenate([r[1][k] for r in results]) for k in results[0][1]}}
  return chunks, host


def join_chunks(chunks: list[dict]) -> dict:
  """An iteration's rollout chunks as one (in sampling order; each chunk holds whole groups,
  so groups stay consecutive): trajectories join on their sample axis, 1."""
  return {k: jnp.concatenate([c[k] for c in chunks], axis=1 if k in ("latents", "log_probs")
                             else 0) for k in chunks[0]}


def train_prompts(setup: Setup):
  """The iterator of the train split's prompts: one global batch per rollout chunk, so each
  chunk holds the same prompts on any number of processes and a pod samples what one host
  would."""
  g, tc = setup.rollouts, setup.config.train
  chunk_prompts = g.prompts_per_step // g.rollout_chunks
  if chunk_prompts % jax.process_count():
    raise ConfigError(f"{chunk_prompts} prompts per rollout chunk do not split over "
                      f"{jax.process_count()} processes")
  return iter(make_dataset(setup.source("train"), chunk_prompts // jax.process_count(),
                           seed=tc.seed, fields=PROMPT_FIELDS, kinds=tc.example_kinds,
                           tasks=tc.tasks, map_fn=functools.partial(tokenize, setup),
                           worker_count=tc.worker_count))


def next_prompts(data_iter, g) -> dict:
  """This process's prompts of one iteration: its rows of `rollout_chunks` global batches,
  chunk after chunk (the order `rollout_and_score` splits them in)."""
  batches = [next(data_iter) for _ in range(g.rollout_chunks)]
  return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def tokenize(setup: Setup, record: dict) -> dict:
  ids, mask = tokenizer_lib.encode(setup.tokenizer, [record["instruction"]],
                                              setup.text_len)
  record["ids"], record["mask"] = ids[0], mask[0]
  return record


WORLD_REWARDS = ("checklist", "preservation")  # read the shapes world's scenes


def make_rewards(config, world) -> rewards_lib.Rewards:
  """The config's rewards; without a world (edit records) only judges may be weighted."""
  if world is None:
    on = [n for n in WORLD_REWARDS if config.rewards.get(n, {}).get("weight", 0.0)]
    if on:
      raise ConfigError(f"reward {on[0]!r} reads the shapes world's scenes; on edit records "
                        f"set rewards.{on[0]}.weight=0 and weight a judge (rewards.judge)")
  try:
    return rewards_lib.Rewards(config.rewards.to_dict(), world)
  except ValueError as e:
    raise ConfigError(f"config rewards: {e}") from None


# ------------------------------------------------------------------------------------------
# The policy the RL loop trains.
# ------------------------------------------------------------------------------------------
class EditorPolicy(driver.Policy):
  """The editor sampling edits with the SDE sampler, scored by the host rewards."""

  start_kind = "an editor SFT workdir"

  @staticmethod
  def abstract_state(setup: Setup) -> PolicyState:
    return setup.abstract_state

  @classmethod
  def evaluate(cls, setup: Setup, state: PolicyState, out: str) -> dict:
    """The trained policy and, on the same noise, the SFT model it started from; PNG grids."""
    config, ec = setup.config, setup.config.eval
    reward_fn = make_rewards(config, setup.world)
    trained = state.ema_params if ec.use_ema else state.params
    sampler = editing.config_sampler(setup)
    batches = editing.eval_batches(setup, ec.split, ec.example_kinds, ec.num_examples,
                                   ec.batch_size)
    results = {}
    for name, params in (("after", setup.policy(trained, state.base)),
                         ("before", setup.reference(state))):
      results[name], first = editing.evaluate(setup, params, batches, sampler, seed=ec.seed,
                                              reward_fn=reward_fn)
      evaluation.edit_grid(*first).save(os.path.join(out, f"edits_{name}.png"))
    after, before = results["after"], results["before"]
    return {**after, "before": before, "change": driver.change(before, after),
            "split": ec.split, "example_kinds": list(ec.example_kinds),
            "init_from": config.init_from, "seed": config.train.seed}

  def __init__(self, setup: Setup, rollout_setup: Setup, algorithm, run):
    super().__init__(setup, rollout_setup, algorithm, run)
    config, g, tc = setup.config, setup.rollouts, setup.config.train
    self.reward_fn = make_rewards(config, setup.world)
    self.rollout = make_rollout(rollout_setup)
    self.sampler = editing.config_sampler(setup)
    self.val_batches = editing.eval_batches(setup, "validation", tc.example_kinds,
                                            tc.eval_examples, config.eval.batch_size)
    self.base_rng = jax.random.key(tc.seed)
    n_trained = sum(x.size for x in jax.tree.leaves(setup.abstract_state.params))
    logging.info("editor %s: %.3fM trained parameters (%s), %d prompts x %d samples per step, "
                 "mesh %s", algorithm.name, n_trained / 1e6, "LoRA" if setup.use_lora else
                 "full", g.prompts_per_step, g.group_size, dict(setup.mesh.shape))

  def start_state(self) -> PolicyState:
    return init_state(self.setup, load_sft(self.setup, self.setup.config.init_from))

  def train_prompts(self):
    return train_prompts(self.setup)

  def roll(self, step, params, base, data_iter):
    """(chunks for the update, host dict): see `rollout_and_score`."""
    prompts = next_prompts(data_iter, self.setup.rollouts)
    extra = self.algorithm.extra_fields(self.setup, prompts)
    chunks, host = rollout_and_score(
        self.rollout_setup, self.rollout, self.reward_fn, params, base, {**prompts, **extra},
        self.setup.levels_and_steps(step)[0], jax.random.fold_in(self.base_rng, step),
        tuple(extra))
    return (overlap.to_mesh(chunks, self.setup.mesh) if self.overlapped else chunks), host

  def update_inputs(self, rollouts, step):
    return (rollouts[0], *self.setup.levels_and_steps(step))

  def scalars(self, rollouts):
    host = rollouts[1]
    rewards = sharding.all_rows(host["rewards"])  # every process's rollouts
    out = {"reward/mean": float(np.nanmean(rewards)), "reward/std": float(np.nanstd(rewards)),
           **{f"reward/{k}": float(np.nanmean(sharding.all_rows(v)))
              for k, v in host["parts"].items()}}
    if self.reward_fn.can_mask:  # samples a judge could not score: left out of the update
      out["reward/masked_fraction"] = float(np.isnan(rewards).mean())
    return out

  def validate(self, state, step):
    return editing.evaluate(self.setup, self.setup.policy(state.ema_params, state.base),
                            self.val_batches, self.sampler, seed=10_000,
                            reward_fn=self.reward_fn)

  def samples(self, state, step, first, rollouts):
    run, limit = self.run, self.setup.config.train.sample_examples
    if first is not None:
      editing.write_grid(run.writer, run.workdir, step, first, limit)
    if rollouts is not None:
      write_rollout_grid(run.writer, run.workdir, step, rollouts[1], limit)


def write_rollout_grid(writer, workdir: str, step: int, host: dict, limit: int) -> None:
  """The first groups of the last rollout: every sample of a prompt with its reward."""
  n = min(limit, len(host["rewards"]))
  texts = [f"{host['instruction'][i]} | reward {host['rewards'][i]:.2f}" for i in range(n)]
  records.write_image(writer, workdir, step, "rollouts", "rollout", evaluation.edit_grid(
      host["source_image"][:n], host["images"][:n], host["target_image"][:n], texts, None, n))


def algorithms(name: str, make_setup, make_update, extra_fields=None):
  """config -> the driver.Algorithm of an editor RL trainer: its update over the policy of
  the shapes world or, for runs on edit records, of the records."""
  extra = {} if extra_fields is None else {"extra_fields": extra_fields}
  on_shapes = driver.Algorithm(name, EditorPolicy, make_setup, make_update, **extra)
  on_records = driver.Algorithm(name, RecordsEditorPolicy, make_setup, make_update, **extra)
  return lambda config: on_records if flux_editing.on_records(config) else on_shapes


class RecordsEditorPolicy(EditorPolicy):
  """The editor on edit records (a lab's own data): prompts are the records' cached
  embeddings and source latents, rewards come from judges (rewards.judge / .remote), and
  validation scores the EMA policy's ODE samples with them."""

  @classmethod
  def evaluate(cls, setup: RecordsSetup, state: PolicyState, out: str) -> dict:
    """The trained policy and, on the same noise, the start; mean judge reward of each."""
    config, ec = setup.config, setup.config.eval
    reward_fn = make_rewards(config, None)
    trained = state.ema_params if ec.use_ema else state.params
    sampler = flux_editing.make_sampler(setup, config.sample.num_steps)
    split = ec.split if ec.split in setup.records.splits else "train"
    batches = flux_editing.eval_batches(setup, split, ec.num_examples, ec.batch_size)
    results = {}
    for name, params in (("after", setup.policy(trained, state.base)),
                         ("before", setup.reference(state))):
      results[name], first = flux_editing.evaluate(setup, params, batches, sampler,
                                                   seed=ec.seed, reward_fn=reward_fn)
      evaluation.edit_grid(*first).save(os.path.join(out, f"edits_{name}.png"))
    after, before = results["after"], results["before"]
    return {**after, "before": before, "change": driver.change(before, after),
            "split": split, "init_from": config.init_from, "seed": config.train.seed}

  def __init__(self, setup: RecordsSetup, rollout_setup: RecordsSetup, algorithm, run):
    driver.Policy.__init__(self, setup, rollout_setup, algorithm, run)
    config, g, tc = setup.config, setup.rollouts, setup.config.train
    self.reward_fn = make_rewards(config, None)
    self.rollout = make_rollout(rollout_setup)
    self.sampler = flux_editing.make_sampler(setup, config.sample.num_steps)
    split = config.eval.split if config.eval.split in setup.records.splits else "train"
    self.val_batches = flux_editing.eval_batches(setup, split, tc.eval_examples,
                                                 config.eval.batch_size)
    self.base_rng = jax.random.key(tc.seed)
    n_trained = sum(x.size for x in jax.tree.leaves(setup.abstract_state.params))
    logging.info("editor %s on %s: %.3fM trained parameters (%s), %d prompts x %d samples "
                 "per step, mesh %s", algorithm.name, setup.records.root, n_trained / 1e6,
                 "LoRA" if setup.use_lora else "full", g.prompts_per_step, g.group_size,
                 dict(setup.mesh.shape))

  def train_prompts(self):
    """An iteration's prompts from one bucket: its rollout chunks share a shape."""
    g = self.setup.rollouts
    if g.prompts_per_step % (g.rollout_chunks * jax.process_count()):
      raise ConfigError(f"rollout.prompts_per_step {g.prompts_per_step} must split into "
                        f"{g.rollout_chunks} chunks on {jax.process_count()} processes")
    return iter(edit_records.train_batches(
        self.setup.records, "train", g.prompts_per_step // jax.process_count(),
        seed=self.setup.config.train.seed, chunks=g.rollout_chunks))

  def roll(self, step, params, base, data_iter):
    batch = next(data_iter)
    prompts = {**self.setup.model_inputs(batch),
               **{k: batch[k] for k in ("id", "instruction", "requirement", "source_image",
                                        "target_image")},
               "task": batch["task_type"]}  # the records' task types tag the prompts
    extra = self.algorithm.extra_fields(self.setup, prompts)
    chunks, host = rollout_and_score(
        self.rollout_setup, self.rollout, self.reward_fn, params, base, {**prompts, **extra},
        self.setup.levels_and_steps(step)[0], jax.random.fold_in(self.base_rng, step),
        tuple(extra))
    return (overlap.to_mesh(chunks, self.setup.mesh) if self.overlapped else chunks), host

  def validate(self, state, step):
    return flux_editing.evaluate(self.setup, self.setup.policy(state.ema_params, state.base),
                                 self.val_batches, self.sampler, seed=10_000,
                                 reward_fn=self.reward_fn)
