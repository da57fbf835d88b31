"""Encoders the data job runs once so that training never does (as DanceGRPO, Flow-Factory and
maxdiffusion cache): the pipeline's VAE (source and target latents, the posterior mean
normalised with the folder's shift and scale) and its text encoders (the T5 sequence and
the CLIP pooled embedding of each instruction).

Each process encodes its own shards on a mesh of its own devices (`jax.local_devices()`), so
processes never wait on each other's collectives and a process may hold more shards than
another; weights are sharded over that local mesh by the logical axis rules.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Sequence

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxedit import sharding
from jaxedit.codec import Codec
from jaxedit.config import ConfigError
from jaxedit.interop import pretrained
from jaxedit.models.vae import AutoencoderKL, VAEConfig

STORAGE_DTYPES = {"float32": np.float32, "bfloat16": jnp.bfloat16}
LATENT_FIELDS = {"source_image": "source_latents", "target_image": "target_latents"}
TEXT_FIELDS = ("context", "pooled")


def _file_digest(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()[:16]


def settings(encode: ml_collections.ConfigDict) -> dict:
  """What the cached arrays depend on (part of the records' fingerprint): which encoders,
  their folders' configs, sequence length and storage dtype."""
  if not encode.pipeline:
    return {}
  out = {"dtype": encode.dtype, "vae": encode.vae, "text": encode.text,
         "max_sequence_length": encode.max_sequence_length}
  for sub in ("vae",) * encode.vae + ("text_encoder", "text_encoder_2") * encode.text:
    out[sub] = _file_digest(os.path.join(encode.pipeline, sub, "config.json"))
  return out


class Encoders:
  """Adds cached arrays to records: `encoders(records)` -> the same records with latents
  and / or text embeddings, computed in fixed-size batches on this process's devices."""

  def __init__(self, encode: ml_collections.ConfigDict, mesh_config: ml_collections.ConfigDict):
    if encode.dtype not in STORAGE_DTYPES:
      raise ConfigError(f"encode.dtype must be one of {sorted(STORAGE_DTYPES)}, "
                        f"got {encode.dtype!r}")
    if encode.batch_size < 1:
      raise ConfigError("config key 'encode.batch_size' must be >= 1")
    if not os.path.isdir(encode.pipeline):
      raise ConfigError(f"encode.pipeline: {encode.pipeline} is not a folder (a diffusers "
                        "FLUX.1-Kontext pipeline folder: vae/, text_encoder/, ...)")
    self.mesh = sharding.make_mesh(mesh_config.axes, mesh_config.shape, jax.local_devices())
    self.rules = sharding.rules(mesh_config)
    self._batch = sharding.batch_sharding(self.mesh, self.rules)
    rows = self._batch.mesh.shape
    self.batch_size = _round_up(encode.batch_size, _batch_ways(self._batch, rows))
    self.storage = STORAGE_DTYPES[encode.dtype]
    self.codec = self._load_vae(os.path.join(encode.pipeline, "vae")) if encode.vae else None
    self.text = self._load_text(encode) if encode.text else None
    if self.codec is not None:
      self._encode_images = jax.jit(lambda codec, x: codec.encode(x),
                                    out_shardings=sharding.replicated(self.mesh))

  def _load_vae(self, folder: str) -> Codec:
    cfg = VAEConfig.from_diffusers_config(pretrained.required_config(folder))
    side = 2 * cfg.downscale
    abstract = jax.eval_shape(AutoencoderKL(cfg).init, jax.random.key(0),
                              jax.ShapeDtypeStruct((1, side, side, cfg.in_channels),
                                                   jnp.float32))["params"]
    replicated = sharding.replicated(self.mesh)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                           sharding=replicated),
                            flax.linen.unbox(abstract))
    return Codec(*pretrained.load_vae(folder, abstract, cfg))

  def _load_text(self, encode: ml_collections.ConfigDict):
    from jaxedit.interop.text_encoders_transformers import FluxTextEncoders

    return FluxTextEncoders.from_pipeline(encode.pipeline, mesh=self.mesh,
                                          axis_rules=self.rules,
                                          max_sequence_length=encode.max_sequence_length)

  def _padded(self, arrays: np.ndarray) -> tuple[jax.Array, int]:
    n = len(arrays)
    pad = np.zeros((self.batch_size - n, *arrays.shape[1:]), arrays.dtype)
    return jax.device_put(np.concatenate([arrays, pad]), self._batch), n

  def latents(self, images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, 3) of one bucket -> normalised latents (N, H/f, W/f, C)."""
    out = []
    for start in range(0, len(images), self.batch_size):
      x, n = self._padded(images[start:start + self.batch_size])
      out.append(np.asarray(self._encode_images(self.codec, x))[:n])
    return np.concatenate(out).astype(self.storage)

  def __call__(self, records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    records = [dict(r) for r in records]
    if not records:
      return records
    if self.codec is not None:
      for image_key, latent_key in LATENT_FIELDS.items():
        have = [i for i, r in enumerate(records) if r[image_key].size]
        if have:
          latents = self.latents(np.stack([records[i][image_key] for i in have]))
          for i, z in zip(have, latents):
            records[i][latent_key] = z
    if self.text is not None:
      instructions = [r["instruction"] for r in records]
      embeddings = {k: [] for k in TEXT_FIELDS}
      for start in range(0, len(instructions), self.batch_size):
        out = self.text.encode(instructions[start:start + self.batch_size])
        for k in TEXT_FIELDS:
          embeddings[k].append(np.asarray(out[k]))
      for k in TEXT_FIELDS:
        for r, value in zip(records, np.concatenate(embeddings[k]).astype(self.storage)):
          r[k] = value
    return records


def _batch_ways(batch: jax.sharding.NamedSharding, mesh_shape) -> int:
  axes = batch.spec[0] if batch.spec else None
  axes = (axes,) if isinstance(axes, str) else (axes or ())
  return int(np.prod([mesh_shape[a] for a in axes])) if axes else 1


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple
