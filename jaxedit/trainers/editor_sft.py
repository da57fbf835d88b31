"""Editor SFT: flow matching on (source image, instruction) -> target image.

    jaxedit train --config configs/shapes_editor_sft.py --workdir DIR
    jaxedit eval  --config configs/shapes_editor_sft.py --workdir DIR
"""

from __future__ import annotations

import json
import logging
import os
import time

import jax
import ml_collections
import optax

from jaxedit import checkpoint, editing, evaluation, flow, flux_editing, hparams, population
from jaxedit import lora, sharding
from jaxedit.codec import Codec
from jaxedit.config import ConfigError
from jaxedit.data import edit_records, job as data_job
from jaxedit.data.pipeline import make_dataset
from jaxedit.editing import Setup, text_inputs
from jaxedit.interop import pretrained
from jaxedit.models.editor import Editor
from jaxedit.train import loop, records, setup as setup_lib


def check_config(config: ml_collections.ConfigDict) -> None:
  data_job.check_data_config(config.data)
  for key in ("num_steps", "batch_size", "log_every"):
    if config.train[key] <= 0:
      raise ConfigError(f"config key 'train.{key}' must be > 0")
  if config.flow.changed_weight <= 0:
    raise ConfigError("config key 'flow.changed_weight' must be > 0")
  # Runs saved before grounding have neither key: no grid.
  if config.model.text_layout_grid and config.flow.grounding_weight <= 0:
    raise ConfigError("config key 'flow.grounding_weight' must be > 0 with "
                      "model.text_layout_grid set: only that loss trains the grounding head")

def make_setup(config: ml_collections.ConfigDict, workdir: str, devices=None) -> Setup:
  if flux_editing.on_records(config):
    return flux_editing.make_setup(config, workdir, devices)
  check_config(config)
  return editing.make_setup(config, workdir, devices)


def loss_fn(params, model: Editor, batch: dict, rng, flow_cfg, text_dropout: float,
            codec: Codec = Codec()):
  """(loss, parts): the SFT flow loss in `codec`'s space (pixels or VAE latents), plus the
  grounding loss where the editor grounds instructions (model.text_layout_grid), over the
  examples whose text was kept. Which patches and cells an edit changes is read from the
  pixels."""
  r_t, r_eps, r_drop = jax.random.split(rng, 3)
  x0 = codec.encode(batch["target_image"])
  source = codec.encode(batch["source_image"])
  t = flow.sample_time(r_t, x0.shape[0], kind=flow_cfg.timesteps, mean=flow_cfg.logit_mean,
                       std=flow_cfg.logit_std, shift=flow_cfg.shift)
  eps = jax.random.normal(r_eps, x0.shape)
  keep = jax.random.uniform(r_drop, (x0.shape[0],)) >= text_dropout
  v, cell_logits = model.apply({"params": params}, flow.interpolate(x0, eps, t), t, source,
                               text_inputs(batch, keep), with_cell_logits=True)
  weights = None
  if flow_cfg.changed_weight != 1.0:
    weights = flow.changed_patch_weights(batch["source_image"], batch["target_image"],
                                         model.cfg.grid, model.cfg.patch_size,
                                         flow_cfg.changed_weight)
  parts = {"flow_loss": flow.sft_loss(v, x0, eps, weights)}
  loss = parts["flow_loss"]
  if cell_logits is not None:
    parts["grounding_loss"] = flow.grounding_loss(cell_logits, batch["source_image"],
                                                  batch["target_image"], keep)
    loss = loss + flow_cfg.grounding_weight * parts["grounding_loss"]
  return loss, parts


def train_step_fn(setup: Setup):
  """The (unjitted) step (codec, state, batch, hp) -> (state, metrics); `hp`: traced
  hparams."""
  cfg = setup.config
  base_rng = jax.random.key(cfg.train.seed)

  def step_fn(codec: Codec, state: setup_lib.TrainState, batch: dict, hp: dict):
    rng = jax.random.fold_in(base_rng, state.step)
    (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, setup.model, batch, rng, cfg.flow, cfg.train.text_dropout, codec)
    params, ema, opt_state, rate = setup.optimizer.update(
        hp, state.params, state.ema_params, state.opt_state, grads, state.step)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": rate, **parts}
    return setup_lib.TrainState(state.step + 1, params, ema, opt_state), metrics
  return step_fn


