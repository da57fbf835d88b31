"""The AutoencoderKL equals diffusers AutoencoderKL with the same (random) weights."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from jaxedit.interop import vae_diffusers  # noqa: E402
from jaxedit.errors import MappingError  # noqa: E402
from jaxedit.models.vae import AutoencoderKL, VAEConfig, diffusers_config  # noqa: E402

B, H, W = 2, 16, 24  # non-square, so a swapped height/width shows up
# black-forest-labs/FLUX.1-dev vae/config.json
FLUX_CONFIG = {
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.30.0.dev0", "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True, "in_channels": 3, "latent_channels": 16, "latents_mean": None,
    "latents_std": None, "layers_per_block": 2, "mid_block_add_attention": True,
    "norm_num_groups": 32, "out_channels": 3, "sample_size": 1024, "scaling_factor": 0.3611,
    "shift_factor": 0.1159, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "use_post_quant_conv": False, "use_quant_conv": False,
}


def tiny(quant=True, post_quant=True, **kw):
  """Two downsamplers, channel changes (conv_shortcut) and none, FLUX's shift and scale."""
  return VAEConfig(latent_channels=4, block_out_channels=(8, 16, 16), layers_per_block=1,
                   norm_num_groups=4, use_quant_conv=quant, use_post_quant_conv=post_quant, **kw)


def torch_vae(cfg, seed=0):
  """Random values everywhere (zero or unit inits would hide bugs)."""
  torch.manual_seed(seed)
  model = diffusers.AutoencoderKL(**diffusers_config(cfg)).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(torch.randn_like(p) * 0.2)
  return model


def numpy_state(model):
  return {k: v.numpy() for k, v in model.state_dict().items()}


def template(cfg):
  x = jax.ShapeDtypeStruct((1, H, W, cfg.in_channels), jnp.float32)
  return jax.eval_shape(AutoencoderKL(cfg).init, jax.random.key(0), x)["params"]


