"""Planner SFT: next-token prediction of the reference plan, given the source image and the
instruction.

    jaxedit train --config configs/shapes_planner_sft.py --workdir DIR
    jaxedit eval  --config configs/shapes_planner_sft.py --workdir DIR

A training sequence is laid out as the sampler lays out a rollout: [image prefix] [prompt,
left-padded] [plan JSON + EOS, right-padded]; the loss is the mean cross-entropy over the
plan tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxedit import (checkpoint, distributed, evaluation, flow, hparams, plans, sampling,
                     sharding)
from jaxedit.config import ConfigError
from jaxedit.data import job as data_job
from jaxedit.data.pipeline import make_dataset
from jaxedit.interop import pretrained
from jaxedit.models import planner as planner_model
from jaxedit.models.planner import Planner, model_config, planner_config
from jaxedit.shapes import checklist as cl
from jaxedit.shapes.world import Scene
from jaxedit.text import tokenizer as tokenizer_lib
from jaxedit.train import loop, optimizer as optimizer_lib, setup as setup_lib
from jaxedit.train.setup import TrainState

RECORD_FIELDS = ("source_image", "instruction", "scene_text", "plan_steps")
EVAL_INFO = ("instruction", "plan_steps", "checklist", "family", "held_out_family", "task")


def reference_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.trainer = "planner_sft"
  c.init_from = ""  # optional: a transformers Qwen2/Llama folder (or a jaxedit export)
  c.world = data_job.world_config()
  c.data = data_job.data_config()
  c.tokenizer = ml_collections.ConfigDict({"vocab_size": 512, "corpus_examples": 4000})
  c.model = model_config()
  c.prompt = ml_collections.ConfigDict({
      "scene_as_text": False,  # also write the scene description into the prompt
      "max_prompt_len": 48,  # tokens, BOS included (scene_as_text needs ~112); longer: an error
      "max_plan_len": 128,  # tokens, EOS included
      # Training batches are padded only to their longest prompt and plan, rounded up to this
      # multiple (a few compiled shapes, much less padding: plans average ~17 tokens).
      # 0: always pad to the maximum lengths.
      "pad_multiple": 16,
  })
  c.sample = ml_collections.ConfigDict({
      "temperature": 0.0, "top_k": 0, "top_p": 1.0,
      # Decode in segments of this many tokens, each attending to the cache slots filled so
      # far (sampling.SamplingConfig); 0: one segment over the whole cache.
      "attend_chunk": sampling.SamplingConfig.attend_chunk,
  })
  c.train = ml_collections.ConfigDict({
      "seed": 0,
      "batch_size": 32,  # global
      "num_steps": 2000,
      "example_kinds": ("abstract", "atomic"),
      # Cross-entropy of the vision prefix's cell head (model.vision.cell_head) against the
      # source scene's shapes and colours, added to the plan loss with this weight.
      "cell_loss_weight": 0.0,
      "lr": 1e-3,
      "warmup_steps": 100,
      "end_lr_fraction": 0.05,
      "weight_decay": 0.01,
      "b1": 0.9,
      "b2": 0.95,
      "grad_clip": 1.0,
      "ema_decay": 0.999,
      "log_every": 20,
      "eval_every": 500,
      "eval_examples": 256,  # validation examples decoded during training
      "sample_examples": 8,  # plans written to DIR/samples and TensorBoard
      "checkpoint_every": 500,
      "keep_checkpoints": 2,
      "async_checkpoints": True,
      "worker_count": 0,
  })
  # An editor workdir (SFT or GRPO) that runs the plans: e2e_success in eval, `jaxedit edit`,
  # and the planner GRPO visual reward.
  c.editor = ""
  c.eval = ml_collections.ConfigDict({
      "split": "test", "num_examples": 0,  # 0: every abstract example of the split
      "batch_size": 64, "use_ema": True, "seed": 1,
      "e2e_max_steps": 8,  # longer plans count as failures
      # An editor workdir trained on the same data with (source, abstract instruction, final
      # target) pairs, asked to do the abstract edit in one step.
      "baseline_editor": "",
      # Also run the reference plans with `editor`: the ceiling that editor sets.
      "e2e_reference_plans": False})
  c.mesh = sharding.mesh_config()
  c.distributed = distributed.config()
  return c


# ------------------------------------------------------------------------------------------
# Setup: everything that depends only on the config, shared by train and eval.
# ------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Setup(setup_lib.RunSetup):
  model: Planner

  @property
  def pad_id(self) -> int:
    return self.tokenizer.token_to_id(tokenizer_lib.PAD)

  @property
  def eos_id(self) -> int:
    return self.tokenizer.token_to_id(tokenizer_lib.EOS)

  def width(self, longest: int, limit: int, trim: bool) -> int:
    """Padded width: `limit`, or with `trim` the longest row rounded up to pad_multiple.
    Several processes must agree on shapes without talking, so they always pad to `limit`."""
    multiple = self.config.prompt.pad_multiple
    if not trim or not multiple or longest > limit or jax.process_count() > 1:
      return limit
    return min(limit, -(-longest // multiple) * multiple)

  def prompt_ids(self, instructions, scene_texts,
                 trim: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded (ids, valid) of BOS + the prompt template."""
    pc = self.config.prompt
    texts = [plans.prompt(i, s if pc.scene_as_text else None)
             for i, s in zip(instructions, scene_texts)]
    bos = self.tokenizer.token_to_id(tokenizer_lib.BOS)
    rows = [[bos] + e.ids for e in self.tokenizer.encode_batch(texts)]
    for text, row in zip(texts, rows):
      if len(row) > pc.max_prompt_len:
        raise ValueError(f"prompt of {len(row)} tokens exceeds prompt.max_prompt_len "
                         f"{pc.max_prompt_len}: {text!r}")
    width = self.width(max(map(len, rows)), pc.max_prompt_len, trim)
    return sampling.left_pad(rows, self.pad_id, width)

  def plan_ids(self, plan_texts, trim: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded (ids, valid) of the plan JSON + EOS."""
    encoded = self.tokenizer.encode_batch(list(plan_texts))
    limit = self.config.prompt.max_plan_len
    n = self.width(max(len(e.ids) + 1 for e in encoded), limit, trim)
    ids = np.full((len(plan_texts), n), self.pad_id, np.int32)
    valid = np.zeros((len(plan_texts), n), bool)
    for i, (text, e) in enumerate(zip(plan_texts, encoded)):
      row = e.ids + [self.eos_id]
      if len(row) > limit:
        raise ValueError(f"plan of {len(row)} tokens exceeds prompt.max_plan_len {limit}: "
                         f"{text!r}")
      ids[i, :len(row)], valid[i, :len(row)] = row, True
    return ids, valid

  def examples(self, batch: dict, trim: bool = False) -> dict:
    """A batch of records -> model inputs; `trim` pads only as far as the batch needs. The
    source scene comes along where the batch has it and the model has a cell head."""
    prompt, prompt_valid = self.prompt_ids(batch["instruction"], batch["scene_text"], trim)
    plan, plan_valid = self.plan_ids(list(batch["plan_steps"]), trim)
    out = {"source_image": np.asarray(batch["source_image"]), "prompt": prompt,
           "prompt_valid": prompt_valid, "plan": plan, "plan_valid": plan_valid}
    if "source_scene" in batch and self.model.cfg.vision and self.model.cfg.vision.cell_classes:
      out["source_scene"] = np.asarray(batch["source_scene"], np.int32)
    return out

  def decode(self, tokens: np.ndarray, valid: np.ndarray) -> list[str]:
    """Sampled plan tokens -> texts (EOS and padding dropped)."""
    rows = [[int(t) for t, v in zip(row, ok) if v and t != self.eos_id]
            for row, ok in zip(tokens, valid)]
    return self.tokenizer.decode_batch(rows)


def check_config(config: ml_collections.ConfigDict) -> None:
  data_job.check_data_config(config.data)
  for key in ("num_steps", "batch_size", "log_every"):
    if config.train[key] <= 0:
      raise ConfigError(f"config key 'train.{key}' must be > 0")
  for key in ("max_prompt_len", "max_plan_len"):
    if config.prompt[key] <= 0:
      raise ConfigError(f"config key 'prompt.{key}' must be > 0")
  if config.sample.get("attend_chunk", 0) < 0:
    raise ConfigError("config key 'sample.attend_chunk' must be >= 0 (0: one decode segment)")
  if config.train.cell_loss_weight > 0 and not (config.model.vision.enabled
                                                and config.model.vision.get("cell_head")):
    raise ConfigError("config key 'train.cell_loss_weight' > 0 needs a cell head "
                      "(model.vision.enabled and model.vision.cell_head); set it to 0")
  if config.model.vocab_size < config.tokenizer.vocab_size:
    raise ConfigError(f"model.vocab_size {config.model.vocab_size} is smaller than "
                      f"tokenizer.vocab_size {config.tokenizer.vocab_size}")


def make_model_and_mesh(config: ml_collections.ConfigDict, workdir: str, devices=None):
  """(world, tokenizer, model, mesh, logical rules, batch sharding); the tokenizer is loaded
  from DIR/tokenizer.json, or trained on the planner corpus and saved there."""
  world = data_job.world_from(config)
  tok = tokenizer_lib.load_or_train(os.path.join(workdir, "tokenizer.json"), world,
                                    config.tokenizer.vocab_size,
                                    config.tokenizer.corpus_examples, config.data.seed,
                                    corpus=tokenizer_lib.planner_corpus)
  try:
    model = Planner(planner_config(config.model, world))
  except ValueError as e:
    raise ConfigError(f"config model: {e}") from None
  return (world, tok, model, *setup_lib.mesh_and_rules(config, devices))


def make_setup(config: ml_collections.ConfigDict, workdir: str, devices=None) -> Setup:
  check_config(config)
  parts = make_model_and_mesh(config, workdir, devices)
  return setup_lib.assemble(Setup, config, parts, optimizer_lib.supervised(config.train),
                            functools.partial(_init_state, image_size=parts[0].image_size,
                                              prompt_len=config.prompt.max_prompt_len))


def _init_state(rng, *, model: Planner, tx, image_size: int, prompt_len: int) -> TrainState:
  image = jnp.zeros((1, image_size, image_size, 3)) if model.cfg.vision else None
  ids = jnp.zeros((1, prompt_len), jnp.int32)
  valid = jnp.ones((1, model.cfg.prefix_len + prompt_len), bool)
  return setup_lib.fresh_state(planner_model.init_params(model, rng, ids, valid, image=image),
                               tx)


# ------------------------------------------------------------------------------------------
# The train step.
# ------------------------------------------------------------------------------------------
def completion_logits(params, model: Planner, batch: dict, with_cells: bool = False):
  """Logits (B, N, V) predicting each completion token (teacher forcing), laid out as the
  sampler lays out a rollout; `with_cells` also returns the cell head's logits
  (B, cells, sum(cell_classes))."""
  image = flow.to_model_space(batch["source_image"]) if model.cfg.vision else None
  ids = jnp.concatenate([batch["prompt"], batch["plan"]], axis=1)
  b, p = batch["prompt"].shape
  valid = jnp.concatenate([jnp.ones((b, model.cfg.prefix_len), bool), batch["prompt_valid"],
                           batch["plan_valid"]], axis=1)
  first = model.cfg.prefix_len + p - 1  # the last prompt slot predicts the first plan token
  plan_logits = lambda logits: logits[:, first:first + batch["plan"].shape[1]]
  if not with_cells:
    return plan_logits(model.apply({"params": params}, ids, valid, image=image))
  logits, sown = model.apply({"params": params}, ids, valid, image=image,
                             mutable=["intermediates"])
  return plan_logits(logits), sown["intermediates"]["cell_logits"][0]


def cell_loss(cell_logits, scene, classes: tuple[int, ...]):
  """(mean cross-entropy, accuracy: every attribute right) of the cell head's logits
  (B, cells, sum(classes)) against the scene arrays (B, grid, grid, attributes), whose
  cells are in the patches' row-major order and whose 0 is "empty"."""
  labels = scene.reshape(scene.shape[0], -1, scene.shape[-1])
  nll, right = 0.0, True
  for i, logits in enumerate(jnp.split(cell_logits, np.cumsum(classes)[:-1], axis=-1)):
    nll += optax.softmax_cross_entropy_with_integer_labels(logits, labels[..., i]).mean()
    right = right & (jnp.argmax(logits, -1) == labels[..., i])
  return nll, right.mean()


def loss_fn(params, model: Planner, batch: dict, cell_loss_weight: float = 0.0):
  """Mean plan-token cross-entropy, plus `cell_loss_weight` x the cell head's loss."""
  with_cells = cell_loss_weight > 0
  out = completion_logits(params, model, batch, with_cells=with_cells)
  logits = out[0] if with_cells else out
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["plan"])
  mask = batch["plan_valid"].astype(jnp.float32)
  loss = (nll * mask).sum() / jnp.maximum(mask.sum(), 1.0)
  accuracy = ((jnp.argmax(logits, -1) == batch["plan"]) * mask).sum() / jnp.maximum(mask.sum(), 1)
  aux = {"token_accuracy": accuracy}
  if with_cells:
    aux["plan_loss"] = loss
    aux["cell_loss"], aux["cell_accuracy"] = cell_loss(out[1], batch["source_scene"],
                                                       model.cfg.vision.cell_classes)
    loss = loss + cell_loss_weight * aux["cell_loss"]
  return loss, aux


