"""Editor SFT: flow matching on (source image, instruction) -> target image.

    jaxedit train --config configs/shapes_editor_sft.py --workdir DIR
    jaxedit eval  --config configs/shapes_editor_sft.py --workdir DIR
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxedit import checkpoint, distributed, evaluation, flow, hparams, sharding
from jaxedit import codec as codec_lib
from jaxedit.codec import Codec
from jaxedit import rewards as rewards_lib
from jaxedit.config import ConfigError
from jaxedit.data import job as data_job
from jaxedit.data.pipeline import ShapesSource, make_dataset
from jaxedit.interop import pretrained
from jaxedit.models import editor as editor_model
from jaxedit.models.editor import Editor, EditorConfig, editor_config, model_config
from jaxedit.text import tokenizer as tokenizer_lib

IMAGE_FIELDS = ("source_image", "target_image")
EVAL_INFO = ("instruction", "checklist", "family", "task")
EVAL_SCENES = ("source_scene", "target_scene")


def reference_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.trainer = "editor_sft"
  c.init_from = ""  # optional: a diffusers Flux transformer folder (or a jaxedit export)
  # JSON list of settings of traced hyperparameters (train.lr) trained at once: population.py
  c.population = ""
  c.world = data_job.world_config()
  c.data = data_job.data_config()
  c.tokenizer = ml_collections.ConfigDict({"vocab_size": 512, "corpus_examples": 4000})
  c.model = model_config()
  c.flow = ml_collections.ConfigDict({
      "timesteps": "logit_normal", "logit_mean": 0.0, "logit_std": 1.0, "shift": 1.0,
      "changed_weight": 1.0,  # loss weight of the patches the edit changes (1: plain mean)
      # weight of the grounding loss (flow.grounding_loss) when model.text_layout_grid > 0
      "grounding_weight": 1.0})
  c.sample = ml_collections.ConfigDict({"num_steps": 16, "shift": 1.0, "guidance_scale": 1.0})
  c.train = ml_collections.ConfigDict({
      "seed": 0,
      "batch_size": 64,  # global
      "num_steps": 1000,
      "example_kinds": ("atomic",),
      "lr": 1e-3,
      "warmup_steps": 100,
      "end_lr_fraction": 0.05,
      "weight_decay": 0.0,
      "b1": 0.9,
      "b2": 0.99,
      "grad_clip": 1.0,
      "ema_decay": 0.999,
      "text_dropout": 0.0,  # > 0 trains the unconditional branch for guidance
      "log_every": 20,
      "sample_every": 500,  # as eval_every
      "sample_examples": 16,
      "eval_every": 500,  # and at the end; 0: only at the end; -1: never
      "eval_examples": 256,  # validation examples scored during training
      "checkpoint_every": 500,
      "keep_checkpoints": 2,
      "async_checkpoints": True,
      "worker_count": 0,
  })
  c.eval = ml_collections.ConfigDict({
      "split": "test", "example_kinds": ("atomic",), "num_examples": 0,  # 0: the whole split
      "batch_size": 128, "use_ema": True, "seed": 1})
  c.mesh = sharding.mesh_config()
  c.distributed = distributed.config()
  return c


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any


# ------------------------------------------------------------------------------------------
# Setup: everything that depends only on the config, shared by train and eval.
# ------------------------------------------------------------------------------------------
@dataclasses.dataclass
class RunSetup:
  """What a trainer builds from its config before any work: shared by train and eval of
  every trainer (each subclasses it with its model's helpers)."""

  config: ml_collections.ConfigDict
  world: Any
  tokenizer: Any
  model: Any
  mesh: jax.sharding.Mesh
  rules: tuple
  tx: optax.GradientTransformation
  schedule: Any
  init: Any  # rng -> boxed TrainState
  state_shardings: Any
  abstract_state: Any
  batch_sharding: jax.sharding.NamedSharding

  @property
  def param_shardings(self):
    return self.state_shardings.params

  @functools.cached_property
  def dataset_dir(self) -> str:
    """Built (TFDS) on first use, so inference from a workdir never builds data."""
    return data_job.dataset_dir(self.world, self.config.data)

  def source(self, split: str) -> ShapesSource:
    return ShapesSource(self.dataset_dir, split, self.world)


@dataclasses.dataclass
class Setup(RunSetup):
  model: Editor

  @property
  def text_len(self) -> int:
    return self.config.model.text_max_len

  @functools.cached_property
  def codec(self) -> Codec:
    """Pixels <-> the model's input space; a VAE's weights are read on first use (setups
    that only size a run never read them; a dry run sets an abstract codec)."""
    return codec_lib.make_codec(self.config, self.mesh)

  def tokenize(self, record: dict) -> dict:
    ids, mask = tokenizer_lib.encode(self.tokenizer, [record.pop("instruction")], self.text_len)
    record["ids"], record["mask"] = ids[0], mask[0]
    return record


def check_config(config: ml_collections.ConfigDict) -> None:
  data_job.check_data_config(config.data)
  for key in ("num_steps", "batch_size", "log_every"):
    if config.train[key] <= 0:
      raise ConfigError(f"config key 'train.{key}' must be > 0")
  if config.flow.changed_weight <= 0:
    raise ConfigError("config key 'flow.changed_weight' must be > 0")
  # Runs saved before grounding have neither key: no grid.
  if config.model.get("text_layout_grid", 0) and config.flow.grounding_weight <= 0:
    raise ConfigError("config key 'flow.grounding_weight' must be > 0 with "
                      "model.text_layout_grid set: only that loss trains the grounding head")


def make_model_and_mesh(config: ml_collections.ConfigDict, workdir: str, devices=None):
  """What every editor trainer builds first: (world, tokenizer, model, mesh, logical rules,
  batch sharding). The tokenizer is loaded from DIR/tokenizer.json, or trained and saved."""
  if config.model.text_encoder != "shapes":
    raise ConfigError("the shapes dataset carries instructions, not embeddings: "
                      "model.text_encoder must be 'shapes' for this trainer")
  world = data_job.world_from(config)
  tok = tokenizer_lib.load_or_train(os.path.join(workdir, "tokenizer.json"), world,
                                    config.tokenizer.vocab_size,
                                    config.tokenizer.corpus_examples, config.data.seed)
  try:
    model = Editor(editor_config(config.model, world.image_size, tok.get_vocab_size()))
  except ValueError as e:
    raise ConfigError(str(e)) from None
  try:
    mesh = sharding.mesh_from_config(config.mesh, devices)
  except ValueError as e:
    raise ConfigError(f"config mesh: {e}") from None
  rules = sharding.rules(config.mesh)
  return world, tok, model, mesh, rules, sharding.batch_sharding(mesh, rules)


def check_batch_size(name: str, size: int, mesh, batch_sharding) -> None:
  """Global batch sizes must split evenly over the data-parallel devices and processes."""
  parallel = int(np.prod([mesh.shape[a] for a in _axes(batch_sharding.spec)]))
  if size % parallel or size % jax.process_count():
    raise ConfigError(f"{name} = {size} must divide over the {parallel} data-parallel "
                      f"devices and {jax.process_count()} processes")


def make_optimizer(tc: ml_collections.ConfigDict):
  """(AdamW with global-norm clipping at unit learning rate, the warm-up + cosine schedule
  of the rate relative to its peak) from the `train` section. The peak, `train.lr`, is a
  traced input of the step (`hparams`, `apply_at_rate`)."""
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, 1.0, tc.warmup_steps, max(tc.num_steps, tc.warmup_steps + 1),
      end_value=tc.end_lr_fraction)
  tx = optax.chain(optax.clip_by_global_norm(tc.grad_clip),
                   optax.adamw(1.0, b1=tc.b1, b2=tc.b2, weight_decay=tc.weight_decay))
  return tx, schedule


