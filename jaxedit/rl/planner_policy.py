"""The planner as an RL policy (`PlannerPolicy`, for `rl.driver`): the setup of a trainer on
the planner's own sampled plans (every parameter trains; the reference is a frozen copy of
the start), starting from a planner SFT run, the plans' cognitive and visual rewards
(docs/design.md section 6), and the evaluation of the trained planner against its start."""

from __future__ import annotations

import json
import logging
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from flax.traverse_util import flatten_dict, unflatten_dict

from jaxedit import (checkpoint, lora, overlap, plan_then_edit, planning, plans, sharding,
                     workdirs)
from jaxedit.config import ConfigError
from jaxedit.data.pipeline import make_dataset
from jaxedit.interop import pretrained
from jaxedit.rl.editor_policy import check_tasks
from jaxedit.rl import driver
from jaxedit.rl.driver import PolicyState
from jaxedit.shapes import checklist as cl
from jaxedit.shapes.detect import detect
from jaxedit.shapes.world import Scene
from jaxedit.train import setup as setup_lib
from jaxedit.train.setup import check_batch_size

ROLLOUT_FIELDS = planning.RECORD_FIELDS + ("checklist", "source_scene", "num_steps", "task")
BATCH_FIELDS = ("source_image", "prompt", "prompt_valid", "plan", "plan_valid")


def check_rollouts(config: ml_collections.ConfigDict) -> None:
  """Checks what every trainer on the planner's own plans shares: the start, the `rollout`
  section, the tasks and the visual reward's editor."""
  r = config.rollout
  if not config.init_from:
    raise ConfigError("config key 'init_from' must name a planner SFT workdir")
  if config.init_params not in ("ema", "raw"):
    raise ConfigError("config key 'init_params' must be 'ema' or 'raw'")
  for key in ("prompts_per_step", "group_size", "inner_epochs", "minibatches"):
    if r[key] <= 0:
      raise ConfigError(f"config key 'rollout.{key}' must be > 0")
  if r.prompts_per_step * r.group_size % r.minibatches:
    raise ConfigError(f"P * G = {r.prompts_per_step * r.group_size} samples do not split into "
                      f"rollout.minibatches {r.minibatches}")
  if r.temperature <= 0:
    raise ConfigError("config key 'rollout.temperature' must be > 0 (rollouts sample)")
  overlap.check(r)
  check_tasks(config)
  if config.rewards.visual.weight and not config.editor:
    raise ConfigError("rewards.visual.weight > 0 needs an editor to run the plans: set config "
                      "key 'editor' to an editor workdir")


def build_setup(config: ml_collections.ConfigDict, workdir: str, devices=None):
  """The planner's setup (planning.Setup) built for P * G rollouts (batch size), with the
  tokenizer of `init_from`."""
  pretrained.copy_tokenizer(config.init_from, workdir)
  sft_like = as_sft_config(config)
  setup = planning.make_setup(sft_like, workdir, devices)
  check_batch_size("a minibatch (P * G / rollout.minibatches)",
                   sft_like.train.batch_size // config.rollout.minibatches, setup.mesh,
                   setup.batch_sharding)
  return setup