def make_train_step(setup: Setup):
  cfg = setup.config

  def step_fn(state: TrainState, batch: dict, hp: dict):
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, setup.model, batch, cfg.train.cell_loss_weight)
    params, ema, opt_state, rate = setup.optimizer.update(
        hp, state.params, state.ema_params, state.opt_state, grads, state.step)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": rate, **aux}
    return TrainState(state.step + 1, params, ema, opt_state), metrics

  step = jax.jit(step_fn, in_shardings=(setup.state_shardings, setup.batch_sharding, None),
                 out_shardings=(setup.state_shardings, sharding.replicated(setup.mesh)),
                 donate_argnums=0)
  return hparams.bind(sharding.in_context(step, setup.mesh, setup.rules),
                      hparams.values(cfg, hparams.SFT))


def make_plan_sampler(setup: Setup):
  """(params, arrays, rng) -> Samples of plans for a batch of model inputs."""
  sc = setup.config.sample
  # Configs saved before sample.attend_chunk existed decode with the default.
  settings = sampling.SamplingConfig(setup.config.prompt.max_plan_len, (setup.eos_id,),
                                     setup.pad_id, sc.top_k, sc.top_p,
                                     sc.get("attend_chunk", sampling.SamplingConfig.attend_chunk))
  sample = sampling.make_sampler(setup.model, settings, setup.mesh, setup.rules)
  vision = setup.model.cfg.vision is not None

  def run(params, arrays: dict, rng, temperature=sc.temperature):
    image = flow.to_model_space(arrays["source_image"]) if vision else None
    return sample(params, arrays["prompt"], arrays["prompt_valid"], rng, temperature, image)
  return run