def make_train_step(setup: Setup):
  cfg = setup.config
  replicated = sharding.replicated(setup.mesh)
  step = jax.jit(train_step_fn(setup),
                 in_shardings=(replicated, setup.state_shardings, setup.batch_sharding, None),
                 out_shardings=(setup.state_shardings, replicated), donate_argnums=1)
  return sharding.Program(step, setup.mesh, setup.rules, (setup.codec,),
                          hparams.values(cfg, hparams.SFT))


def train_data(setup: Setup):
  """This process's share of the training batches (source, target, tokenized instruction)."""
  tc = setup.config.train
  return make_dataset(setup.source("train"), tc.batch_size // jax.process_count(),
                      seed=tc.seed, fields=editing.IMAGE_FIELDS + ("instruction",),
                      kinds=tc.example_kinds, map_fn=setup.tokenize,
                      worker_count=tc.worker_count)


def start_state(setup: Setup) -> setup_lib.TrainState:
  """A fresh run's state: initialised, with `init_from`'s transformer when it names one (the
  frozen base under LoRA)."""
  state = setup_lib.init_state(setup)
  if not setup.config.init_from:
    return state
  if state.base is not None:
    return state.replace(base={**state.base, **pretrained.load_editor(
        setup.config.init_from, setup.abstract_state.base, setup.model.cfg)})
  return setup_lib.with_params(state, pretrained.load_editor(
      setup.config.init_from, setup.abstract_state.params, setup.model.cfg))


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  if flux_editing.on_records(config):
    return train_on_records(config, workdir)
  if config.get("population"):
    return train_population(config, workdir)
  os.makedirs(workdir, exist_ok=True)
  pretrained.copy_tokenizer(config.init_from, workdir)
  setup = make_setup(config, workdir)
  tc = config.train
  run = loop.Run(config, workdir)
  n_params = sum(x.size for x in jax.tree.leaves(setup.abstract_state.params))
  logging.info("editor: %.2fM parameters, mesh %s", n_params / 1e6, dict(setup.mesh.shape))
  data_iter = iter(train_data(setup))
  state = run.restore_or_init(setup.abstract_state, data_iter, lambda: start_state(setup))
  train_step = make_train_step(setup)
  sampler = editing.config_sampler(setup)
  val_batches = editing.eval_batches(setup, "validation", tc.example_kinds, tc.eval_examples,
                                     config.eval.batch_size)

  def step_fn(state, step):
    batch = sharding.global_batch(next(data_iter), setup.batch_sharding)
    with jax.profiler.StepTraceAnnotation("train", step_num=step):
      state, metrics = train_step(state, batch)
    return state, metrics, None

  def validate(state, step):
    return editing.evaluate(setup, state.ema_params, val_batches, sampler, seed=10_000)

  def samples(state, step, first):
    if first is None:  # the first validation batch's edits, when validation ran
      _, first = editing.evaluate(setup, state.ema_params, val_batches[:1], sampler, seed=10_000)
    editing.write_grid(run.writer, workdir, step, first, tc.sample_examples)

  state, step, metrics, curve = loop.run(run, state, data_iter, step_fn,
                                         loop.Hooks(validate=validate, samples=samples))
  return {"step": step, "curve": curve,
          "final_loss": None if metrics is None else float(metrics["loss"])}


def records_step_fn(setup: flux_editing.RecordsSetup):
  """The (unjitted) SFT step on model inputs (cached or just encoded)."""
  cfg = setup.config
  base_rng = jax.random.key(cfg.train.seed)

  def step_fn(state: setup_lib.TrainState, inputs: dict, hp: dict):
    rng = jax.random.fold_in(base_rng, state.step)
    loss, grads = jax.value_and_grad(lambda p: flux_editing.sft_loss(
        lora.whole(p, state.base), setup.model, inputs, rng, cfg.flow,
        setup.guidance))(state.params)
    params, ema, opt_state, rate = setup.optimizer.update(
        hp, state.params, state.ema_params, state.opt_state, grads, state.step)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": rate}
    return state.replace(step=state.step + 1, params=params, ema_params=ema,
                         opt_state=opt_state), metrics
  return step_fn