def inputs(cfg, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.uniform(-1, 1, (B, H, W, cfg.in_channels)).astype(np.float32)
  f = cfg.downscale
  latents = rng.normal(size=(B, H // f, W // f, cfg.latent_channels)).astype(np.float32)
  return images, latents


def nchw(x):
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def nhwc(t):
  return t.numpy().transpose(0, 2, 3, 1)


def rel_err(ours, ref):
  return float(np.abs(np.asarray(ours, np.float32) - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("quant,post_quant", [(True, False), (False, True)])
def test_matches_diffusers(quant, post_quant):
  cfg = tiny(quant, post_quant)
  model = torch_vae(cfg)
  variables = {"params": vae_diffusers.from_diffusers(numpy_state(model), template(cfg))}
  vae = AutoencoderKL(cfg)
  images, latents = inputs(cfg)
  mean, logvar = vae.apply(variables, images, method=AutoencoderKL.encode)
  decoded = vae.apply(variables, latents, method=AutoencoderKL.decode)
  with torch.no_grad():
    posterior = model.encode(nchw(images)).latent_dist
    ref_decoded = model.decode(nchw(latents)).sample
  errors = {"mean": rel_err(mean, nhwc(posterior.mean)),
            "logvar": rel_err(logvar, nhwc(posterior.logvar)),
            "decode": rel_err(decoded, nhwc(ref_decoded))}
  print(f"quant={quant} post_quant={post_quant} max relative errors: {errors}")
  assert decoded.shape == (B, H, W, cfg.out_channels)
  assert all(e < 1e-5 for e in errors.values()), errors


def test_normalised_latents():
  """(z - shift) * scale and back, as diffusers' Flux pipelines compute them."""
  cfg = tiny(quant=False, post_quant=False)
  variables = {"params": vae_diffusers.from_diffusers(numpy_state(torch_vae(cfg)), template(cfg))}
  vae = AutoencoderKL(cfg)
  images, _ = inputs(cfg)
  mean, logvar = vae.apply(variables, images, method=AutoencoderKL.encode)
  shift, scale = cfg.shift_factor, cfg.scaling_factor
  normalised = vae.apply(variables, images, method=AutoencoderKL.encode_latents)
  np.testing.assert_allclose(normalised, (mean - shift) * scale, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(vae.apply(variables, normalised, method=AutoencoderKL.decode_latents),
                             vae.apply(variables, images), rtol=1e-5, atol=1e-5)
  key = jax.random.key(1)
  sampled = vae.apply(variables, images, key, method=AutoencoderKL.encode_latents)
  noise = (sampled / scale + shift - mean) / jnp.exp(0.5 * logvar)
  np.testing.assert_allclose(noise, jax.random.normal(key, mean.shape), rtol=1e-3, atol=1e-3)


def test_bfloat16_compute_tracks_float32():
  cfg = tiny()
  variables = {"params": vae_diffusers.from_diffusers(numpy_state(torch_vae(cfg)), template(cfg))}
  images, _ = inputs(cfg)
  ref = AutoencoderKL(cfg).apply(variables, images)
  bf16 = AutoencoderKL(dataclasses.replace(cfg, dtype=jnp.bfloat16))
  ours = jax.jit(bf16.apply)(variables, images)
  assert ours.dtype == jnp.bfloat16
  assert rel_err(ours, np.asarray(ref)) < 5e-2


def test_state_dict_round_trip_and_strict_load():
  cfg = tiny()
  state = numpy_state(torch_vae(cfg))
  back = vae_diffusers.to_diffusers(vae_diffusers.from_diffusers(state, template(cfg)))
  assert back.keys() == state.keys()
  for name, value in state.items():
    assert back[name].dtype == value.dtype and np.array_equal(back[name], value), name

  # Our parameter tree, as init would build it, loads strictly (names and shapes).
  params = jax.tree.map(lambda s: np.ones(s.shape, s.dtype), template(cfg))
  fresh = diffusers.AutoencoderKL(**diffusers_config(cfg))
  fresh.load_state_dict({k: torch.from_numpy(v)
                         for k, v in vae_diffusers.to_diffusers(params).items()}, strict=True)


def test_mapping_error_names_every_bad_tensor():
  cfg = tiny()
  state = numpy_state(torch_vae(cfg))
  missing = "decoder.up_blocks.0.upsamplers.0.conv.weight"
  extra = "encoder.mid_block.attentions.0.to_out.1.weight"
  reshaped = "encoder.down_blocks.1.resnets.0.conv_shortcut.weight"
  del state[missing]
  state[extra] = np.zeros(3, np.float32)
  state[reshaped] = state[reshaped].reshape(16, 8)
  with pytest.raises(MappingError) as info:
    vae_diffusers.from_diffusers(state, template(cfg))
  message = str(info.value)
  assert f"missing tensors: {missing}" in message
  assert f"unexpected tensors: {extra}" in message
  assert f"tensor {reshaped} has shape (16, 8), expected (16, 8, 1, 1)" in message


@pytest.mark.parametrize("cfg", [VAEConfig(), tiny(False, True)])
def test_config_round_trip(cfg):
  assert VAEConfig.from_diffusers_config(diffusers_config(cfg)) == cfg


def test_flux_config():
  assert VAEConfig.from_diffusers_config(FLUX_CONFIG) == VAEConfig()
  assert VAEConfig.from_diffusers_config(FLUX_CONFIG, dtype=jnp.bfloat16).dtype == jnp.bfloat16
  assert VAEConfig().downscale == 8
  # Keys a config.json leaves out take diffusers' defaults; shift_factor None means 0.
  cfg = VAEConfig.from_diffusers_config({"block_out_channels": [8, 16],
                                         "down_block_types": ["DownEncoderBlock2D"] * 2,
                                         "up_block_types": ["UpDecoderBlock2D"] * 2})
  assert (cfg.latent_channels, cfg.shift_factor, cfg.use_quant_conv) == (4, 0.0, True)


def test_unsupported_config_is_rejected():
  config = {**FLUX_CONFIG, "up_block_types": ["AttnUpDecoderBlock2D"] * 4, "act_fn": "gelu"}
  with pytest.raises(ValueError, match="AttnUpDecoderBlock2D.*act_fn 'gelu'"):
    VAEConfig.from_diffusers_config(config)
  with pytest.raises(ValueError, match="down_block_types"):
    VAEConfig.from_diffusers_config({**FLUX_CONFIG, "block_out_channels": [128, 256, 512]})