# ------------------------------------------------------------------------------------------
# Evaluation: decode plans, parse them, score them against the reference checklists.
# ------------------------------------------------------------------------------------------
def eval_batches(setup: Setup, split: str, num_examples: int, batch_size: int):
  """Fixed batches of a split's abstract examples (padded to `batch_size`) as (arrays, info)."""
  ds = make_dataset(setup.source(split), batch_size, seed=0, shuffle=False, num_epochs=1,
                    drop_remainder=False, kinds=("abstract",), process_index=0, process_count=1,
                    fields=RECORD_FIELDS + EVAL_INFO[2:] + ("source_scene", "num_steps"))
  out, seen = [], 0
  for batch in ds:
    n = len(batch["instruction"])
    if num_examples:
      n = min(n, num_examples - seen)
    if n <= 0:
      break
    batch = {k: v[:n] for k, v in batch.items()}
    arrays = setup.examples(batch)
    arrays = {k: sharding.pad_rows(v, batch_size) for k, v in arrays.items()}
    info = {k: [v.item() if hasattr(v, "item") else v for v in batch[k]] for k in EVAL_INFO}
    info["source_scene"] = np.asarray(batch["source_scene"])
    info["num_steps"] = np.asarray(batch["num_steps"])
    out.append((arrays, info))
    seen += n
  return out