def apply_at_rate(params, updates, rate):
  """Parameters after a unit-rate optimizer's `updates` scaled by the (traced) rate: the
  same arithmetic as optax's AdamW at that rate."""
  return optax.apply_updates(params, jax.tree.map(lambda u: (u * rate).astype(u.dtype),
                                                  updates))


def make_setup(config: ml_collections.ConfigDict, workdir: str, devices=None) -> Setup:
  check_config(config)
  parts = make_model_and_mesh(config, workdir, devices)
  return assemble_setup(Setup, config, parts, functools.partial(
      _init_state, text_len=config.model.text_max_len))


def assemble_setup(cls, config: ml_collections.ConfigDict, parts, init_state_fn) -> RunSetup:
  """A supervised trainer's `cls` (a RunSetup) from (world, tokenizer, model, mesh, rules,
  batch sharding): batch sizes checked, the optimizer, and the state's shardings from
  eval_shape of `init_state_fn(rng, model=, tx=)`, so nothing is allocated."""
  world, tok, model, mesh, rules, batch_sharding = parts
  for key in ("train.batch_size", "eval.batch_size"):
    section, name = key.split(".")
    check_batch_size(f"config key {key!r}", config[section][name], mesh, batch_sharding)
  tx, schedule = make_optimizer(config.train)
  init = functools.partial(init_state_fn, model=model, tx=tx)
  boxed = jax.eval_shape(init, jax.random.key(0))
  state_shardings = sharding.logical_shardings(boxed, mesh, rules)
  abstract_state = checkpoint.abstract_like(nn.unbox(boxed), state_shardings)
  return cls(config, world, tok, model, mesh, rules, tx, schedule, init, state_shardings,
             abstract_state, batch_sharding)


