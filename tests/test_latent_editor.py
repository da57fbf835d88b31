"""The latent path (model.vae): the editor trainers, eval and inference on the latents of a
frozen diffusers AutoencoderKL, read from a tiny random one saved by diffusers."""

import json
import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from conftest import assert_sharded_close, randomized_run, tiny_editor_config  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402
from jaxedit import cli, dry_run, flops, schema, sharding, workdirs  # noqa: E402
from jaxedit.config import ConfigError  # noqa: E402
from jaxedit.models.vae import AutoencoderKL, VAEConfig, diffusers_config  # noqa: E402
from jaxedit.trainers import editor_grpo, editor_opd, editor_sft  # noqa: E402
from jaxedit.train import setup as setup_lib
from jaxedit import editing

# 2x downsampling to 4 channels, no quant convs (as FLUX's).
VAE = {"latent_channels": 4, "block_out_channels": (8, 16), "layers_per_block": 1,
       "norm_num_groups": 4}
SHIFT, SCALE = 0.2, 1.7  # the folder's; the codec must use them, not FLUX's defaults


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
  torch.manual_seed(0)
  cfg = VAEConfig(**VAE, shift_factor=SHIFT, scaling_factor=SCALE)
  model = diffusers.AutoencoderKL(**diffusers_config(cfg)).eval()
  with torch.no_grad():  # random everywhere (zero-initialised biases would hide bugs)
    for p in model.parameters():
      p.copy_(torch.randn_like(p) * 0.2)
  path = str(tmp_path_factory.mktemp("vae"))
  model.save_pretrained(path, safe_serialization=True)
  return path, model


def latent_config(data_dir, vae_path, **train):
  config = tiny_editor_config(data_dir, **train)
  config.model.vae.enabled, config.model.vae.init_from = True, vae_path
  for k, v in VAE.items():
    config.model.vae[k] = v
  config.model.patch_size = 4  # 16x16 latents -> 4x4 tokens, as the pixel editor's 32 / 8
  return config


def source_images(setup, n=8):
  return editing.eval_batches(setup, "train", ("atomic",), n, n)[0][0]


def test_codec_equals_diffusers(small_data_dir, vae_dir, tmp_path):
  path, model = vae_dir
  setup = editor_sft.make_setup(latent_config(small_data_dir, path), str(tmp_path))
  assert setup.model.cfg.image_size == 16 and setup.model.cfg.channels == 4
  images = source_images(setup)["source_image"]
  latents = np.asarray(jax.jit(lambda c, x: c.encode(x))(setup.codec, images))
  assert (setup.codec.vae.shift_factor, setup.codec.vae.scaling_factor) == (SHIFT, SCALE)
  with torch.no_grad():
    x = torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0).permute(0, 3, 1, 2)
    mean = model.encode(x).latent_dist.mode()
    want = ((mean - SHIFT) * SCALE).permute(0, 2, 3, 1).numpy()
    decoded = model.decode(torch.from_numpy(want).permute(0, 3, 1, 2) / SCALE + SHIFT).sample
  assert latents.shape == (8, 16, 16, 4)
  assert np.abs(latents - want).max() <= 1e-5 * np.abs(want).max()
  want_pixels = torch.clamp(torch.round((decoded.permute(0, 2, 3, 1) + 1) * 127.5), 0,
                            255).numpy()
  pixels = np.asarray(jax.jit(lambda c, z: c.decode(z))(setup.codec, want))
  assert pixels.dtype == np.uint8 and pixels.shape == images.shape
  off = np.abs(pixels.astype(int) - want_pixels.astype(int))
  assert off.max() <= 1 and (off > 0).mean() < 0.01  # float32 rounding at level edges


