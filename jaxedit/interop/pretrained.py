"""`init_from` a PyTorch-side folder: a diffusers Flux transformer (e.g. FLUX.1-Kontext-dev's
`transformer/`, or a `jaxedit export --to diffusers` folder) for the editor, a transformers
Qwen2/Llama folder (e.g. Qwen2.5's, or a `jaxedit export --to transformers` folder) or a GGUF
file (`interop.gguf_lm`) for the planner, a diffusers AutoencoderKL folder (e.g. FLUX.1's
`vae/`) for the editor's latents.

Tensors stream from safetensors straight into the run's shardings
(`torch_names.load(shardings=...)`): each process reads only the slices its devices hold.
Architecture settings that no tensor shape reveals (RoPE axes, theta, ...) are compared with
the folder's config.json, and every difference is named.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil

import jax

from jaxedit import lora
from jaxedit.config import ConfigError, plain
from jaxedit.interop import flux_diffusers, gguf_lm, lm_transformers, torch_names, vae_diffusers
from jaxedit.interop.safetensors_io import SafetensorsFolder
from jaxedit.models.vae import VAEConfig, diffusers_config
from jaxedit.text import tokenizer as tokenizer_lib

FLUX_CLASS = "FluxTransformer2DModel"
VAE_CLASS = "AutoencoderKL"
LM_TYPES = ("qwen2", "llama")
NATIVE = torch_names.Layout(stacks=(), native=True)  # jaxedit's own modules, flax names


def _config(folder: str) -> dict | None:
  path = os.path.join(folder, "config.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def required_config(folder: str, name: str = "config.json") -> dict:
  """A model folder's config.json (or `name`); ConfigError naming the folder if it is missing
  or bad."""
  path = os.path.join(folder, name)
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise ConfigError(f"{folder} has no {name}") from None
  except (OSError, ValueError) as e:
    raise ConfigError(f"cannot read {path}: {e}") from None


def folder_kind(path: str) -> str | None:
  """'diffusers' (a Flux transformer folder, or a pipeline folder holding `transformer/`),
  'transformers' (a Qwen2/Llama folder), 'gguf' (a GGUF file, or a package shipping one), or
  None (not a pretrained model: a workdir)."""
  if gguf_lm.resolve(path):
    return "gguf"
  for folder in (path, os.path.join(path, "transformer")):
    config = _config(folder) or {}
    if config.get("_class_name") == FLUX_CLASS:
      return "diffusers"
  if (_config(path) or {}).get("model_type") in LM_TYPES:
    return "transformers"
  return None


def copy_tokenizer(init_from: str, workdir: str) -> None:
  """Copies `init_from`'s tokenizer (tokenizer.json, with its tokenizer_config.json and chat
  template where it has them) into `workdir`, unless it has one: token ids must mean what
  they meant there. A GGUF file's is converted by transformers. A jaxedit workdir must have
  one; a PyTorch-side folder without one (precomputed text embeddings) leaves the run to
  train its own."""
  dst = os.path.join(workdir, "tokenizer.json")
  if not init_from or os.path.exists(dst):
    return
  path = gguf_lm.resolve(init_from)
  if path:
    scratch = os.path.join(workdir, f".tokenizer.tmp{os.getpid()}")
    gguf_lm.write_tokenizer(path, scratch)
    tokenizer_lib.copy_files(scratch, workdir)
    shutil.rmtree(scratch, ignore_errors=True)
    return
  if not os.path.exists(os.path.join(init_from, "tokenizer.json")):
    if folder_kind(init_from):
      return
    raise ConfigError(f"init_from: {init_from}/tokenizer.json does not exist; point it at an "
                      "SFT workdir, a diffusers / transformers folder or a GGUF file")
  tokenizer_lib.copy_files(init_from, workdir)


def _check_kind(path: str, kind: str) -> None:
  if folder_kind(path) != kind:
    what = {"diffusers": "a diffusers Flux transformer folder (config.json with _class_name "
                         f"{FLUX_CLASS})",
            "transformers": f"a transformers folder (config.json with model_type in {LM_TYPES}) "
                            "or a GGUF file"}
    raise ConfigError(f"init_from: {path} is not {what[kind]}")


def _flux_folder(path: str) -> str:
  return path if (_config(path) or {}).get("_class_name") == FLUX_CLASS else os.path.join(
      path, "transformer")


def _mismatch(theirs: dict, ours: dict, what: str) -> None:
  diffs = [f"{k} = {theirs[k]!r} there, {ours[k]!r} here" for k in sorted(ours)
           if k in theirs and plain(theirs[k]) != plain(ours[k])]
  if diffs:
    raise ConfigError(f"init_from: {what} differs from this run's model: " + ", ".join(diffs))


def _load_from(layout, source, label: str, abstract, **kwargs):
  """`torch_names.load` of a TensorSource into the shardings of `abstract`; a MappingError
  becomes a ConfigError naming `label` (the file)."""
  shardings = jax.tree.map(lambda x: x.sharding, abstract)
  try:
    return torch_names.load(layout, source, abstract, shardings=shardings, **kwargs)
  except torch_names.MappingError as e:
    raise ConfigError(f"init_from: {label}: {e}") from None


def _load(layout, folder: str, weights_name: str, abstract, **kwargs):
  with SafetensorsFolder(folder, weights_name) as source:
    return _load_from(layout, source, f"{folder}/{weights_name}", abstract, **kwargs)


def load_editor(path: str, abstract_params, editor_cfg) -> dict:
  """{'transformer': params[, 'text_encoder': params]} from a diffusers folder, in the
  shardings of `abstract_params`. The text encoder comes only from a jaxedit export (a
  shapes text encoder has no diffusers counterpart)."""
  _check_kind(path, "diffusers")
  folder = _flux_folder(path)
  _mismatch(_config(folder), flux_diffusers.diffusers_config(editor_cfg.flux),
            f"the Flux transformer in {folder}")
  out = {"transformer": _load(flux_diffusers.LAYOUT, folder,
                              "diffusion_pytorch_model.safetensors",
                              abstract_params["transformer"])}
  if "text_encoder" in abstract_params and os.path.exists(
      os.path.join(path, "text_encoder.safetensors")):
    out["text_encoder"] = _load(NATIVE, path, "text_encoder.safetensors",
                                abstract_params["text_encoder"])
  logging.info("initialised %s from %s", " and ".join(out), path)
  return out


def lm_architecture(path: str) -> dict | None:
  """The architecture keys of the planner's `model` section (lm_transformers.ARCHITECTURE)
  that a transformers folder's config.json or a GGUF file's metadata gives; None for
  anything else (a jaxedit workdir)."""
  kind = folder_kind(path)
  if kind not in ("transformers", "gguf"):
    return None
  hf = gguf_lm.hf_config(gguf_lm.resolve(path)) if kind == "gguf" else _config(path)
  try:
    cfg = lm_transformers.lm_config(hf)
  except ValueError as e:
    raise ConfigError(f"init_from: {path}: {e}") from None
  return {k: getattr(cfg, k) for k in lm_transformers.ARCHITECTURE}


def load_planner(path: str, abstract_params, planner_cfg) -> dict:
  """{'lm': params[, 'vision': params]} from a transformers folder or a GGUF file, in the
  shardings of `abstract_params`, without LoRA adapters (those `abstract_params` has are
  left out: they are not in the folder); the vision prefix comes only from a jaxedit
  export."""
  theirs = lm_architecture(path)
  if theirs is None:
    _check_kind(path, "transformers")  # raises, naming what init_from must be
  ours = planner_cfg.lm
  _mismatch(theirs, {k: getattr(ours, k) for k in lm_transformers.ARCHITECTURE},
            f"the language model in {path}")
  _, abstract_lm = lora.split(abstract_params["lm"])
  ignore = lm_transformers.ignored(ours)
  gguf_path = gguf_lm.resolve(path)
  if gguf_path:
    lm = _load_from(lm_transformers.LAYOUT, gguf_lm.GGUFFile(gguf_path), gguf_path,
                    abstract_lm, ignore=ignore)
  else:
    lm = _load(lm_transformers.LAYOUT, path, "model.safetensors", abstract_lm, ignore=ignore)
  out = {"lm": lm}
  if "vision" in abstract_params and os.path.exists(
      os.path.join(path, "vision_prefix.safetensors")):
    out["vision"] = _load(NATIVE, path, "vision_prefix.safetensors", abstract_params["vision"])
  logging.info("initialised %s from %s", " and ".join(out), path)
  return out


def load_vae(path: str, abstract_params, vae_cfg) -> tuple[dict, VAEConfig]:
  """(AutoencoderKL params in the shardings of `abstract_params`, `vae_cfg` with the folder's
  latent shift and scale) from a diffusers folder. The architecture settings the tensors do
  not show (quant convs, mid-block attention, ...) are compared with its config.json. The VAE
  is read whole: every device holds all of it (the codec replicates it)."""
  config = _config(path)
  if (config or {}).get("_class_name") != VAE_CLASS:
    raise ConfigError(f"model.vae.init_from: {path} is not a diffusers AutoencoderKL folder "
                      f"(config.json with _class_name {VAE_CLASS})")
  try:
    folder_cfg = VAEConfig.from_diffusers_config(config)
  except ValueError as e:
    raise ConfigError(f"model.vae.init_from: {path}: {e}") from None
  vae_cfg = dataclasses.replace(vae_cfg, shift_factor=folder_cfg.shift_factor,
                                scaling_factor=folder_cfg.scaling_factor)
  _mismatch(diffusers_config(folder_cfg), diffusers_config(vae_cfg), f"the VAE in {path}")
  weights = "diffusion_pytorch_model.safetensors"
  try:
    with SafetensorsFolder(path, weights) as source:
      state = {name: source.read(name, tuple(slice(None) for _ in source.shape(name)))
               for name in source.names()}
    params = vae_diffusers.from_diffusers(state, abstract_params)
  except torch_names.MappingError as e:
    raise ConfigError(f"model.vae.init_from: {path}/{weights}: {e}") from None
  logging.info("VAE from %s (latent shift %g, scale %g)", path, vae_cfg.shift_factor,
               vae_cfg.scaling_factor)
  return jax.tree.map(lambda x, a: jax.device_put(x, a.sharding), params,
                      abstract_params), vae_cfg