def _axes(spec) -> set[str]:
  names = set()
  for entry in spec:
    names.update(entry if isinstance(entry, tuple) else [entry] if entry else [])
  return names


def dummy_inputs(cfg: EditorConfig, text_len: int, batch: int = 1):
  """(x_t, t, source, text, guidance) of the editor's shapes, for init and eval_shape."""
  img = jnp.zeros((batch, cfg.image_size, cfg.image_size, cfg.channels), jnp.float32)
  if cfg.text is None:
    text = {"context": jnp.zeros((batch, text_len, cfg.flux.joint_attention_dim)),
            "pooled": jnp.zeros((batch, cfg.flux.pooled_projection_dim))}
  else:
    text = {"ids": jnp.zeros((batch, text_len), jnp.int32),
            "mask": jnp.ones((batch, text_len), bool)}
  guidance = jnp.ones((batch,)) if cfg.flux.guidance_embeds else None
  return img, jnp.zeros((batch,)), img, text, guidance


def _init_state(rng, *, model, tx, text_len) -> TrainState:
  params = editor_model.init_params(model, rng, *dummy_inputs(model.cfg, text_len))
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                    opt_state=tx.init(params))


def with_params(state: TrainState, loaded: dict) -> TrainState:
  """`state` with the top-level modules in `loaded` (e.g. a pretrained transformer) as both
  params and EMA; the rest keeps its initialisation."""
  params = {**state.params, **loaded}
  return state.replace(params=params, ema_params=jax.tree.map(lambda x: x.copy(), params))


def init_state(setup: RunSetup) -> TrainState:
  fn = jax.jit(lambda rng: nn.unbox(setup.init(rng)), out_shardings=setup.state_shardings)
  return sharding.in_context(fn, setup.mesh, setup.rules)(jax.random.key(setup.config.train.seed))


# ------------------------------------------------------------------------------------------
# The train step and the sampler.
# ------------------------------------------------------------------------------------------
def text_inputs(batch: dict, keep=None) -> dict:
  """Token ids and mask; where `keep` is False the prompt is emptied (unconditional)."""
  if keep is None:
    return {"ids": batch["ids"], "mask": batch["mask"]}
  return {"ids": jnp.where(keep[:, None], batch["ids"], 0),
          "mask": batch["mask"] & keep[:, None]}


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

  def step_fn(codec: Codec, state: TrainState, batch: dict, hp: dict):
    rng = jax.random.fold_in(base_rng, state.step)
    (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, setup.model, batch, rng, cfg.flow, cfg.train.text_dropout, codec)
    updates, opt_state = setup.tx.update(grads, state.opt_state, state.params)
    rate = hp["lr"] * setup.schedule(state.step)
    params = apply_at_rate(state.params, updates, rate)
    # EMA with warm-up: early on the average must not stay anchored at the initialisation.
    decay = jnp.minimum(cfg.train.ema_decay, (1.0 + state.step) / (10.0 + state.step))
    ema = optax.incremental_update(params, state.ema_params, 1.0 - decay)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": rate, **parts}
    return TrainState(state.step + 1, params, ema, opt_state), metrics
  return step_fn