def score_plans(texts: list[str], info: dict) -> dict[str, np.ndarray]:
  """Per example: `plan_checklist_score` (plans.plan_score), `plan_exact` (the reference
  steps, exactly) and `plan_parses` (valid JSON whose every step applies)."""
  out = {"plan_checklist_score": [], "plan_exact": [], "plan_parses": []}
  for i, text in enumerate(texts):
    scene = Scene.from_array(info["source_scene"][i])
    checklist = cl.Checklist.from_json(info["checklist"][i])
    out["plan_checklist_score"].append(
        plans.plan_score(text, scene, checklist, int(info["num_steps"][i])))
    try:
      plans.parse_plan(text, scene)
      parses = True
    except plans.PlanError:
      parses = False
    out["plan_parses"].append(parses)
    exact = parses and plans.parse_json(text) == json.loads(info["plan_steps"][i])
    out["plan_exact"].append(exact)
  return {k: np.asarray(v, np.float32) for k, v in out.items()}


def summarize_plans(scores: dict[str, np.ndarray], groups: dict[str, list[str]],
                    held_out: np.ndarray) -> dict:
  """Means over the training families at the top level, and the same under
  `held_out_families` for the families never seen in training. `groups` maps a name
  (`family`, `task`) to one label per example and yields `plan_checklist_score_by_{name}`
  and `plan_exact_by_{name}`."""
  def means(keep):
    s = {k: float(v[keep].mean()) if keep.any() else None for k, v in scores.items()}
    s["num_examples"] = int(keep.sum())
    for name, labels in groups.items():
      labels = np.asarray(labels)
      for metric in ("plan_checklist_score", "plan_exact"):
        s[f"{metric}_by_{name}"] = {
            label: float(scores[metric][keep & (labels == label)].mean())
            for label in sorted(set(labels[keep].tolist()))}
    return s
  summary = means(~held_out)
  if held_out.any():
    summary["held_out_families"] = means(held_out)
  return summary


