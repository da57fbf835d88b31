"""Planner SFT: next-token prediction of the reference plan, given the source image and the
instruction.

    jaxedit train --config configs/shapes_planner_sft.py --workdir DIR
    jaxedit eval  --config configs/shapes_planner_sft.py --workdir DIR

A training sequence is laid out as the sampler lays out a rollout: [image prefix] [prompt,
left-padded] [plan JSON + EOS, right-padded]; the loss is the mean cross-entropy over the
plan tokens.
"""

from __future__ import annotations

import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxedit import (checkpoint, evaluation, hparams, lora, plan_then_edit, planning,
                     sharding, workdirs)
from jaxedit.data.pipeline import make_dataset
from jaxedit.interop import pretrained
from jaxedit.models.planner import Planner
from jaxedit.train import loop, setup as setup_lib
from jaxedit.train.setup import TrainState


# ------------------------------------------------------------------------------------------
# The train step.
# ------------------------------------------------------------------------------------------
make_setup = planning.make_setup  # a planner SFT run's setup is the planner's own


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


def loss_fn(params, model: Planner, batch: dict, cell_loss_weight: float = 0.0, base=None):
  """Mean plan-token cross-entropy, plus `cell_loss_weight` x the cell head's loss; `params`
  are the trained ones (LoRA: the adapters and the vision prefix, over `base`)."""
  with_cells = cell_loss_weight > 0
  out = planning.completion_logits(lora.whole(params, base), model, batch,
                                   with_cells=with_cells)
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


CAPTION_REQUEST = "describe the scene"


def with_captions(records: dict, fraction: float) -> dict:
  """`records` with the first `fraction` of its rows turned into captioning examples: the
  request CAPTION_REQUEST answered by the scene description. A training aid for a vision
  prefix in front of a pretrained LM: the LM learns to put what the prefix shows into words
  (the plan names objects by colour, shape and cell). Rows are shuffled already, so the first
  ones are a random choice; the same batch always gets the same rows (exact resume)."""
  n = round(fraction * len(records["instruction"]))
  if not n:
    return records
  out = dict(records)
  out["instruction"] = np.asarray([CAPTION_REQUEST] * n + list(records["instruction"][n:]),
                                  dtype=object)
  out["plan_steps"] = np.asarray(list(records["scene_text"][:n]) + list(records["plan_steps"][n:]),
                                 dtype=object)
  return out


def make_train_step(setup: planning.Setup):
  cfg = setup.config

  def step_fn(state: TrainState, batch: dict, hp: dict):
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, setup.model, batch, cfg.train.cell_loss_weight, state.base)
    params, ema, opt_state, rate = setup.optimizer.update(
        hp, state.params, state.ema_params, state.opt_state, grads, state.step)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": rate, **aux}
    return state.replace(step=state.step + 1, params=params, ema_params=ema,
                         opt_state=opt_state), metrics

  step = jax.jit(step_fn, in_shardings=(setup.state_shardings, setup.batch_sharding, None),
                 out_shardings=(setup.state_shardings, sharding.replicated(setup.mesh)),
                 donate_argnums=0)
  return sharding.Program(step, setup.mesh, setup.rules,
                          hparams=hparams.values(cfg, hparams.SFT))


# ------------------------------------------------------------------------------------------
# Training loop.
# ------------------------------------------------------------------------------------------
def start_state(setup: planning.Setup) -> TrainState:
  """A fresh run's state: initialised, with `init_from`'s LM when it names one (under LoRA,
  as the frozen base)."""
  state = setup_lib.init_state(setup)
  if setup.config.init_from:
    loaded = pretrained.load_planner(setup.config.init_from, planning.abstract_whole(setup),
                                     setup.model.cfg)
    if state.base is not None:
      state = state.replace(base={**state.base, "lm": loaded.pop("lm")})
    state = setup_lib.with_params(state, loaded)
  return state


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  os.makedirs(workdir, exist_ok=True)
  pretrained.copy_tokenizer(config.init_from, workdir)
  setup = make_setup(config, workdir)
  config = setup.config  # architecture keys resolved from init_from
  tc = config.train
  run = loop.Run(config, workdir)
  n_params = sum(x.size for x in jax.tree.leaves(setup.abstract_state.params))
  logging.info("planner: %.2fM parameters, mesh %s", n_params / 1e6, dict(setup.mesh.shape))
  cells = ("source_scene",) if tc.cell_loss_weight else ()  # the cell head's labels
  data_iter = iter(make_dataset(setup.source("train"), tc.batch_size // jax.process_count(),
                                seed=tc.seed, fields=planning.RECORD_FIELDS + cells,
                                kinds=tc.example_kinds, worker_count=tc.worker_count))
  state = run.restore_or_init(setup.abstract_state, data_iter, lambda: start_state(setup))
  train_step = make_train_step(setup)
  sampler = planning.make_plan_sampler(setup)
  val_batches = planning.eval_batches(setup, "validation", tc.eval_examples, config.eval.batch_size)

  def step_fn(state, step):
    records = with_captions(next(data_iter), tc.caption_fraction)
    batch = sharding.global_batch(setup.examples(records, trim=True), setup.batch_sharding)
    with jax.profiler.StepTraceAnnotation("train", step_num=step):
      state, metrics = train_step(state, batch)
    return state, metrics, None

  def validate(state, step):
    summary, samples = planning.evaluate(setup, lora.whole(state.ema_params, state.base),
                                         val_batches, sampler)
    planning.write_samples(run.writer, workdir, step, samples[:tc.sample_examples])
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
  params = lora.whole(state.ema_params if config.eval.use_ema else state.params, state.base)
  ec = config.eval
  start = time.time()
  out = os.path.join(workdir, "eval")
  os.makedirs(out, exist_ok=True)
  batches = planning.eval_batches(setup, ec.split, ec.num_examples, ec.batch_size)
  texts = planning.plan_texts(setup, params, batches, planning.make_plan_sampler(setup))
  editor = workdirs.load_editor(config.editor, ec.batch_size) if config.editor else None
  extra = {**plan_then_edit.e2e_scores(config, batches, texts, out, editor),
           **plan_then_edit.reference_plan_scores(config, batches, out, editor),
           **plan_then_edit.baseline_scores(config, batches, out)}
  summary, samples = planning.evaluate(setup, params, batches, None, texts=texts, extra_scores=extra)
  summary.update({"split": ec.split, "step": step, "editor": config.editor,
                  "baseline_editor": ec.baseline_editor,
                  "eval_seconds": round(time.time() - start, 1)})
  evaluation.write_metrics(os.path.join(out, "metrics.json"), summary)
  with open(os.path.join(out, "plans.txt"), "w") as f:
    f.write(planning.format_samples(samples) + "\n")
  print(json.dumps(summary, indent=1), flush=True)
  return summary