def make_records_step(setup: flux_editing.RecordsSetup):
  step = jax.jit(records_step_fn(setup),
                 in_shardings=(setup.state_shardings, setup.batch_sharding, None),
                 out_shardings=(setup.state_shardings, sharding.replicated(setup.mesh)),
                 donate_argnums=0)
  return sharding.Program(step, setup.mesh, setup.rules, (),
                          hparams.values(setup.config, hparams.SFT))


def check_records_config(setup: flux_editing.RecordsSetup) -> None:
  train_split = setup.records.manifest["splits"]["train"]
  if train_split["with_target"] < train_split["records"]:
    raise ConfigError(f"editor SFT learns from target images: only {train_split['with_target']}"
                      f" of the {train_split['records']} training records in "
                      f"{setup.records.root} have one (rows without targets: configs/"
                      "flux_kontext_rft.py fine-tunes on a judge's best samples instead)")
  for key in ("num_steps", "batch_size", "log_every"):
    if setup.config.train[key] <= 0:
      raise ConfigError(f"config key 'train.{key}' must be > 0")
  if setup.config.train.text_dropout:
    raise ConfigError("train.text_dropout needs the shapes text encoder; FLUX models are "
                      "guidance-distilled and sample without an unconditional branch")


def train_on_records(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """SFT on edit records (a lab's own data) with FLUX conditioning."""
  setup = flux_editing.make_setup(config, workdir)
  check_records_config(setup)
  config, tc = setup.config, setup.config.train
  run = loop.Run(config, workdir)
  n_params = sum(x.size for x in jax.tree.leaves(setup.abstract_state.params))
  logging.info("editor: %.2fM parameters, mesh %s, records %s (%s)", n_params / 1e6,
               dict(setup.mesh.shape), setup.records.root,
               "cached encodings" if setup.cached else "encoded each step")
  data_iter = iter(edit_records.train_batches(
      setup.records, "train", tc.batch_size // jax.process_count(), seed=tc.seed))
  state = run.restore_or_init(setup.abstract_state, data_iter, lambda: start_state(setup))
  train_step = make_records_step(setup)
  split = config.eval.split if config.eval.split in setup.records.splits else "train"
  val_batches = flux_editing.eval_batches(setup, split, tc.eval_examples,
                                          config.eval.batch_size)
  sampler = flux_editing.make_sampler(setup, config.sample.num_steps)
  val_loss = flux_editing.make_val_loss(setup)

  def step_fn(state, step):
    inputs = sharding.global_batch(setup.model_inputs(next(data_iter)), setup.batch_sharding)
    with jax.profiler.StepTraceAnnotation("train", step_num=step):
      state, metrics = train_step(state, inputs)
    return state, metrics, None

  def validate(state, step):
    return flux_editing.evaluate(setup, lora.whole(state.ema_params, state.base),
                                 val_batches, sampler, seed=10_000, val_loss=val_loss)

  def samples(state, step, first):
    if first is None:
      _, first = flux_editing.evaluate(setup, lora.whole(state.ema_params, state.base),
                                       val_batches[:1], sampler, seed=10_000)
    records.write_image(run.writer, workdir, step, "samples", "step",
                        evaluation.edit_grid(*first, limit=tc.sample_examples))

  state, step, metrics, curve = loop.run(run, state, data_iter, step_fn,
                                         loop.Hooks(validate=validate, samples=samples))
  return {"step": step, "curve": curve,
          "final_loss": None if metrics is None else float(metrics["loss"])}


def train_population(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """K settings of the traced hyperparameters trained at once (`jaxedit.population`), each
  member logged in DIR/member_K; every member's final validation in DIR/population.json."""
  from clu import metric_writers  # imports TensorFlow: only when training

  points = population.members(config)
  k = len(points)
  os.makedirs(workdir, exist_ok=True)
  pretrained.copy_tokenizer(config.init_from, workdir)
  setup = make_setup(config, workdir)
  tc = config.train
  hp = population.member_hparams(config, points)
  dirs = [os.path.join(workdir, f"member_{i}") for i in range(k)]
  writers = [metric_writers.create_default_writer(d, just_logging=jax.process_index() > 0)
             for d in dirs]
  # Each member's log picks its entry of the (K,) metrics.
  logs = [records.MetricsLog(w, d, lambda values, i=i: {n: float(v[i])
                                                        for n, v in values.items()})
          for i, (w, d) in enumerate(zip(writers, dirs))]
  logging.info("population of %d: %s", k, points)
  run = loop.Run(config, workdir, writer=writers[0])
  data_iter = iter(train_data(setup))
  state = run.restore_or_init(population.abstract_state(setup, k), data_iter,
                              lambda: population.replicate_members(start_state(setup), k, setup))
  step_members = population.make_step(setup, train_step_fn(setup))

  def step_fn(state, step):
    batch = sharding.global_batch(next(data_iter), setup.batch_sharding)
    state, metrics = step_members(state, batch, hp)
    return state, metrics, None

  try:
    state, step, _, _ = loop.run(run, state, data_iter, step_fn, logs=logs)
  finally:
    for w in writers[1:]:
      w.flush()
  if tc.eval_every < 0:
    return {"step": step, "members": [{"member": i, "settings": p} for i, p in enumerate(points)]}
  sampler = editing.config_sampler(setup)
  val = editing.eval_batches(setup, "validation", tc.example_kinds, tc.eval_examples,
                             config.eval.batch_size)
  summary = []
  for i, p in enumerate(points):
    params = population.member(state.ema_params, i, setup.state_shardings.ema_params)
    scores, _ = editing.evaluate(setup, params, val, sampler, seed=10_000)
    summary.append({"member": i, "settings": p, "step": step, **scores})
    writers[i].write_scalars(step, records.scalars(scores, "val"))
  if jax.process_index() == 0:
    evaluation.write_metrics(os.path.join(workdir, "population.json"), summary)
  for row in summary:
    logging.info("member %d %s: edit_success %.3f, checklist_score %.3f", row["member"],
                 row["settings"], row["edit_success"], row["checklist_score"])
  return {"step": step, "members": summary}


def write_eval(workdir: str, summary: dict, first) -> dict:
  """DIR/eval/metrics.json and DIR/eval/edits.png (the first batch's edits); prints them."""
  out = os.path.join(workdir, "eval")
  os.makedirs(out, exist_ok=True)
  evaluation.write_metrics(os.path.join(out, "metrics.json"), summary)
  evaluation.edit_grid(*first).save(os.path.join(out, "edits.png"))
  print(json.dumps(summary, indent=1), flush=True)
  return summary


def eval_on_records(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """The latest checkpoint on edit records: validation flow loss (rows with targets), sampled
  edits as a grid; DIR/eval/metrics.json."""
  setup = flux_editing.make_setup(config, workdir)
  config, ec = setup.config, setup.config.eval
  step, state = checkpoint.restore_latest(workdir, config.train.keep_checkpoints,
                                          setup.abstract_state)
  params = lora.whole(state.ema_params if ec.use_ema else state.params, state.base)
  split = ec.split if ec.split in setup.records.splits else "train"
  batches = flux_editing.eval_batches(setup, split, ec.num_examples, ec.batch_size)
  start = time.time()
  sampler = flux_editing.make_sampler(setup, config.sample.num_steps)
  summary, first = flux_editing.evaluate(setup, params, batches, sampler, seed=ec.seed,
                                         val_loss=flux_editing.make_val_loss(setup))
  summary.update({"split": split, "step": step, "eval_seconds": round(time.time() - start, 1)})
  return write_eval(workdir, summary, first)


def run_eval(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Scores the latest checkpoint on `eval.split`; writes DIR/eval/metrics.json and a grid."""
  if flux_editing.on_records(config):
    return eval_on_records(config, workdir)
  setup = make_setup(config, workdir)
  step, state = checkpoint.restore_latest(workdir, config.train.keep_checkpoints,
                                        setup.abstract_state)
  params = state.ema_params if config.eval.use_ema else state.params
  ec = config.eval
  batches = editing.eval_batches(setup, ec.split, ec.example_kinds, ec.num_examples,
                                 ec.batch_size)
  start = time.time()
  summary, first = editing.evaluate(setup, params, batches, editing.config_sampler(setup), seed=ec.seed)
  summary.update({"split": ec.split, "example_kinds": list(ec.example_kinds), "step": step,
                  "eval_seconds": round(time.time() - start, 1)})
  return write_eval(workdir, summary, first)
