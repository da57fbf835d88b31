"""`jaxedit export`: a trained editor as a diffusers Flux transformer folder, a planner as a
transformers Qwen2/Llama folder, so PyTorch users run them without jaxedit's JAX side.

    jaxedit export --workdir EDITOR_DIR  --to diffusers    --out OUT [--dtype bfloat16]
    jaxedit export --workdir PLANNER_DIR --to transformers --out OUT [--weights raw]

The editor folder loads with `FluxTransformer2DModel.from_pretrained(OUT)`; next to it go the
parts diffusers has no class for: the shapes text encoder (`text_encoder.safetensors`, flax
names and (in, out) kernels), its `tokenizer.json`, `jaxedit_editor.json` (patch size,
image size, text length, sampler settings) and, for a latent editor (model.vae), its
AutoencoderKL in `vae/`. The planner folder loads with
`AutoModelForCausalLM` and `AutoTokenizer`; its vision prefix goes to
`vision_prefix.safetensors`, described in `jaxedit_planner.json`. LoRA adapters are merged.
Only safetensors are written.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil

import flax
import jax
import numpy as np

from jaxedit import lora, workdirs
from jaxedit.config import ConfigError
from jaxedit.interop import flux_diffusers, lm_transformers, safetensors_io, vae_diffusers
from jaxedit.text import tokenizer as tokenizer_lib

TARGETS = ("diffusers", "transformers")  # editor, planner
EDITOR_META, PLANNER_META = "jaxedit_editor.json", "jaxedit_planner.json"
VAE_FOLDER = "vae"  # a latent editor's AutoencoderKL, as in diffusers pipeline folders


def _merged(params, model_config) -> dict:
  """Host numpy params gathered from every device, LoRA adapters folded into the kernels."""
  params = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), flax.linen.unbox(params))
  if model_config.lora_rank:
    alpha = model_config.get("lora_alpha") or model_config.lora_rank
    params = jax.tree.map(np.asarray, lora.merge(params, model_config.lora_rank, alpha))
  return params


def flat_names(tree) -> dict[str, np.ndarray]:
  """{'a.b.kernel': array}: jaxedit's own modules, written under their flax names."""
  return {".".join(k): np.asarray(v) for k, v in flax.traverse_util.flatten_dict(tree).items()}


def _write_json(path: str, obj) -> None:
  with open(path, "w") as f:
    json.dump(obj, f, indent=1)


def _version(package: str, default: str) -> str:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return default


def export_editor(workdir: str, out: str, dtype: str, weights: str) -> dict:
  loaded = workdirs.load_editor(workdir, batch_size=jax.device_count(), weights=weights)
  setup, config = loaded.setup, loaded.setup.config
  params = _merged(loaded.params, config.model)
  cfg = setup.model.cfg
  files = safetensors_io.write(out, "diffusion_pytorch_model.safetensors",
                               flux_diffusers.to_diffusers(params["transformer"]), dtype)
  _write_json(os.path.join(out, "config.json"), {
      "_class_name": "FluxTransformer2DModel",
      "_diffusers_version": _version("diffusers", "0.42.1"),
      **flux_diffusers.diffusers_config(cfg.flux)})
  meta = {"source_workdir": os.path.abspath(workdir), "trainer": config.trainer,
          "weights": weights, "dtype": dtype, "image_size": cfg.image_size,
          "channels": cfg.channels, "patch_size": cfg.patch_size,
          "sample": config.sample.to_dict(), "text_encoder": None, "vae": None}
  if cfg.text is not None:
    files += safetensors_io.write(out, "text_encoder.safetensors",
                                  flat_names(params["text_encoder"]), dtype)
    shutil.copyfile(os.path.join(loaded.workdir, "tokenizer.json"),
                    os.path.join(out, "tokenizer.json"))
    meta["text_encoder"] = {"vocab_size": cfg.text.vocab_size, "width": cfg.text.width,
                            "num_layers": cfg.text.num_layers, "num_heads": cfg.text.num_heads,
                            "max_len": cfg.text.max_len, "text_len": setup.text_len,
                            "layout_grid": cfg.text.layout_grid}
  if setup.codec.vae is not None:  # a latent editor: its VAE goes to vae/ as diffusers has it
    files += [f"{VAE_FOLDER}/{f}" for f in vae_diffusers.write_folder(
        os.path.join(out, VAE_FOLDER), jax.device_get(setup.codec.params), setup.codec.vae,
        dtype)]
    meta["vae"] = VAE_FOLDER
  _write_json(os.path.join(out, EDITOR_META), meta)
  return {"files": files + ["config.json", EDITOR_META], **meta}


