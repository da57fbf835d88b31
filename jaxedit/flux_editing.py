"""The editor on edit records, a lab's own data (`jaxedit data --config configs/edit_data.py`),
with FLUX conditioning: the T5 sequence as context, the CLIP pooled embedding as the pooled
projection, the guidance embedding of dev-type models, and the source latents appended as
Kontext tokens (position-id axis 0 = 1). Below the trainers, as `editing` is for the shapes
world: the setup, model inputs (cached in the records, or encoded here by the pipeline's
encoders), the SFT loss, the Euler sampler and validation.

The architecture can come from the pipeline folder (`model.architecture = 'init_from'`): the
transformer's and VAE's config.json set every shape key, so any FLUX.1(-Kontext) folder
trains without shape flags.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxedit import codec as codec_lib
from jaxedit import flow, lora, sharding
from jaxedit.codec import Codec
from jaxedit.config import ConfigError
from jaxedit.data import edit_cache, edit_records
from jaxedit.interop import pretrained
from jaxedit.models import editor as editor_model
from jaxedit.models.editor import Editor, EditorConfig, editor_config
from jaxedit.train import optimizer as optimizer_lib, setup as setup_lib

CACHED = ("source_latents", "target_latents", "context", "pooled")
ARCHITECTURES = ("config", "init_from")
# model key <- FluxTransformer2DModel config key
FLUX_KEYS = {"num_layers": "num_layers", "num_single_layers": "num_single_layers",
             "num_heads": "num_attention_heads", "head_dim": "attention_head_dim",
             "axes_dims_rope": "axes_dims_rope", "guidance_embeds": "guidance_embeds",
             "context_dim": "joint_attention_dim", "pooled_dim": "pooled_projection_dim"}
VAE_KEYS = ("latent_channels", "block_out_channels", "layers_per_block", "norm_num_groups",
            "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention")


# data.records of a run set up from its config alone (`--dry_run`): no records are read.
SIZED_FROM_CONFIG = "<sized from the config>"


# FLUX.1(-Kontext)'s scheduler/scheduler_config.json, as far as sampling times go.
FLUX_SCHEDULER = {"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
                  "base_image_seq_len": 256, "max_image_seq_len": 4096}


def sized_from_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` (a copy) set up without records or pipeline weights when it trains on T5 /
  CLIP embeddings (precomputed text): one square bucket of world.image_size."""
  if config.model.get("text_encoder") != "precomputed":
    return config
  config = ml_collections.ConfigDict(config.to_dict())
  config.data.records = SIZED_FROM_CONFIG
  return config


def on_records(config: ml_collections.ConfigDict) -> bool:
  """Whether a run trains on edit records (data.records) rather than the shapes world."""
  return bool(config.data.get("records"))


class ConfigRecords:
  """Stands in for the records of a run `sized_from_config`: one square bucket of
  world.image_size and no rows, so nothing is read."""

  splits = ()

  def __init__(self, size: int):
    self.root = "(no records: sized from the config)"
    self.manifest = {"buckets": [[size, size]], "splits": {}, "fields": []}


def pipeline_folder(config: ml_collections.ConfigDict) -> str:
  """The diffusers pipeline folder whose VAE (and encoders) the run uses: data.pipeline, or
  init_from when it is one."""
  path = config.data.get("pipeline") or config.get("init_from", "")
  if not path or not os.path.isdir(os.path.join(path, "vae")):
    raise ConfigError("training on edit records needs the pipeline folder (its vae/ decodes "
                      "samples): set init_from (or data.pipeline) to a diffusers "
                      "FLUX.1-Kontext pipeline folder")
  return path


def _saved_run_config(path: str) -> ml_collections.ConfigDict | None:
  """The config a jaxedit workdir's latest checkpoint saved, or None if `path` is none."""
  from jaxedit import checkpoint

  if not os.path.isdir(os.path.join(path, "checkpoints")):
    return None
  mngr, step = checkpoint.latest_step(path, "a jaxedit editor workdir")
  return ml_collections.ConfigDict(checkpoint.saved_config(mngr, step))