def make_train_step(setup: Setup):
  cfg = setup.config
  replicated = sharding.replicated(setup.mesh)
  step = jax.jit(train_step_fn(setup),
                 in_shardings=(replicated, setup.state_shardings, setup.batch_sharding, None),
                 out_shardings=(setup.state_shardings, replicated), donate_argnums=1)
  step = codec_lib.bind(sharding.in_context(step, setup.mesh, setup.rules), setup.codec)
  return hparams.bind(step, hparams.values(cfg, hparams.SFT))


def make_sampler(setup: Setup, num_steps: int, shift: float, guidance_scale: float):
  """jitted (params, batch, rng) -> uint8 edited images, by the Euler ODE (in the codec's
  space, then decoded)."""
  model = setup.model

  def sample(codec, params, batch, rng):
    source = codec.encode(batch["source_image"])
    text = text_inputs(batch)
    empty = text_inputs(batch, jnp.zeros(source.shape[:1], bool))

    def velocity(x, t, cond):
      return model.apply({"params": params}, x, t, source, text if cond else empty)

    x1 = jax.random.normal(rng, source.shape)
    x0 = flow.euler_sample(flow.guided(velocity, guidance_scale), x1,
                           flow.sigmas(num_steps, shift))
    return codec.decode(x0)

  sample = jax.jit(sample, in_shardings=(sharding.replicated(setup.mesh),
                                         setup.param_shardings, setup.batch_sharding, None),
                   out_shardings=setup.batch_sharding)
  return codec_lib.bind(sharding.in_context(sample, setup.mesh, setup.rules), setup.codec)


# ------------------------------------------------------------------------------------------
# Evaluation: sample edits, read them with the detector, score the checklists.
# ------------------------------------------------------------------------------------------
def eval_batches(setup, split: str, kinds, num_examples: int, batch_size: int):
  """Fixed batches of a split (padded to `batch_size`) as (arrays, info): `info` holds each
  real example's instruction, checklist, family and task tag, and its source and target
  scenes (for rewards)."""
  fields = IMAGE_FIELDS + EVAL_INFO + EVAL_SCENES
  ds = make_dataset(setup.source(split), batch_size, seed=0, shuffle=False, num_epochs=1,
                    drop_remainder=False, fields=fields, kinds=kinds, process_index=0,
                    process_count=1)
  out, seen = [], 0
  for batch in ds:
    n = len(batch["instruction"])
    if num_examples:
      n = min(n, num_examples - seen)
    if n <= 0:
      break
    info = {k: [str(v) for v in batch[k][:n]] for k in EVAL_INFO}
    info.update({k: np.asarray(batch[k][:n]) for k in EVAL_SCENES})
    ids, mask = tokenizer_lib.encode(setup.tokenizer, info["instruction"], setup.text_len)
    arrays = {"source_image": batch["source_image"][:n], "target_image": batch["target_image"][:n],
              "ids": ids, "mask": mask}
    arrays = {k: sharding.pad_rows(v, batch_size) for k, v in arrays.items()}
    out.append((arrays, info))
    seen += n
  return out


def evaluate(setup, params, batches, sampler, seed: int, reward_fn=None):
  """Scores over `batches`: strict success and checklist score (overall, per family and per
  task), preservation of the untouched cells, and with `reward_fn` (a rewards.Rewards) the
  mean reward and its parts. Returns (summary, first batch's images for a grid)."""
  preservation = rewards_lib.preservation_reward(setup.world)
  scores = {"success": [], "score": [], "preservation": []}
  parts: dict[str, list] = {}
  groups = {"family": [], "task": []}
  first = None
  for i, (arrays, info) in enumerate(batches):
    n = len(info["instruction"])
    edited = sharding.to_host(sampler(
        params, sharding.global_from_full(arrays, setup.batch_sharding),
        jax.random.key(seed + i)))[:n]
    prompts = {**info, "source_image": arrays["source_image"][:n]}
    pending = reward_fn.submit(edited, prompts) if reward_fn is not None else None
    s = evaluation.score_edits(edited, info["checklist"], setup.world)
    s["preservation"] = preservation(edited, prompts)
    for k in scores:
      scores[k].append(s[k])
    if pending is not None:
      total, by_name = pending.result()
      for k, v in {"reward": total, **{f"reward_{k}": v for k, v in by_name.items()}}.items():
        parts.setdefault(k, []).append(v)
    for k in groups:
      groups[k] += info[k]
    if first is None:
      first = (arrays["source_image"][:n], edited, arrays["target_image"][:n],
               info["instruction"], s["success"])
  summary = evaluation.summarize({k: np.concatenate(v) for k, v in scores.items()}, groups)
  summary["preservation"] = float(np.concatenate(scores["preservation"]).mean())
  summary.update({k: float(np.concatenate(v).mean()) for k, v in parts.items()})
  return summary, first