def export_planner(workdir: str, out: str, dtype: str, weights: str) -> dict:
  loaded = workdirs.load_planner(workdir, batch_size=jax.device_count(), weights=weights)
  setup, config = loaded.setup, loaded.config
  params = _merged(loaded.params, config.model)
  cfg = setup.model.cfg
  architecture = "qwen2" if cfg.lm.qkv_bias else "llama"
  sp = setup.specials
  special = {"pad": sp.pad_id, "bos": sp.bos_id, "eos": sp.eos_id}
  files = safetensors_io.write(out, "model.safetensors",
                               lm_transformers.to_transformers(params["lm"]), dtype)
  _write_json(os.path.join(out, "config.json"), {
      "architectures": ["Qwen2ForCausalLM" if architecture == "qwen2" else "LlamaForCausalLM"],
      "model_type": architecture, "dtype": dtype,
      "transformers_version": _version("transformers", "5.0.0"),
      **lm_transformers.hf_config(cfg.lm, architecture, bos_token_id=special["bos"],
                                  eos_token_id=special["eos"], pad_token_id=special["pad"])})
  _write_json(os.path.join(out, "generation_config.json"), {
      "bos_token_id": special["bos"], "eos_token_id": special["eos"],
      "pad_token_id": special["pad"]})
  # The run's tokenizer files as they are (a pretrained one's special tokens and chat
  # template included); a run from before tokenizer_config.json was written gets the
  # shapes tokenizer's.
  tokenizer_lib.copy_files(loaded.workdir, out)
  if not os.path.exists(os.path.join(loaded.workdir, tokenizer_lib.CONFIG_FILE)):
    _write_json(os.path.join(out, tokenizer_lib.CONFIG_FILE), tokenizer_lib.SHAPES_CONFIG)
  tokenizer_files = [f for f in tokenizer_lib.FILES if os.path.exists(os.path.join(out, f))]
  meta = {"source_workdir": os.path.abspath(workdir), "trainer": config.trainer,
          "weights": weights, "dtype": dtype, "architecture": architecture,
          # The whole prompt text (chat template or BOS included), tokenized as it is.
          "prompt_template": setup.prompt_text("{instruction}", "{scene}"),
          "scene_as_text": bool(config.prompt.scene_as_text),
          "max_plan_len": config.prompt.max_plan_len, "vision": None}
  if cfg.vision is not None:
    files += safetensors_io.write(out, "vision_prefix.safetensors",
                                  flat_names(params["vision"]), dtype)
    meta["vision"] = {"image_size": cfg.vision.image_size, "patch_size": cfg.vision.patch_size,
                      "width": cfg.vision.width, "num_tokens": cfg.vision.num_tokens}
  _write_json(os.path.join(out, PLANNER_META), meta)
  return {"files": files + ["config.json", "generation_config.json", *tokenizer_files,
                            PLANNER_META], **meta}


def export(workdir: str, to: str, out: str, dtype: str = "float32",
           weights: str = "eval") -> dict:
  """Writes the model of `workdir` to `out` in the `to` format; returns a manifest."""
  if to not in TARGETS:
    raise ConfigError(f"--to must be one of {sorted(TARGETS)}, got {to!r}")
  if dtype not in safetensors_io.DTYPES:
    raise ConfigError(f"--dtype must be one of {sorted(safetensors_io.DTYPES)}, got {dtype!r}")
  os.makedirs(out, exist_ok=True)
  if to == "diffusers":
    return export_editor(workdir, out, dtype, weights)
  return export_planner(workdir, out, dtype, weights)