def as_sft_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The planner SFT-style config this run's setup is built from: a batch of P * G rollouts, a
  constant learning rate after warm-up, and no cell head (an SFT training aid)."""
  sft_like = ml_collections.ConfigDict(config.to_dict())
  g = config.rollout
  sft_like.train.batch_size = g.prompts_per_step * g.group_size
  sft_like.train.end_lr_fraction = 1.0
  sft_like.train.cell_loss_weight = 0.0
  sft_like.model.vision.cell_head = False
  return sft_like


def load_start(setup, init_from: str, key: str):
  """The whole starting model (no adapters) in this run's shardings: a planner run's (LoRA
  adapters merged into their base), or a transformers folder's / GGUF file's."""
  _, abstract = lora.split(planning.abstract_whole(setup))  # the model without adapters
  if pretrained.folder_kind(init_from):
    params = pretrained.load_planner(init_from, abstract, setup.model.cfg)
    if set(params) != set(abstract):
      raise ConfigError(f"init_from: {init_from} has no vision prefix: start from a planner "
                        "SFT workdir, or a jaxedit export of one")
    return params
  mngr, step = checkpoint.latest_step(init_from, "a planner SFT workdir")
  saved = checkpoint.saved_config(mngr, step)
  mismatched = model_mismatch(saved, setup.config)
  if mismatched:
    raise ConfigError("init_from was trained with a different model: " + ", ".join(mismatched))
  rank = saved["model"].get("lora_rank", 0)
  if rank:  # adapters (with the vision prefix) over a frozen LM, merged on the host
    whole = lora.join(checkpoint.restore_subtree_on_host(mngr, step, key),
                      checkpoint.restore_subtree_on_host(mngr, step, "base"))
    merged = flatten_dict(lora.merge(whole, rank, saved["model"].get("lora_alpha") or rank))
    params = unflatten_dict({k: jax.device_put(np.asarray(merged[k]), a.sharding)
                             for k, a in flatten_dict(abstract).items()})
  else:
    params = checkpoint.restore_subtree(mngr, step, key, abstract)
  logging.info("initialised from %s (step %d, %s%s)", init_from, step, key,
               f", LoRA rank {rank} merged" if rank else "")
  return params


def model_mismatch(saved: dict, config: ml_collections.ConfigDict) -> list[str]:
  """'KEY = A there, B here' for each model key, and the prompt mode, where a saved run's
  config differs from `config`: its parameters would not mean the same. The vision prefix's
  cell head (an SFT training aid, not used after it) and the attention kernel may differ."""
  def model_keys(model: dict) -> dict:
    vision = {k: v for k, v in model.get("vision", {}).items() if k != "cell_head"}
    kernel = ("attention", "splash_block", "lora_rank", "lora_alpha", "lora_targets")
    return {**{k: v for k, v in model.items() if k not in kernel}, "vision": vision}
  ours = model_keys(config.model.to_dict())
  out = [f"model.{k} = {v!r} there, {ours[k]!r} here"
         for k, v in sorted(model_keys(saved["model"]).items())
         if k in ours and json.dumps(ours[k]) != json.dumps(v)]
  for key in ("scene_as_text", "system"):  # what the prompts say
    theirs = saved["prompt"].get(key, "" if key == "system" else None)
    if theirs != config.prompt[key]:
      out.append(f"prompt.{key} = {theirs!r} there, {config.prompt[key]!r} here")
  return out


def init_state(setup, start_params) -> PolicyState:
  """The start's parameters trained and, as separate buffers, the reference; with LoRA, the
  start's LM is the frozen base under fresh adapters (B = 0: the policy starts as the
  start), and its vision prefix trains beside them."""
  copy = lambda tree: jax.tree.map(lambda x: x.copy(), tree)
  base = None
  if setup.abstract_state.base is not None:
    fresh = setup_lib.init_state(setup)
    trained = {**fresh.params, **{k: v for k, v in start_params.items() if k != "lm"}}
    base, start_params = {"lm": start_params["lm"]}, trained
  opt_state = jax.jit(setup.optimizer.init,
                      out_shardings=setup.state_shardings.opt_state)(start_params)
  return PolicyState(jnp.zeros((), jnp.int32), copy(start_params), copy(start_params),
                     opt_state, base=base, reference=start_params)


# ------------------------------------------------------------------------------------------
# Rollouts, rewards and the update.
# ------------------------------------------------------------------------------------------
def sequence_logprobs(params, model, batch: dict, temperature: float, base=None):
  """(N, T) log-probs of the plan tokens under the policy at `temperature` (`params` over
  `base` under LoRA)."""
  logits = planning.completion_logits(lora.whole(params, base), model, batch) / temperature
  logp = jax.nn.log_softmax(logits, axis=-1)
  return jnp.take_along_axis(logp, batch["plan"][..., None], axis=-1)[..., 0]


def cognitive_rewards(texts: list[str], records: dict, rc) -> np.ndarray:
  out = []
  for i, text in enumerate(texts):
    out.append(plans.plan_score(text, Scene.from_array(records["source_scene"][i]),
                                cl.Checklist.from_json(records["checklist"][i]),
                                int(records["num_steps"][i]), rc.step_penalty, rc.error_penalty))
  return np.asarray(out, np.float32)


def visual_rewards(editor, texts: list[str], records: dict, max_steps: int,
                   seed: int) -> np.ndarray:
  """Checklist fraction of the scene the editor produced by running each plan step by step
  (detector-verified); 0 for a plan that cannot be run."""
  steps, trails = plan_then_edit.run_plan_texts(editor, np.asarray(records["source_image"]), texts,
                                          max_steps, seed)
  scenes = detect(np.stack([t[-1] for t in trails]), editor.setup.world).scenes
  return np.asarray([cl.Checklist.from_json(c).score(scene) if s is not None else 0.0
                     for c, scene, s in zip(records["checklist"], scenes, steps)], np.float32)


def as_policy_state(s) -> PolicyState:
  """A planner SFT-style state (or its abstract arrays, or shardings) as the RL state's: its
  parameters standing in for the reference too."""
  return PolicyState(s.step, s.params, s.ema_params, s.opt_state, base=s.base,
                     reference=s.params)


def state_shardings(setup) -> PolicyState:
  return as_policy_state(setup.state_shardings)


def train_prompts(setup):
  """The iterator of this process's training prompts, P per iteration over all processes."""
  tc = setup.config.train
  return iter(make_dataset(setup.source("train"),
                           setup.config.rollout.prompts_per_step // jax.process_count(),
                           seed=tc.seed, fields=ROLLOUT_FIELDS, kinds=tc.example_kinds,
                           tasks=tc.tasks))