# ------------------------------------------------------------------------------------------
# Training loop.
# ------------------------------------------------------------------------------------------
def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  from clu import metric_writers, periodic_actions  # imports TensorFlow: only when training

  if config.get("population"):
    from jaxedit import population

    return population.train(config, workdir)
  os.makedirs(workdir, exist_ok=True)
  pretrained.copy_tokenizer(config.init_from, workdir)
  setup = make_setup(config, workdir)
  tc = config.train
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  n_params = sum(x.size for x in jax.tree.leaves(setup.abstract_state.params))
  logging.info("editor: %.2fM parameters, mesh %s", n_params / 1e6, dict(setup.mesh.shape))

  # ---- Data ----
  data_iter = iter(train_data(setup))

  # ---- State: restore the latest checkpoint or initialise ----
  mngr = checkpoint.manager(workdir, tc.keep_checkpoints, tc.async_checkpoints)
  if mngr.latest_step() is not None:
    state = checkpoint.restore(mngr, mngr.latest_step(), setup.abstract_state, data_iter)
    logging.info("resumed from step %d", int(state.step))
  else:
    state = start_state(setup)
  start = int(state.step)

  train_step = make_train_step(setup)
  sampler = make_sampler(setup, config.sample.num_steps, config.sample.shift,
                         config.sample.guidance_scale)
  val_batches = eval_batches(setup, "validation", tc.example_kinds, tc.eval_examples,
                             config.eval.batch_size)
  curve_path = os.path.join(workdir, "curve.json")
  curve = json.load(open(curve_path)) if os.path.exists(curve_path) else []
  curve = [point for point in curve if point["step"] <= start]  # past a hard kill's checkpoint
  progress = periodic_actions.ReportProgress(num_train_steps=tc.num_steps, writer=writer)
  preemption = checkpoint.Preemption()
  # Wall-clock minutes, and minutes of training alone (validation passes excluded).
  t0 = time.time() - (curve[-1]["minutes"] * 60 if curve else 0.0)
  eval_seconds = 60 * (curve[-1]["minutes"] - curve[-1]["train_minutes"]) if curve else 0.0

  # ---- Loop ----
  metrics = None
  step = start
  log = MetricsLog(writer, workdir)
  try:
    for step in range(start + 1, tc.num_steps + 1):
      batch = sharding.global_batch(next(data_iter), setup.batch_sharding)
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        state, metrics = train_step(state, batch)
      progress(step)
      last = step == tc.num_steps
      if step % tc.log_every == 0 or last:
        log(step, metrics)
      first = None  # the first validation batch's edits, reused for the sample grid
      if due(tc.eval_every, step, last):
        eval_start = time.time()
        summary, first = evaluate(setup, state.ema_params, val_batches, sampler, seed=10_000)
        eval_seconds += time.time() - eval_start
        minutes = (time.time() - t0) / 60
        curve.append({"step": step, "minutes": round(minutes, 2),
                      "train_minutes": round(minutes - eval_seconds / 60, 2), **summary})
        writer.write_scalars(step, {f"val/{k}": v for k, v in
                                   flax.traverse_util.flatten_dict(summary, sep="/").items()})
        logging.info("step %d (%.1f min): validation %s", step, minutes, summary)
        if jax.process_index() == 0:
          evaluation.write_metrics(curve_path, curve)
      if due(tc.sample_every, step, last):
        if first is None:
          _, first = evaluate(setup, state.ema_params, val_batches[:1], sampler, seed=10_000)
        write_grid(writer, workdir, step, first, tc.sample_examples)
      if checkpoint.save_if_due(mngr, step, state, data_iter, config, every=tc.checkpoint_every,
                                last=last, preemption=preemption):
        break
  finally:
    log.flush()
    mngr.wait_until_finished()
    preemption.restore()
    writer.flush()
  return {"step": step, "curve": curve,
          "final_loss": None if metrics is None else float(metrics["loss"])}