def with_architecture(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` (a copy; `config` is unchanged) with the model's shape keys taken from
  init_from when `model.architecture == 'init_from'`: a pipeline folder's transformer/ and
  vae/ config.json, or an editor workdir's saved model section (and its pipeline folder)."""
  arch = config.model.get("architecture", "config")
  if arch not in ARCHITECTURES:
    raise ConfigError(f"config key 'model.architecture' must be one of {ARCHITECTURES}, "
                      f"got {arch!r}")
  if arch == "config":
    return config
  config = ml_collections.ConfigDict(config.to_dict())
  saved = _saved_run_config(config.init_from) if config.get("init_from") else None
  if saved is not None:
    if not on_records(saved):
      raise ConfigError(f"init_from: {config.init_from} was trained on the shapes world, not "
                        "on edit records")
    flat = flax.traverse_util.flatten_dict(saved.model.to_dict())
    for path, value in flat.items():
      if ".".join(path) not in editor_model.FREE_MODEL_KEYS:
        node = config.model
        for key in path[:-1]:
          node = node[key]
        node[path[-1]] = tuple(value) if isinstance(value, list) else value
    config.data.pipeline = config.data.pipeline or pipeline_folder(saved)
    config.model.vae.init_from = (config.model.vae.init_from
                                  or os.path.join(config.data.pipeline, "vae"))
    return config
  pipeline = pipeline_folder(config)
  flux = pretrained.required_config(os.path.join(pipeline, "transformer"))
  vae = pretrained.required_config(os.path.join(pipeline, "vae"))
  m = config.model
  for ours, theirs in FLUX_KEYS.items():
    if theirs in flux:
      m[ours] = tuple(flux[theirs]) if isinstance(flux[theirs], list) else flux[theirs]
  for key in VAE_KEYS:
    if key in vae:
      m.vae[key] = tuple(vae[key]) if isinstance(vae[key], list) else vae[key]
  m.vae.enabled, m.vae.init_from = True, os.path.join(pipeline, "vae")
  m.text_encoder = "precomputed"
  patch = math.isqrt(flux.get("in_channels", 64) // m.vae.latent_channels)
  if patch * patch * m.vae.latent_channels != flux.get("in_channels", 64):
    raise ConfigError(f"init_from: {pipeline}/transformer takes {flux.get('in_channels')} "
                      f"channels, not a square packing of the VAE's {m.vae.latent_channels}")
  m.patch_size = patch
  m.architecture = "config"  # filled in: the saved config holds the shapes themselves
  return config


@dataclasses.dataclass
class RecordsSetup(setup_lib.RunSetup):
  model: Editor
  records: edit_records.EditRecords

  @functools.cached_property
  def codec(self) -> Codec:
    return codec_lib.make_codec(self.config, self.mesh)

  @property
  def param_shardings(self):
    """Of the whole model the sampler runs: LoRA adapters joined onto their base."""
    return lora.whole(self.state_shardings.params, self.state_shardings.base)

  @property
  def cached(self) -> bool:
    """Whether the records hold every model input (else the pipeline's encoders run)."""
    return all(f in self.records.manifest["fields"] for f in CACHED)

  @functools.cached_property
  def encoders(self) -> edit_cache.Encoders:
    """The pipeline's VAE and text encoders, for records without cached encodings."""
    encode = ml_collections.ConfigDict({
        "pipeline": pipeline_folder(self.config), "vae": True, "text": True,
        "max_sequence_length": self.config.model.text_max_len, "batch_size": 1,
        "dtype": "float32"})
    return edit_cache.Encoders(encode, self.config.mesh)

  def sigmas(self, num_steps: int, latent_shape) -> jax.Array:
    """The sampler's num_steps + 1 times for latents of `latent_shape` (B, h, w, C):
    shifted by sample.shift, or with sample.shift = 0 as the pipeline's scheduler shifts them
    for that many tokens (FLUX: exp(mu), mu linear in the token count)."""
    shift = self.config.sample.shift or pipeline_shift(
        self.scheduler, (latent_shape[1] // self.model.cfg.patch_size)
        * (latent_shape[2] // self.model.cfg.patch_size))
    with jax.ensure_compile_time_eval():  # a constant, also when called while tracing
      return flow.sigmas(num_steps, shift)

  @functools.cached_property
  def scheduler(self) -> dict:
    """The pipeline folder's scheduler/scheduler_config.json ({} without one; FLUX.1's for a
    run sized from its config)."""
    if self.config.data.records == SIZED_FROM_CONFIG:
      return FLUX_SCHEDULER
    folder = os.path.join(pipeline_folder(self.config), "scheduler")
    if not os.path.exists(os.path.join(folder, "scheduler_config.json")):
      return {}
    return pretrained.required_config(folder, "scheduler_config.json")

  @property
  def guidance(self) -> float | None:
    """The guidance value of dev-type (guidance-embedded) models, in training and sampling."""
    return self.config.model.guidance if self.model.cfg.flux.guidance_embeds else None

  def model_inputs(self, batch: dict) -> dict:
    """Host arrays of the model's inputs for a batch of records: the cached encodings, or
    the pipeline's encoders run on its images and instructions."""
    if self.cached:
      return {k: np.asarray(batch[k], np.float32) for k in CACHED}
    keys = ("id", "instruction", "source_image", "target_image")
    records = [{k: batch[k][i] for k in keys} for i in range(len(batch["id"]))]
    encoded = self.encoders([{**r, "instruction": str(r["instruction"])} for r in records])
    return {k: np.stack([np.asarray(r[k], np.float32) for r in encoded]) for k in CACHED}


def first_bucket(records: edit_records.EditRecords) -> tuple[int, int]:
  return tuple(records.manifest["buckets"][0])


def check_records(records: edit_records.EditRecords, cfg: EditorConfig,
                  downscale: int) -> None:
  """Every bucket divides into the model's tokens; the cached widths are the model's."""
  multiple = downscale * cfg.patch_size
  for bucket in records.manifest["buckets"]:
    if bucket[0] % multiple or bucket[1] % multiple:
      raise ConfigError(f"the records' bucket {bucket[0]}x{bucket[1]} does not divide into "
                        f"{multiple}-pixel tokens (VAE {downscale}x, patch {cfg.patch_size})")
  if all(f in records.manifest["fields"] for f in CACHED):
    source = records.buckets(next(iter(records.splits)))[0]
    record = source[0]
    want = {"context": cfg.flux.joint_attention_dim, "pooled": cfg.flux.pooled_projection_dim,
            "source_latents": cfg.channels}
    for key, width in want.items():
      if record[key].shape[-1] != width:
        raise ConfigError(f"the records at {records.root} hold {key} of width "
                          f"{record[key].shape[-1]}; the model takes {width} (records built "
                          "with another pipeline?)")


def make_parts(config: ml_collections.ConfigDict, devices=None):
  """(records, model, mesh, rules, batch sharding) of a run on edit records (a stand-in for
  the records of a run `sized_from_config`)."""
  if config.data.records == SIZED_FROM_CONFIG:
    records = ConfigRecords(config.world.image_size)
  else:
    try:
      records = edit_records.EditRecords(config.data.records)
    except FileNotFoundError as e:
      raise ConfigError(f"data.records: {e}") from None
  if config.model.text_encoder != "precomputed":
    raise ConfigError("edit records carry T5 / CLIP embeddings: model.text_encoder must be "
                      "'precomputed' (or model.architecture='init_from')")
  height, _ = first_bucket(records)
  try:
    model = Editor(editor_config(config.model, height, 0))
  except ValueError as e:
    raise ConfigError(str(e)) from None
  check_records(records, model.cfg, editor_model.vae_config(config.model).downscale)
  return (records, model, *setup_lib.mesh_and_rules(config, devices))


def dummy_inputs(cfg: EditorConfig, bucket: tuple[int, int], downscale: int, text_len: int):
  """(x_t, t, source, text, guidance) of one bucket's shapes, for init and eval_shape."""
  x = jnp.zeros((1, bucket[0] // downscale, bucket[1] // downscale, cfg.channels))
  text = {"context": jnp.zeros((1, text_len, cfg.flux.joint_attention_dim)),
          "pooled": jnp.zeros((1, cfg.flux.pooled_projection_dim))}
  guidance = jnp.ones((1,)) if cfg.flux.guidance_embeds else None
  return x, jnp.zeros((1,)), x, text, guidance


def init_state(rng, *, model, tx, bucket, downscale, text_len) -> setup_lib.TrainState:
  """A fresh SFT state; with LoRA (model.lora_rank > 0) the adapters train over a frozen
  base."""
  params = editor_model.init_params(model, rng,
                                    *dummy_inputs(model.cfg, bucket, downscale, text_len))
  if model.cfg.flux.lora_rank:
    adapters, base = lora.split(params)
    return setup_lib.fresh_state(adapters, tx, base)
  return setup_lib.fresh_state(params, tx)


def make_setup(config: ml_collections.ConfigDict, workdir: str, devices=None,
               optimizer=None) -> RecordsSetup:
  """The setup of an editor run on edit records (the supervised optimizer by default)."""
  del workdir  # records runs keep no tokenizer
  config = with_architecture(config)
  records, model, mesh, rules, batch_sharding = make_parts(config, devices)
  init = functools.partial(init_state, bucket=first_bucket(records),
                           downscale=editor_model.vae_config(config.model).downscale,
                           text_len=config.model.text_max_len)
  return setup_lib.assemble(RecordsSetup, config,
                            (None, None, model, mesh, rules, batch_sharding),
                            optimizer or optimizer_lib.supervised(config.train), init,
                            records=records)


def sft_loss(params, model: Editor, inputs: dict, rng, flow_cfg, guidance: float | None):
  """The flow-matching loss on cached (or just encoded) latents and embeddings."""
  r_t, r_eps = jax.random.split(rng)
  x0, source = inputs["target_latents"], inputs["source_latents"]
  t = flow.sample_time(r_t, x0.shape[0], kind=flow_cfg.timesteps, mean=flow_cfg.logit_mean,
                       std=flow_cfg.logit_std, shift=flow_cfg.shift)
  eps = jax.random.normal(r_eps, x0.shape)
  g = None if guidance is None else jnp.full((x0.shape[0],), guidance, jnp.float32)
  v = model.apply({"params": params}, flow.interpolate(x0, eps, t), t, source,
                  {"context": inputs["context"], "pooled": inputs["pooled"]}, guidance=g)
  return flow.sft_loss(v, x0, eps)


def pipeline_shift(scheduler: dict, tokens: int) -> float:
  """The time shift a diffusers FlowMatchEulerDiscreteScheduler applies to an image of
  `tokens` tokens: exp(mu) with mu interpolated linearly from base_shift at
  base_image_seq_len to max_shift at max_image_seq_len (FluxPipeline's calculate_shift) when
  it shifts dynamically, else its `shift` (1 without a scheduler)."""
  if not scheduler.get("use_dynamic_shifting"):
    return float(scheduler.get("shift", 1.0))
  if scheduler.get("time_shift_type", "exponential") != "exponential":
    raise ConfigError(f"the pipeline's scheduler shifts by {scheduler['time_shift_type']!r}; "
                      "jaxedit follows the exponential (FLUX) shift: set sample.shift > 0")
  lo, hi = scheduler.get("base_image_seq_len", 256), scheduler.get("max_image_seq_len", 4096)
  base, top = scheduler.get("base_shift", 0.5), scheduler.get("max_shift", 1.15)
  mu = base + (top - base) * (tokens - lo) / (hi - lo)
  return math.exp(mu)


def make_sampler(setup: RecordsSetup, num_steps: int):
  """jitted (params, inputs, rng) -> uint8 edits: the Euler ODE on latents from noise, with
  the source as Kontext tokens, decoded by the pipeline's VAE."""
  model, guidance = setup.model, setup.guidance

  def sample(codec, params, inputs, rng):
    source = inputs["source_latents"]
    text = {"context": inputs["context"], "pooled": inputs["pooled"]}
    g = None if guidance is None else jnp.full((source.shape[0],), guidance, jnp.float32)

    def velocity(x, t):
      return model.apply({"params": params}, x, t, source, text, guidance=g)

    x0 = flow.euler_sample(velocity, jax.random.normal(rng, source.shape),
                           setup.sigmas(num_steps, source.shape))
    return codec.decode(x0)

  sample = jax.jit(sample, in_shardings=(sharding.replicated(setup.mesh),
                                         setup.param_shardings, setup.batch_sharding, None),
                   out_shardings=setup.batch_sharding)
  return sharding.Program(sample, setup.mesh, setup.rules, (setup.codec,))


def eval_batches(setup: RecordsSetup, split: str, num_examples: int, batch_size: int):
  """Fixed batches of a split, padded to `batch_size`, as (model inputs, info): info holds
  the real rows' ids, instructions, source and target images."""
  out = []
  for batch in edit_records.fixed_batches(setup.records, split, batch_size, num_examples):
    n = len(batch["id"])
    inputs = setup.model_inputs(batch)
    info = {"id": [str(i) for i in batch["id"]],
            "instruction": [str(s) for s in batch["instruction"]],
            "requirement": [str(s) for s in batch["requirement"]],
            "task_type": [str(s) for s in batch["task_type"]],
            "has_target": np.asarray(batch["has_target"], bool),
            "source_image": batch["source_image"], "target_image": batch["target_image"]}
    out.append(({k: sharding.pad_rows(v, batch_size) for k, v in inputs.items()}, info, n))
  return out


def make_val_loss(setup: RecordsSetup):
  """jitted (params, inputs, rng) -> the SFT loss at fixed noise: a validation figure that
  needs no judge."""
  cfg = setup.config
  fn = functools.partial(sft_loss, model=setup.model, flow_cfg=cfg.flow,
                         guidance=setup.guidance)
  loss = jax.jit(lambda params, inputs, rng: fn(params, inputs=inputs, rng=rng),
                 in_shardings=(setup.param_shardings, setup.batch_sharding, None))
  return sharding.Program(loss, setup.mesh, setup.rules)


GRID_PER_TASK_TYPE = 4  # examples of each task type in an evaluation's grid


def evaluate(setup: RecordsSetup, params, batches, sampler, seed: int, val_loss=None,
             reward_fn=None):
  """(summary, images for a grid): the validation flow loss where the rows have targets
  (`val_loss`), and with `reward_fn` (a rewards.Rewards: a judge) the mean reward of the
  sampled edits and its parts, masked samples counted, also per task type where the rows
  have one (benchmarks such as GEdit-Bench). The grid holds the first examples of each task
  type (of the first batch without task types)."""
  losses, rewards, parts, masked = [], [], {}, 0
  task_types, grid = [], {}
  for i, (inputs, info, n) in enumerate(batches):
    arrays = sharding.global_from_full(inputs, setup.batch_sharding)
    if val_loss is not None:
      losses.append(float(val_loss(params, arrays, jax.random.key(seed + i))))
    edited = sharding.to_host(sampler(params, arrays, jax.random.key(seed + i)))[:n]
    if reward_fn is not None:
      total, by_name = reward_fn(edited, {**info, "source_image": info["source_image"][:n]})
      masked += int(np.isnan(total).sum())
      rewards.append(total)
      for k, v in by_name.items():
        parts.setdefault(k, []).append(v)
    task_types += info["task_type"][:n]
    for j in range(n):
      task = info["task_type"][j]
      shown = grid.setdefault(task, [])
      if len(shown) < (GRID_PER_TASK_TYPE if task else n) and (task or i == 0):
        label = f"[{task}] {info['instruction'][j]}" if task else info["instruction"][j]
        shown.append((info["source_image"][j], edited[j], info["target_image"][j], label,
                      info["has_target"][j]))
  summary = {"examples": sum(n for _, _, n in batches)}
  if losses:
    summary["val_flow_loss"] = float(np.mean(losses))
  if rewards:
    summary["reward"] = float(np.nanmean(np.concatenate(rewards)))
    summary["masked"] = masked
    summary.update({f"reward_{k}": float(np.nanmean(np.concatenate(v)))
                    for k, v in parts.items()})
    if any(task_types):
      total, types = np.concatenate(rewards), np.asarray(task_types)
      summary["reward_by_task_type"] = {
          t: float(np.nanmean(total[types == t])) if np.isfinite(total[types == t]).any()
          else float("nan") for t in sorted(set(task_types))}
      summary["examples_by_task_type"] = {t: int((types == t).sum())
                                          for t in sorted(set(task_types))}
  shown = [example for task in sorted(grid) for example in grid[task]]
  # (sources, edits, targets, texts, verdicts) of several buckets' shapes; no verdict:
  # judges score, they do not pass
  sources, edits, targets, texts, has_target = ([e[k] for e in shown] for k in range(5))
  first = (sources, edits, targets if any(has_target) else None, texts, None)
  return summary, first