def rollout(setup, sampler, params, records: dict, rng):
  """G plans per prompt: (model inputs with the sampled plans, plan texts, records repeated)."""
  g = setup.config.rollout
  repeated = {k: np.repeat(np.asarray(v), g.group_size, axis=0) for k, v in records.items()}
  arrays = setup.examples(repeated)
  samples = sampler(params, sharding.global_batch(
      {k: arrays[k] for k in ("source_image", "prompt", "prompt_valid")},
      setup.batch_sharding), rng, g.temperature)
  tokens = sharding.local_rows(samples.tokens, setup.batch_sharding)
  valid = sharding.local_rows(samples.valid, setup.batch_sharding)
  texts = setup.decode(tokens, valid)
  arrays.update({"plan": tokens, "plan_valid": valid})
  return arrays, texts, repeated


# ------------------------------------------------------------------------------------------
# The policy the RL loop trains.
# ------------------------------------------------------------------------------------------
class PlannerPolicy(driver.Policy):
  """The planner sampling plans, scored by their cognitive and visual rewards."""

  start_kind = "a planner SFT workdir"

  @staticmethod
  def abstract_state(setup) -> PolicyState:
    return as_policy_state(setup.abstract_state)

  @classmethod
  def evaluate(cls, setup, state: PolicyState, out: str) -> dict:
    """The trained planner and the SFT planner it started from, plans run end to end by
    `editor` where one is set, beside the baselines; writes plans.txt."""
    config, ec = setup.config, setup.config.eval
    batches = planning.eval_batches(setup, ec.split, ec.num_examples, ec.batch_size)
    sampler = planning.make_plan_sampler(setup)
    editor = workdirs.load_editor(config.editor, ec.batch_size) if config.editor else None
    baseline = {**plan_then_edit.baseline_scores(config, batches, out),
                **plan_then_edit.reference_plan_scores(config, batches, out, editor)}
    results = {}
    for name, params in (("after", state.ema_params if ec.use_ema else state.params),
                         ("before", state.reference)):
      params = lora.whole(params, state.base)
      texts = planning.plan_texts(setup, params, batches, sampler)
      extra = {**plan_then_edit.e2e_scores(config, batches, texts, out, editor, f"e2e_{name}"),
               **baseline}
      results[name] = planning.evaluate(setup, params, batches, sampler, texts=texts,
                                        extra_scores=extra)
    (after, samples), (before, _) = results["after"], results["before"]
    with open(os.path.join(out, "plans.txt"), "w") as f:
      f.write(planning.format_samples(samples) + "\n")
    return {**after, "before": before, "split": ec.split, "editor": config.editor,
            "baseline_editor": ec.baseline_editor, "change": driver.change(before, after)}

  def __init__(self, setup, rollout_setup, algorithm, run):
    super().__init__(setup, rollout_setup, algorithm, run)
    config, g, tc = setup.config, setup.config.rollout, setup.config.train
    self.sampler = planning.make_plan_sampler(setup)  # validation
    self.rollout_sampler = (planning.make_plan_sampler(rollout_setup) if self.overlapped
                            else self.sampler)
    self.editor = (workdirs.load_editor(config.editor, g.prompts_per_step * g.group_size)
                   if config.rewards.visual.weight else None)
    self.val_batches = planning.eval_batches(setup, "validation", tc.eval_examples,
                                             config.eval.batch_size)
    self.base_rng = jax.random.key(tc.seed)
    logging.info("planner %s: %d prompts x %d plans per step, mesh %s", algorithm.name,
                 g.prompts_per_step, g.group_size, dict(setup.mesh.shape))

  def start_state(self) -> PolicyState:
    config = self.setup.config
    key = "ema_params" if config.init_params == "ema" else "params"
    return init_state(self.setup, load_start(self.setup, config.init_from, key))

  def train_prompts(self):
    return train_prompts(self.setup)

  def roll(self, step, params, base, data_iter):
    """(model inputs with the sampled plans, records repeated per plan, rewards, visual
    rewards or None), host arrays."""
    config = self.setup.config
    arrays, texts, records = rollout(self.rollout_setup, self.rollout_sampler,
                                     lora.whole(params, base), next(data_iter),
                                     jax.random.fold_in(self.base_rng, step))
    rewards = config.rewards.cognitive.weight * cognitive_rewards(
        texts, records, config.rewards.cognitive)
    visual = None
    if self.editor is not None:
      visual = visual_rewards(self.editor, texts, records, config.eval.e2e_max_steps, step)
      rewards = rewards + config.rewards.visual.weight * visual
    return arrays, records, rewards, visual

  def update_inputs(self, rollouts, step):
    arrays, records, rewards, _ = rollouts
    bs = self.setup.batch_sharding
    batch = sharding.global_batch(
        {**{k: arrays[k] for k in BATCH_FIELDS},
         **self.algorithm.extra_fields(self.setup, records)}, bs)
    return batch, sharding.global_batch({"r": rewards}, bs)["r"]

  def scalars(self, rollouts):
    arrays, _, rewards, visual = rollouts
    scalars = {}
    if visual is not None:
      scalars["reward/visual"] = float(sharding.all_rows(visual).mean())
    every = sharding.all_rows(rewards)  # every process's rollouts
    scalars.update({"reward/mean": float(every.mean()), "reward/std": float(every.std()),
                    "rollout/plan_tokens": float(
                        sharding.all_rows(arrays["plan_valid"].sum(1)).mean())})
    return scalars

  def validate(self, state, step):
    summary, samples = planning.evaluate(self.setup, lora.whole(state.ema_params, state.base),
                                         self.val_batches, self.sampler)
    planning.write_samples(self.run.writer, self.run.workdir, step,
                           samples[:self.setup.config.train.sample_examples])
    return summary, None