def plan_texts(setup: Setup, params, batches, sampler, seed: int = 0) -> list[list[str]]:
  """The decoded plan of every real example, per batch."""
  out = []
  for i, (arrays, info) in enumerate(batches):
    n = len(info["instruction"])
    samples = sampler(params, sharding.global_from_full(arrays, setup.batch_sharding),
                      jax.random.key(seed + i))
    out.append(setup.decode(sharding.to_host(samples.tokens)[:n],
                            sharding.to_host(samples.valid)[:n]))
  return out


def evaluate(setup: Setup, params, batches, sampler, seed: int = 0, texts=None,
             extra_scores=None):
  """(summary, [(instruction, plan, reference), ...] of the first batch). `texts` (per batch)
  skips decoding; `extra_scores` (name -> per-example array) are summarised alongside."""
  texts = plan_texts(setup, params, batches, sampler, seed) if texts is None else texts
  scores = [score_plans(t, info) for t, (_, info) in zip(texts, batches)]
  scores = {k: np.concatenate([s[k] for s in scores]) for k in scores[0]}
  scores.update(extra_scores or {})
  groups = {name: [label for _, info in batches for label in info[name]]
            for name in ("family", "task")}
  held_out = np.asarray([bool(h) for _, info in batches for h in info["held_out_family"]])
  first = list(zip(batches[0][1]["instruction"], texts[0], batches[0][1]["plan_steps"]))
  return summarize_plans(scores, groups, held_out), first


