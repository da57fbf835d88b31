"""The editor's input space: pixels in [-1, 1], or a frozen VAE's normalised latents.

With `model.vae.enabled` every editor trainer (SFT, GRPO, OPD), the sampler, eval and
`jaxedit edit` move images through a diffusers-layout AutoencoderKL: sources and targets are
encoded to latents (the posterior mean, as the Kontext pipeline conditions), the flow runs
on latents, and samples are decoded back to pixels for the detector, rewards and images.
The VAE is frozen (no gradient reaches it) and replicated, as at scale its 84M parameters
are small beside the transformer's shards.

A `Codec` is a pytree whose leaves are the VAE's parameters (the VAE's config is static), so
jitted steps take it as an ordinary argument: no weights are baked into compiled programs.
"""

from __future__ import annotations

import os
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections

from jaxedit import flow, sharding
from jaxedit.config import ConfigError
from jaxedit.interop import pretrained
from jaxedit.models.editor import uses_vae, vae_config
from jaxedit.models.vae import AutoencoderKL, VAEConfig


@flax.struct.dataclass
class Codec:
  """uint8 images <-> the editor's model space; the identity on [-1, 1] pixels when `vae`
  is None."""

  params: Any = None
  vae: VAEConfig | None = flax.struct.field(pytree_node=False, default=None)

  def encode(self, images_uint8: jax.Array) -> jax.Array:
    """(B, H, W, 3) uint8 -> float32 model-space arrays ((B, H/f, W/f, C) latents)."""
    x = flow.to_model_space(images_uint8)
    if self.vae is None:
      return x
    z = AutoencoderKL(self.vae).apply({"params": self.params}, x.astype(self.vae.dtype),
                                      method=AutoencoderKL.encode_latents)
    return jax.lax.stop_gradient(z.astype(jnp.float32))

  def decode(self, x: jax.Array) -> jax.Array:
    """Model-space arrays -> uint8 images."""
    if self.vae is not None:
      x = AutoencoderKL(self.vae).apply({"params": self.params}, x.astype(self.vae.dtype),
                                        method=AutoencoderKL.decode_latents)
    return flow.to_uint8(x.astype(jnp.float32))


def vae_folder(config: ml_collections.ConfigDict) -> str:
  """The diffusers AutoencoderKL folder of `model.vae.init_from`; when that is empty, the
  `vae/` folder of `init_from` (a diffusers pipeline folder such as FLUX.1-Kontext-dev's)."""
  path = config.model.vae.init_from
  if not path and config.get("init_from"):
    candidate = os.path.join(config.init_from, "vae")
    path = candidate if os.path.isdir(candidate) else ""
  if not path:
    raise ConfigError("model.vae.enabled needs the VAE's weights: set model.vae.init_from to "
                      "a diffusers AutoencoderKL folder (config.json and "
                      "diffusion_pytorch_model.safetensors), or init_from to a pipeline "
                      "folder with vae/")
  return path


def abstract_codec(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> Codec:
  """The run's codec with its VAE parameters as ShapeDtypeStructs replicated over `mesh`
  (to load into, or to compile against without weights: dry runs)."""
  if not uses_vae(config.model):
    return Codec()
  cfg = vae_config(config.model)
  side = 2 * cfg.downscale
  abstract = jax.eval_shape(AutoencoderKL(cfg).init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, side, side, cfg.in_channels),
                                                 jnp.float32))["params"]
  replicated = sharding.replicated(mesh)
  return Codec(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                           sharding=replicated),
                            flax.linen.unbox(abstract)), cfg)


def make_codec(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> Codec:
  """The run's codec; with a VAE its weights and its latents' shift and scale are read
  from `vae_folder(config)`, the weights replicated over `mesh`."""
  codec = abstract_codec(config, mesh)
  if codec.vae is None:
    return codec
  return Codec(*pretrained.load_vae(vae_folder(config), codec.params, codec.vae))
