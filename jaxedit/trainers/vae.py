"""VAE training on the shapes world: a diffusers-layout AutoencoderKL for the editor's latents.

    jaxedit train --config configs/shapes_vae.py --workdir DIR   # writes DIR/diffusers/
    jaxedit eval  --config configs/shapes_vae.py --workdir DIR

At scale the editor's VAE is a pretrained one (FLUX.1's `vae/`); the shapes world has none,
so this trains one: the mean squared error of decoding a posterior sample, plus
`train.kl_weight` times the KL to N(0, I) per latent dimension. Shapes are flat colours on a
flat background, so there is no perceptual or adversarial term.

At the end the EMA weights are written to DIR/diffusers/ as a diffusers AutoencoderKL folder
(`AutoencoderKL.from_pretrained` loads it), with `shift_factor` and `scaling_factor` set from
the posterior means of training images (their mean and 1 / std, as the Stable Diffusion and
FLUX VAEs' factors were chosen), so the editor (`model.vae.init_from=DIR/diffusers`) sees
latents of zero mean and unit variance.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxedit import checkpoint, editing, evaluation, flow, hparams, sharding, viz
from jaxedit.config import ConfigError
from jaxedit.data import job as data_job
from jaxedit.data.pipeline import fixed_batches, make_dataset
from jaxedit.interop import vae_diffusers
from jaxedit.models.editor import DTYPES
from jaxedit.models.vae import AutoencoderKL, VAEConfig
from jaxedit.shapes.detect import detect
from jaxedit.train import loop, optimizer as optimizer_lib, setup as setup_lib
from jaxedit.train.setup import TrainState

EXPORT = "diffusers"  # DIR/diffusers: the trained VAE as diffusers writes one


def vae_config(model: ml_collections.ConfigDict) -> VAEConfig:
  """The VAE of the `model` section (no quant convs, as FLUX's), on raw latents: the shift
  and scale are measured when the folder is written."""
  if model.dtype not in DTYPES or model.param_dtype not in DTYPES:
    raise ConfigError(f"model.dtype/param_dtype must be one of {sorted(DTYPES)}")
  bad = [c for c in model.block_out_channels if c % model.norm_num_groups]
  if bad or model.latent_channels <= 0 or model.layers_per_block <= 0:
    raise ConfigError(f"model: norm_num_groups {model.norm_num_groups} must divide every "
                      f"block_out_channels {tuple(model.block_out_channels)}, and "
                      "latent_channels and layers_per_block must be > 0")
  return VAEConfig(latent_channels=model.latent_channels,
                   block_out_channels=tuple(model.block_out_channels),
                   layers_per_block=model.layers_per_block,
                   norm_num_groups=model.norm_num_groups, scaling_factor=1.0,
                   shift_factor=0.0, dtype=DTYPES[model.dtype],
                   param_dtype=DTYPES[model.param_dtype])


@dataclasses.dataclass
class Setup(setup_lib.RunSetup):
  model: AutoencoderKL

  @functools.cached_property
  def encoder_decoder(self):
    """`make_encoder_decoder(self)`, compiled once for every evaluation of the run."""
    return make_encoder_decoder(self)


def _init_state(rng, *, model, tx, image_size) -> TrainState:
  return setup_lib.fresh_state(
      model.init(rng, jnp.zeros((1, image_size, image_size, 3)))["params"], tx)


def make_setup(config: ml_collections.ConfigDict, workdir: str, devices=None) -> Setup:
  del workdir  # nothing is read from the run's folder to build it
  data_job.check_data_config(config.data)
  t = config.train
  for key in ("num_steps", "batch_size", "log_every", "stats_examples"):
    if t[key] <= 0:
      raise ConfigError(f"config key 'train.{key}' must be > 0")
  if t.kl_weight < 0:
    raise ConfigError("config key 'train.kl_weight' must be >= 0")
  world = data_job.world_from(config)
  cfg = vae_config(config.model)
  if world.image_size % cfg.downscale:
    raise ConfigError(f"world.image_size {world.image_size} is not divisible by the VAE's "
                      f"{cfg.downscale}x downsampling")
  parts = (world, None, AutoencoderKL(cfg), *setup_lib.mesh_and_rules(config, devices))
  return setup_lib.assemble(Setup, config, parts, optimizer_lib.supervised(t),
                            functools.partial(_init_state, image_size=world.image_size))


# ------------------------------------------------------------------------------------------
# The loss and the train step.
# ------------------------------------------------------------------------------------------
def kl_to_standard_normal(mean, logvar):
  """KL(N(mean, exp(logvar)) || N(0, 1)), averaged over the latent dimensions."""
  mean, logvar = mean.astype(jnp.float32), logvar.astype(jnp.float32)
  return 0.5 * jnp.mean(mean ** 2 + jnp.exp(logvar) - 1.0 - logvar)


def loss_fn(params, model: AutoencoderKL, images, rng, kl_weight: float):
  """(loss, parts): reconstruction MSE of a posterior sample (pixels in [-1, 1]) +
  kl_weight * KL per latent dimension."""
  x = flow.to_model_space(images)
  mean, logvar = model.apply({"params": params}, x, method=AutoencoderKL.encode)
  z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)
  recon = model.apply({"params": params}, z, method=AutoencoderKL.decode).astype(jnp.float32)
  mse = jnp.mean((recon - x) ** 2)
  kl = kl_to_standard_normal(mean, logvar)
  return mse + kl_weight * kl, {"mse": mse, "kl": kl}


def make_train_step(setup: Setup):
  """jitted (state, batch) -> (state, metrics) on the batch's source and target images; the
  learning rate is traced (`hparams`)."""
  cfg = setup.config
  base_rng = jax.random.key(cfg.train.seed)

  def step_fn(state: TrainState, batch: dict, hp: dict):
    images = jnp.concatenate([batch["source_image"], batch["target_image"]])
    rng = jax.random.fold_in(base_rng, state.step)
    (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, setup.model, images, rng, cfg.train.kl_weight)
    params, ema, opt_state, rate = setup.optimizer.update(
        hp, state.params, state.ema_params, state.opt_state, grads, state.step)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": rate, **parts}
    return TrainState(state.step + 1, params, ema, opt_state), metrics

  replicated = sharding.replicated(setup.mesh)
  step = jax.jit(step_fn, in_shardings=(setup.state_shardings, setup.batch_sharding, None),
                 out_shardings=(setup.state_shardings, replicated), donate_argnums=0)
  return sharding.Program(step, setup.mesh, setup.rules,
                          hparams=hparams.values(cfg, hparams.SFT))


def make_encoder_decoder(setup: Setup):
  """jitted (params, uint8 images) -> (raw posterior means, uint8 reconstructions)."""
  model = setup.model

  def run(params, images):
    mean, _ = model.apply({"params": params}, flow.to_model_space(images),
                          method=AutoencoderKL.encode)
    recon = model.apply({"params": params}, mean, method=AutoencoderKL.decode)
    return mean.astype(jnp.float32), flow.to_uint8(recon.astype(jnp.float32))

  fn = jax.jit(run, in_shardings=(setup.param_shardings, setup.batch_sharding),
               out_shardings=(setup.batch_sharding, setup.batch_sharding))
  return sharding.Program(fn, setup.mesh, setup.rules)


# ------------------------------------------------------------------------------------------
# Evaluation and the diffusers folder.
# ------------------------------------------------------------------------------------------
def image_batches(setup: Setup, split: str, kinds, num_examples: int, batch_size: int):
  """Fixed batches of a split's source images (padded to `batch_size`), as (images, n)."""
  return [(sharding.pad_rows(batch["source_image"], batch_size), len(batch["source_image"]))
          for batch in fixed_batches(setup.source(split), batch_size, num_examples,
                                     fields=("source_image",), kinds=kinds)]


def evaluate(setup: Setup, params, batches) -> tuple[dict, tuple]:
  """PSNR of the reconstructions (posterior mean), the fraction the detector reads as the
  same scene as the original (what the editor's rewards need), and the posterior means'
  statistics. Returns (summary, (originals, reconstructions) of the first batch)."""
  run = setup.encoder_decoder
  psnr, same, means, first = [], [], [], None
  for images, n in batches:
    mean, recon = run(params, sharding.global_from_full({"x": images},
                                                        setup.batch_sharding)["x"])
    mean, recon = sharding.to_host(mean)[:n], sharding.to_host(recon)[:n]
    originals = images[:n]
    mse = ((recon.astype(np.float64) - originals) ** 2).mean(axis=(1, 2, 3))
    psnr.append(10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-10)))
    read, truth = (detect(x, setup.world).scenes for x in (recon, originals))
    same.append(np.array([a == b for a, b in zip(read, truth)]))
    means.append(mean)
    if first is None:
      first = (originals, recon)
  means = np.concatenate(means)
  return {"psnr": float(np.concatenate(psnr).mean()),
          "detector_agreement": float(np.concatenate(same).mean()),
          "latent_mean": float(means.mean()), "latent_std": float(means.std()),
          "examples": int(len(means))}, first