def format_samples(samples) -> str:
  return "\n\n".join(f"instruction: {i}\nplan:      {p}\nreference: {r}" for i, p, r in samples)


# ------------------------------------------------------------------------------------------
# Training loop.
# ------------------------------------------------------------------------------------------
def write_samples(writer, workdir: str, step: int, samples) -> None:
  """Validation plans beside their references, to TensorBoard and DIR/samples/."""
  writer.write_texts(step, {"plans": format_samples(samples)})
  if jax.process_index() == 0:
    os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
    with open(os.path.join(workdir, "samples", f"plans_{step:07d}.txt"), "w") as f:
      f.write(format_samples(samples) + "\n")


def start_state(setup: Setup) -> TrainState:
  """A fresh run's state: initialised, with `init_from`'s LM when it names one."""
  state = setup_lib.init_state(setup)
  if setup.config.init_from:
    state = setup_lib.with_params(state, pretrained.load_planner(
        setup.config.init_from, setup.abstract_state.params, setup.model.cfg))
  return state


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  os.makedirs(workdir, exist_ok=True)
  pretrained.copy_tokenizer(config.init_from, workdir)
  setup = make_setup(config, workdir)
  tc = config.train
  run = loop.Run(config, workdir)
  n_params = sum(x.size for x in jax.tree.leaves(setup.abstract_state.params))
  logging.info("planner: %.2fM parameters, mesh %s", n_params / 1e6, dict(setup.mesh.shape))
  cells = ("source_scene",) if tc.cell_loss_weight else ()  # the cell head's labels
  data_iter = iter(make_dataset(setup.source("train"), tc.batch_size // jax.process_count(),
                                seed=tc.seed, fields=RECORD_FIELDS + cells,
                                kinds=tc.example_kinds, worker_count=tc.worker_count))
  state = run.restore_or_init(setup.abstract_state, data_iter, lambda: start_state(setup))
  train_step = make_train_step(setup)
  sampler = make_plan_sampler(setup)
  val_batches = eval_batches(setup, "validation", tc.eval_examples, config.eval.batch_size)

  def step_fn(state, step):
    batch = sharding.global_batch(setup.examples(next(data_iter), trim=True),
                                  setup.batch_sharding)
    with jax.profiler.StepTraceAnnotation("train", step_num=step):
      state, metrics = train_step(state, batch)
    return state, metrics, None

  def validate(state, step):
    summary, samples = evaluate(setup, state.ema_params, val_batches, sampler)
    write_samples(run.writer, workdir, step, samples[:tc.sample_examples])
    return summary, None

  state, step, metrics, curve = loop.run(run, state, data_iter, step_fn,
                                         loop.Hooks(validate=validate))
  return {"step": step, "curve": curve,
          "final_loss": None if metrics is None else float(metrics["loss"])}