def train_data(setup: Setup):
  """This process's share of the training batches (source, target, tokenized instruction)."""
  tc = setup.config.train
  return make_dataset(setup.source("train"), tc.batch_size // jax.process_count(),
                      seed=tc.seed, fields=IMAGE_FIELDS + ("instruction",),
                      kinds=tc.example_kinds, map_fn=setup.tokenize,
                      worker_count=tc.worker_count)


def start_state(setup: Setup) -> TrainState:
  """A fresh run's state: initialised, with `init_from`'s transformer when it names one."""
  state = init_state(setup)
  if setup.config.init_from:
    state = with_params(state, pretrained.load_editor(
        setup.config.init_from, setup.abstract_state.params, setup.model.cfg))
  return state


def due(every: int, step: int, last: bool) -> bool:
  """Whether a periodic action (validation, sample grids) runs at `step`: every `every`
  steps and at the last; 0: at the last only; < 0: never."""
  return (every > 0 and step % every == 0) or (last and every >= 0)


class MetricsLog:
  """Writes a logged step's metrics (to the metric writer, and from process 0 to
  DIR/metrics.jsonl) when the next step is logged, or at `flush`.

  Reading a step's device metrics right after dispatching the step blocks the host until
  that step ends; the device then idles while the host loads and dispatches the next batch.
  One log period later they are long computed, so the loop never waits on the device.
  `select(scalars)` picks this log's scalars from the fetched metrics (e.g. one member's);
  `prefix` goes before their names (not the host scalars')."""

  def __init__(self, writer, workdir: str, select=lambda scalars: scalars, prefix: str = ""):
    self.writer, self.workdir, self.select, self.prefix = writer, workdir, select, prefix
    self._pending = None  # (step, device metrics, host scalars)

  def __call__(self, step: int, metrics, host_scalars: dict | None = None) -> None:
    self.flush()
    self._pending = (step, metrics, host_scalars or {})

  def flush(self) -> None:
    if self._pending is None:
      return
    step, metrics, host_scalars = self._pending
    self._pending = None
    fetched = {k: float(v) if np.ndim(v) == 0 else np.asarray(v)
               for k, v in jax.device_get(metrics).items()}
    scalars = {**{self.prefix + k: v for k, v in self.select(fetched).items()},
               **host_scalars}
    self.writer.write_scalars(step, scalars)  # TensorBoard
    if jax.process_index() == 0:
      with open(os.path.join(self.workdir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps({"step": step, **scalars}) + "\n")


def write_grid(writer, workdir: str, step: int, images, limit: int) -> None:
  sources, edits, targets, texts, success = images
  grid = evaluation.edit_grid(sources, edits, targets, texts, success, limit)
  writer.write_images(step, {"samples": np.asarray(grid)[None]})
  if jax.process_index():
    return
  os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
  grid.save(os.path.join(workdir, "samples", f"step_{step:07d}.png"))


def run_eval(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Scores the latest checkpoint on `eval.split`; writes DIR/eval/metrics.json and a grid."""
  setup = make_setup(config, workdir)
  step, state = checkpoint.restore_latest(workdir, config.train.keep_checkpoints,
                                        setup.abstract_state)
  params = state.ema_params if config.eval.use_ema else state.params
  sampler = make_sampler(setup, config.sample.num_steps, config.sample.shift,
                         config.sample.guidance_scale)
  ec = config.eval
  batches = eval_batches(setup, ec.split, ec.example_kinds, ec.num_examples, ec.batch_size)
  start = time.time()
  summary, first = evaluate(setup, params, batches, sampler, seed=ec.seed)
  summary.update({"split": ec.split, "example_kinds": list(ec.example_kinds), "step": step,
                  "eval_seconds": round(time.time() - start, 1)})
  out = os.path.join(workdir, "eval")
  os.makedirs(out, exist_ok=True)
  evaluation.write_metrics(os.path.join(out, "metrics.json"), summary)
  evaluation.edit_grid(*first).save(os.path.join(out, "edits.png"))
  print(json.dumps(summary, indent=1), flush=True)
  return summary