def write_grid(path: str, first, limit: int = 16) -> None:
  originals, recon = first
  rows = [([o, r], []) for o, r in zip(originals[:limit], recon[:limit])]
  viz.image_grid(rows, header=["image", "reconstruction"], text_width=8).save(path)


def write_diffusers(setup: Setup, params, folder: str) -> dict:
  """The VAE as a diffusers AutoencoderKL folder, its shift and scale measured on
  `train.stats_examples` training images (their posterior means: mean, 1 / std)."""
  tc = setup.config.train
  batches = image_batches(setup, "train", tc.example_kinds, tc.stats_examples,
                          setup.config.eval.batch_size)
  stats, _ = evaluate(setup, params, batches)
  cfg = dataclasses.replace(setup.model.cfg, shift_factor=stats["latent_mean"],
                            scaling_factor=1.0 / stats["latent_std"])
  params = jax.device_get(params)
  if jax.process_index() == 0:
    vae_diffusers.write_folder(folder, params, cfg)
  return {"shift_factor": cfg.shift_factor, "scaling_factor": cfg.scaling_factor}


# ------------------------------------------------------------------------------------------
# Training loop.
# ------------------------------------------------------------------------------------------
def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  setup = make_setup(config, workdir)
  tc = config.train
  run = loop.Run(config, workdir)
  n_params = sum(x.size for x in jax.tree.leaves(setup.abstract_state.params))
  logging.info("VAE: %.2fM parameters, %dx downsampling to %d channels", n_params / 1e6,
               setup.model.cfg.downscale, setup.model.cfg.latent_channels)
  data_iter = iter(make_dataset(setup.source("train"), tc.batch_size // jax.process_count(),
                                seed=tc.seed, fields=editing.IMAGE_FIELDS,
                                kinds=tc.example_kinds, worker_count=tc.worker_count))
  state = run.restore_or_init(setup.abstract_state, data_iter,
                              lambda: setup_lib.init_state(setup))
  train_step = make_train_step(setup)
  val = image_batches(setup, "validation", tc.example_kinds, tc.eval_examples,
                      config.eval.batch_size)

  def step_fn(state, step):
    batch = sharding.global_batch(next(data_iter), setup.batch_sharding)
    return (*train_step(state, batch), None)

  def validate(state, step):
    summary, first = evaluate(setup, state.ema_params, val)
    run.writer.write_images(step, {"reconstructions": np.concatenate(
        [np.concatenate(first[0][:8], 1), np.concatenate(first[1][:8], 1)], 0)[None]})
    return summary, None

  state, step, metrics, _ = loop.run(run, state, data_iter, step_fn,
                                     loop.Hooks(validate=validate))
  out = {"step": step, "final_loss": None if metrics is None else float(metrics["loss"])}
  if step == tc.num_steps:
    out["export"] = write_diffusers(setup, state.ema_params, os.path.join(workdir, EXPORT))
    logging.info("wrote %s/%s: %s", workdir, EXPORT, out["export"])
  return out


def run_eval(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Scores the latest checkpoint on `eval.split`: DIR/eval/metrics.json and a grid of
  reconstructions (DIR/eval/reconstructions.png)."""
  setup = make_setup(config, workdir)
  step, state = checkpoint.restore_latest(workdir, config.train.keep_checkpoints,
                                        setup.abstract_state)
  ec = config.eval
  batches = image_batches(setup, ec.split, ec.example_kinds, ec.num_examples, ec.batch_size)
  summary, first = evaluate(setup, state.ema_params if ec.use_ema else state.params, batches)
  summary.update({"split": ec.split, "step": step})
  out = os.path.join(workdir, "eval")
  os.makedirs(out, exist_ok=True)
  evaluation.write_metrics(os.path.join(out, "metrics.json"), summary)
  write_grid(os.path.join(out, "reconstructions.png"), first)
  print(json.dumps(summary, indent=1), flush=True)
  return summary