def test_latent_step_on_eight_devices_matches_one(small_data_dir, vae_dir, tmp_path):
  path, _ = vae_dir
  one = editor_sft.make_setup(latent_config(small_data_dir, path), str(tmp_path),
                              devices=jax.devices()[:1])
  config8 = latent_config(small_data_dir, path)
  config8.mesh.shape = (2, 2, 2)
  config8.flow.changed_weight = one.config.flow.changed_weight = 3.0  # weights from pixels
  eight = editor_sft.make_setup(config8, str(tmp_path))
  state1 = setup_lib.init_state(one)
  state8 = jax.device_put(jax.device_get(state1), eight.state_shardings)
  batch = source_images(one)
  out = []
  for setup, state in ((one, state1), (eight, state8)):
    new, metrics = editor_sft.make_train_step(setup)(
        state, sharding.global_batch(batch, setup.batch_sharding))
    out.append((jax.device_get(metrics), jax.device_get(new.params)))
  (m1, p1), (m8, p8) = out
  assert np.isfinite(m1["loss"]) and m1["grounding_loss"] > 0
  for k in m1:
    assert_sharded_close(m1[k], m8[k], rtol=1e-5, atol=1e-7, err_msg=k)
  assert_sharded_close(p1, p8, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def latent_sft(small_data_dir, vae_dir, tmp_path_factory):
  """(config, workdir) of a 2-step editor SFT run on the VAE's latents."""
  workdir = str(tmp_path_factory.mktemp("latent_sft"))
  config = latent_config(small_data_dir, vae_dir[0], num_steps=2, checkpoint_every=0)
  editor_sft.train(config, workdir)
  return config, workdir


def test_sft_grpo_opd_eval_and_edit_on_latents(latent_sft, vae_dir, tmp_path):
  path, _ = vae_dir
  config, sft_dir = latent_sft
  summary = editor_sft.run_eval(config, sft_dir)
  assert 0.0 <= summary["edit_success"] <= 1.0
  assert os.path.exists(os.path.join(sft_dir, "eval", "edits.png"))

  loaded = workdirs.load_editor(sft_dir, batch_size=8)
  sources = source_images(loaded.setup, 3)["source_image"][:3]
  edited = loaded(sources, ["remove the red circle"] * 3, seed=0)
  assert edited.shape == (3, 32, 32, 3) and edited.dtype == np.uint8

  for trainer, section, c in ((editor_grpo, "grpo", schema.editor_grpo()),
                              (editor_opd, "opd", schema.editor_opd())):
    for key in ("data", "tokenizer", "model", "sample"):
      c[key] = config[key]
    c.init_from = sft_dir
    if section == "opd":
      c.opd.teachers.colour = c.opd.teachers.geometry = sft_dir
    c.model.vae.init_from = ""  # a run must name its VAE ...
    workdir = str(tmp_path / section)
    with pytest.raises(ConfigError, match="model.vae.init_from"):
      trainer.train(c, workdir)
    c.model.vae.init_from = path  # ... which must be the SFT run's architecture
    r = c.rollout
    r.prompts_per_step, r.group_size, r.rollout_chunks, r.num_steps = 8, 2, 2, 3
    r.minibatches, r.inner_epochs = 2, 1
    t = c.train
    t.num_steps, t.eval_every, t.sample_every, t.checkpoint_every = 1, 0, 1, 1
    t.eval_examples, t.sample_examples, t.async_checkpoints = 8, 4, False
    c.eval.batch_size, c.eval.num_examples = 8, 8
    c.model.lora_rank = 4
    trainer.train(c, workdir)
    row = json.loads(open(os.path.join(workdir, "metrics.jsonl")).readline())
    assert np.isfinite(row["train/loss"]) and np.isfinite(row["reward/mean"]), row
    assert os.listdir(os.path.join(workdir, "samples"))


def test_vae_errors_name_the_problem(small_data_dir, vae_dir, tmp_path):
  path, _ = vae_dir
  missing = latent_config(small_data_dir, "")
  with pytest.raises(ConfigError, match="model.vae.init_from"):
    editor_sft.make_setup(missing, str(tmp_path)).codec  # noqa: B018 (reading it is lazy)
  other = latent_config(small_data_dir, path)
  other.model.vae.latent_channels = 8
  setup = editor_sft.make_setup(other, str(tmp_path))
  with pytest.raises(ConfigError, match="latent_channels = 4 there, 8 here"):
    setup.codec  # noqa: B018
  not_vae = latent_config(small_data_dir, str(tmp_path))  # a folder without a VAE
  with pytest.raises(ConfigError, match="is not a diffusers AutoencoderKL folder"):
    editor_sft.make_setup(not_vae, str(tmp_path)).codec  # noqa: B018
  # A missing tensor is named.
  broken = tmp_path / "broken"
  broken.mkdir()
  from safetensors.numpy import save_file
  tensors = load_file(os.path.join(path, "diffusion_pytorch_model.safetensors"))
  tensors.pop("decoder.conv_out.bias")
  save_file(tensors, str(broken / "diffusion_pytorch_model.safetensors"))
  with open(os.path.join(path, "config.json")) as f:
    (broken / "config.json").write_text(f.read())
  with pytest.raises(ConfigError, match="missing tensors: decoder.conv_out.bias"):
    editor_sft.make_setup(latent_config(small_data_dir, str(broken)), str(tmp_path)).codec  # noqa


def test_dry_run_compiles_the_vae_without_weights(small_data_dir, tmp_path):
  config = latent_config(small_data_dir, "")  # no VAE folder: a dry run needs no weights
  out = dry_run.main(config, str(tmp_path / "run"))
  (step,) = out["programs"]
  vae = AutoencoderKL(VAEConfig(**VAE))
  images = jax.ShapeDtypeStruct((config.train.batch_size, 32, 32, 3), np.float32)
  params = jax.eval_shape(vae.init, jax.random.key(0), images)["params"]
  encode = flops.count(lambda p, x: vae.apply({"params": p}, x,
                                              method=AutoencoderKL.encode_latents),
                       params, images)
  assert encode > 0 and step["flops"] > 2 * encode  # source and target are encoded in-step


def test_export_writes_the_vae_and_pytorch_edits_match(latent_sft, vae_dir, tmp_path):
  from jaxedit.interop import torch_editor

  run = randomized_run(latent_sft[1], str(tmp_path / "random"), editor_sft.make_setup)
  out = str(tmp_path / "diffusers")
  assert cli.main(["export", "--workdir", run, "--to", "diffusers", "--out", out,
                   "--weights", "raw"]) == 0
  assert sorted(os.listdir(os.path.join(out, "vae"))) == [
      "config.json", "diffusion_pytorch_model.safetensors"]
  # The exported VAE is the one the run read, tensor for tensor.
  want = load_file(os.path.join(vae_dir[0], "diffusion_pytorch_model.safetensors"))
  got = load_file(os.path.join(out, "vae", "diffusion_pytorch_model.safetensors"))
  assert sorted(got) == sorted(want)
  for name in want:
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)

  # A whole latent edit in PyTorch (encode, Euler loop, decode) matches jaxedit's.
  editor = torch_editor.load(out)
  assert isinstance(editor.vae, diffusers.AutoencoderKL)
  loaded = workdirs.load_editor(run, batch_size=8, weights="raw")
  batch = source_images(loaded.setup)
  rng = jax.random.key(3)
  ours = np.asarray(loaded.sampler(loaded.params, sharding.global_batch(
      batch, loaded.setup.batch_sharding), rng))
  noise = np.asarray(jax.random.normal(rng, (8, 16, 16, 4)))
  instructions = [loaded.setup.tokenizer.decode([int(i) for i, m in zip(ids, mask) if m])
                  for ids, mask in zip(batch["ids"], batch["mask"])]
  theirs = torch_editor.sample(editor, batch["source_image"], instructions, noise)
  assert ours.shape == theirs.shape == (8, 32, 32, 3)
  diff = np.abs(ours.astype(int) - theirs.astype(int))
  assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())
  assert ours.std() > 10  # the check bites: the edits are far from flat