def run_eval(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Scores the latest checkpoint's plans on `eval.split`; writes DIR/eval/metrics.json."""
  setup = make_setup(config, workdir)
  step, state = checkpoint.restore_latest(workdir, config.train.keep_checkpoints,
                                        setup.abstract_state)
  params = state.ema_params if config.eval.use_ema else state.params
  ec = config.eval
  start = time.time()
  out = os.path.join(workdir, "eval")
  os.makedirs(out, exist_ok=True)
  batches = eval_batches(setup, ec.split, ec.num_examples, ec.batch_size)
  texts = plan_texts(setup, params, batches, make_plan_sampler(setup))
  from jaxedit import inference  # here: it imports the trainers

  editor = inference.load_editor(config.editor, ec.batch_size) if config.editor else None
  extra = {**e2e_scores(config, batches, texts, out, editor),
           **reference_plan_scores(config, batches, out, editor),
           **baseline_scores(config, batches, out)}
  summary, samples = evaluate(setup, params, batches, None, texts=texts, extra_scores=extra)
  summary.update({"split": ec.split, "step": step, "editor": config.editor,
                  "baseline_editor": ec.baseline_editor,
                  "eval_seconds": round(time.time() - start, 1)})
  evaluation.write_metrics(os.path.join(out, "metrics.json"), summary)
  with open(os.path.join(out, "plans.txt"), "w") as f:
    f.write(format_samples(samples) + "\n")
  print(json.dumps(summary, indent=1), flush=True)
  return summary


def e2e_scores(config: ml_collections.ConfigDict, batches, texts, out: str, editor=None,
               name: str = "e2e") -> dict:
  """Per example: `e2e_success` (the plan run step by step by the editor of `config.editor`,
  the final image strictly meets the checklist) and `e2e_runs` (the plan could be run).
  The k-th steps of all plans are edited together. Writes a grid of the first examples to
  `out/{name}.png`; {} without an editor."""
  from jaxedit import inference  # here: it imports the trainers

  if not config.editor:
    return {}
  ec = config.eval
  editor = editor or inference.load_editor(config.editor, ec.batch_size)
  texts = [t for batch_texts in texts for t in batch_texts]
  info = {k: [v for _, i in batches for v in i[k]] for k in ("instruction", "checklist")}
  images = np.concatenate([a["source_image"][:len(i["instruction"])] for a, i in batches])
  steps, trails = inference.run_plan_texts(editor, images, texts, ec.e2e_max_steps, ec.seed)
  runs = np.asarray([s is not None for s in steps], np.float32)
  success = runs * inference.strict_success(np.stack([t[-1] for t in trails]),
                                            info["checklist"], editor.setup.world)
  captions = [[i, p, "success" if ok else "failed"]
              for i, p, ok in zip(info["instruction"], texts, success)]
  inference.trail_grid(trails, captions).save(os.path.join(out, f"{name}.png"))
  return {"e2e_success": success, "e2e_runs": runs}


def reference_plan_scores(config: ml_collections.ConfigDict, batches, out: str,
                          editor=None) -> dict:
  """With `eval.e2e_reference_plans`, per example `e2e_success_reference_plans`: the
  ground-truth plans run by the same editor, the most any planner can reach with it."""
  if not (config.editor and config.eval.e2e_reference_plans):
    return {}
  texts = [list(info["plan_steps"]) for _, info in batches]
  scores = e2e_scores(config, batches, texts, out, editor, "e2e_reference_plans")
  return {"e2e_success_reference_plans": scores["e2e_success"]}


def baseline_scores(config: ml_collections.ConfigDict, batches, out: str) -> dict:
  """Per example `single_step_baseline_success`: the editor of `eval.baseline_editor` given
  the abstract instruction, in one step. Writes a grid of the first batch; {} without one."""
  from jaxedit import inference

  ec = config.eval
  if not ec.baseline_editor:
    return {}
  baseline = inference.load_editor(ec.baseline_editor, ec.batch_size)
  for _, info in batches:
    for instruction in info["instruction"]:
      if not baseline.fits(instruction):
        raise ConfigError(f"eval.baseline_editor: {instruction!r} does not fit its "
                          f"model.text_max_len {baseline.setup.text_len}; train the baseline "
                          "with room for abstract instructions")
  success = []
  for b, (arrays, info) in enumerate(batches):
    images = arrays["source_image"][:len(info["instruction"])]
    edited = baseline(images, info["instruction"], seed=ec.seed + b)
    success.append(inference.strict_success(edited, info["checklist"], baseline.setup.world))
    if b == 0:
      captions = [[i, "success" if ok else "failed"]
                  for i, ok in zip(info["instruction"], success[0])]
      inference.trail_grid([[s, e] for s, e in zip(images, edited)], captions).save(
          os.path.join(out, "single_step_baseline.png"))
  return {"single_step_baseline_success": np.concatenate(success)}
