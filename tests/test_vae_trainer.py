"""The shapes VAE trainer: its KL term in float64, 8 devices = 1, and a run whose diffusers
folder loads in diffusers and gives the editor's codec latents of zero mean, unit variance."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_sharded_close, small_data_config
from jaxedit import checkpoint, cli, dry_run, schema, sharding
from jaxedit.codec import make_codec
from jaxedit.config import ConfigError
from jaxedit.trainers import vae
from jaxedit.train import setup as setup_lib


def tiny_vae_config(data_dir, **train):
  config = schema.vae()
  config.data = small_data_config(data_dir)  # the shared small dataset (atomic pairs used)
  config.model.block_out_channels, config.model.norm_num_groups = (8, 16), 4
  t = config.train
  t.batch_size, t.num_steps, t.warmup_steps, t.log_every = 8, 3, 1, 1
  t.eval_every, t.checkpoint_every, t.eval_examples, t.stats_examples = 3, 3, 8, 64
  t.async_checkpoints = False
  config.eval.batch_size, config.eval.num_examples = 16, 16
  for k, v in train.items():
    t[k] = v
  return config


def test_kl_equals_float64_closed_form():
  rng = np.random.default_rng(0)
  mean, logvar = rng.normal(size=(2, 4, 4, 3)), rng.normal(size=(2, 4, 4, 3))
  # KL(N(m, s^2) || N(0, 1)) = log(1 / s) + (s^2 + m^2) / 2 - 1/2, per dimension
  want = np.mean(-0.5 * logvar + (np.exp(logvar) + mean ** 2) / 2 - 0.5)
  got = vae.kl_to_standard_normal(jnp.float32(mean), jnp.float32(logvar))
  np.testing.assert_allclose(float(got), want, rtol=1e-6)
  assert float(vae.kl_to_standard_normal(jnp.zeros(3), jnp.zeros(3))) == 0.0


def test_step_on_eight_devices_matches_one(small_data_dir, tmp_path):
  one = vae.make_setup(tiny_vae_config(small_data_dir), str(tmp_path), devices=jax.devices()[:1])
  config8 = tiny_vae_config(small_data_dir)
  config8.mesh.shape = (2, 2, 2)
  eight = vae.make_setup(config8, str(tmp_path))
  state1 = setup_lib.init_state(one)
  state8 = jax.device_put(jax.device_get(state1), eight.state_shardings)
  images = vae.image_batches(one, "train", ("atomic",), 8, 8)[0][0]
  batch = {"source_image": images, "target_image": images[::-1]}
  out = []
  for setup, state in ((one, state1), (eight, state8)):
    new, metrics = vae.make_train_step(setup)(state, sharding.global_batch(
        batch, setup.batch_sharding))
    out.append((jax.device_get(metrics), jax.device_get(new.params)))
  (m1, p1), (m8, p8) = out
  assert m1["mse"] > 0 and m1["kl"] > 0
  for k in m1:
    assert_sharded_close(m1[k], m8[k], rtol=1e-5, atol=1e-7, err_msg=k)
  assert_sharded_close(p1, p8, rtol=1e-5, atol=1e-6)


def test_train_exports_a_normalised_diffusers_vae_and_eval(small_data_dir, tmp_path, capsys):
  diffusers = pytest.importorskip("diffusers")
  torch = pytest.importorskip("torch")
  config = tiny_vae_config(small_data_dir)
  workdir = str(tmp_path / "run")
  out = vae.train(config, workdir)
  folder = os.path.join(workdir, vae.EXPORT)
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [r["step"] for r in rows] == [1, 2, 3] and all(np.isfinite(r["mse"]) for r in rows)

  # diffusers loads the folder, and encodes as jaxedit does with the EMA weights.
  model = diffusers.AutoencoderKL.from_pretrained(folder).eval()
  assert model.config.scaling_factor == pytest.approx(out["export"]["scaling_factor"])
  setup = vae.make_setup(config, workdir)
  mngr = checkpoint.manager(workdir, 2, async_save=False)
  state = checkpoint.restore(mngr, 3, setup.abstract_state)
  images = vae.image_batches(setup, "train", ("atomic",), 64, 16)
  ours, _ = vae.make_encoder_decoder(setup)(state.ema_params, images[0][0])
  with torch.no_grad():
    x = torch.from_numpy(images[0][0].astype(np.float32) / 127.5 - 1).permute(0, 3, 1, 2)
    theirs = model.encode(x).latent_dist.mode().permute(0, 2, 3, 1).numpy()
  # GroupNorm over the flat colours of shapes images divides by tiny variances, which
  # amplifies float32 rounding to ~5e-4 of the largest latent here; a wrong export moves
  # the latents by O(1).
  assert np.abs(np.asarray(ours) - theirs).max() <= 2e-3 * np.abs(theirs).max()

  # The editor's codec on that folder: the stats images' latents are standardised.
  editor = schema.editor_sft()
  editor.model.vae.enabled, editor.model.vae.init_from = True, folder
  editor.model.vae.latent_channels, editor.model.vae.block_out_channels = 4, (8, 16)
  editor.model.vae.layers_per_block, editor.model.vae.norm_num_groups = 1, 4
  codec = make_codec(editor, setup.mesh)
  z = np.concatenate([np.asarray(jax.jit(lambda c, x: c.encode(x))(codec, b[:n]))
                      for b, n in images])
  assert abs(z.mean()) < 1e-3 and abs(z.std() - 1) < 1e-3, (z.mean(), z.std())

  summary = vae.run_eval(config, workdir)
  assert summary["examples"] == 16 and summary["psnr"] > 0
  assert 0.0 <= summary["detector_agreement"] <= 1.0
  assert os.path.exists(os.path.join(workdir, "eval", "reconstructions.png"))
  assert json.load(open(os.path.join(workdir, "eval", "metrics.json")))["psnr"] == \
      pytest.approx(summary["psnr"])
  capsys.readouterr()
  # The command line knows the trainer.
  assert cli.main(["eval", "--config", "configs/shapes_vae.py", "--workdir", workdir,
                   f"--config.data.data_dir={small_data_dir}", "--config.eval.num_examples=8",
                   "--config.model.block_out_channels=(8, 16)",
                   "--config.model.norm_num_groups=4"] + [
                       f"--config.data.splits.{s}.{k}={v}" for s, sizes in
                       small_data_config(small_data_dir).splits.items()
                       for k, v in sizes.items()]) == 0


def test_dry_run(small_data_dir, tmp_path):
  out = dry_run.main(tiny_vae_config(small_data_dir), str(tmp_path / "run"))
  (step,) = out["programs"]
  assert step["program"] == "train_step" and step["flops"] > 0 and step["peak_estimate"] > 0
  assert out["parameters"] == sum(x.size for x in jax.tree.leaves(
      vae.make_setup(tiny_vae_config(small_data_dir), "").abstract_state.params))


def test_config_errors_name_the_problem(small_data_dir, tmp_path):
  bad = tiny_vae_config(small_data_dir)
  bad.model.norm_num_groups = 3
  with pytest.raises(ConfigError, match="norm_num_groups 3 must divide"):
    vae.make_setup(bad, str(tmp_path))
  bad = tiny_vae_config(small_data_dir, kl_weight=-1.0)
  with pytest.raises(ConfigError, match="train.kl_weight"):
    vae.make_setup(bad, str(tmp_path))
  bad = tiny_vae_config(small_data_dir)
  bad.world.image_size, bad.model.block_out_channels = 36, (8, 16, 16, 16)
  with pytest.raises(ConfigError, match="36 is not divisible by the VAE's 8x downsampling"):
    vae.make_setup(bad, str(tmp_path))
