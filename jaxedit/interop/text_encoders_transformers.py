"""FLUX.1's text encoders from a diffusers pipeline folder: configs and weights of
transformers `CLIPTextModel` (`text_encoder/`) and `T5EncoderModel` (`text_encoder_2/`) into
jaxedit's `models.text_encoders`, and `FluxTextEncoders`, which tokenizes with the folder's
own tokenizers and encodes prompts as `FluxPipeline.encode_prompt` does.

    encoders = FluxTextEncoders.from_pipeline("FLUX.1-Kontext-dev", mesh, rules, "bfloat16")
    out = encoders.encode(["make every red shape blue"])  # context (B, 512, 4096), pooled

Names (generic rules: `interop.torch_names`): T5's block parts are renamed
(`attention -> layer.0.SelfAttention`, `ffn -> layer.1.DenseReluDense`, ...) and its relative
position bias, which only block 0 holds, is a top-level flax module. Checkpoints name the
tied T5 embedding `shared.weight`, `encoder.embed_tokens.weight` or both; CLIP checkpoints
written by transformers 4 (FLUX.1's) prefix every name with `text_model.`, transformers 5
does not. Loading takes either.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxedit import schema, sharding
from jaxedit.config import ConfigError
from jaxedit.errors import MappingError
from jaxedit.interop import pretrained, torch_names
from jaxedit.interop.safetensors_io import SafetensorsFolder
from jaxedit.models.text_encoders import (CLIP_ACTIVATIONS, T5_ACTIVATIONS, CLIPTextConfig,
                                          CLIPTextModel, T5Encoder, T5EncoderConfig)

__all__ = ["T5_LAYOUT", "CLIP_LAYOUT", "t5_config", "clip_config", "load_t5", "load_clip",
           "FluxTextEncoders"]

T5_LAYOUT = torch_names.Layout(
    stacks=("block",),
    renames={"attention": "layer.0.SelfAttention", "attention_norm": "layer.0.layer_norm",
             "ffn": "layer.1.DenseReluDense", "ffn_norm": "layer.1.layer_norm"},
    prefix=lambda head: {"shared": "",
                         "relative_attention_bias": "encoder.block.0.layer.0.SelfAttention."
                         }.get(head, "encoder."))
CLIP_LAYOUT = torch_names.Layout(
    stacks=("layers",),
    prefix=lambda head: "encoder." if re.fullmatch(r"layers(_\d+)?", head) else "")
T5_EMBED, T5_EMBED_ALIAS = "shared.weight", "encoder.embed_tokens.weight"
CLIP_PREFIX = "text_model."  # transformers 4's CLIPTextModel names
CLIP_POSITION_IDS = "embeddings.position_ids"  # a buffer old checkpoints saved
WEIGHTS = "model.safetensors"
# FluxPipeline's subfolders and what each holds.
SUBFOLDERS = {"text_encoder": "CLIPTextModel", "text_encoder_2": "T5EncoderModel",
              "tokenizer": "CLIP tokenizer", "tokenizer_2": "T5 tokenizer"}
MAX_SEQUENCE_LENGTH = 512  # FluxPipeline.check_inputs refuses longer T5 sequences


def t5_config(hf: Mapping[str, Any], **overrides) -> T5EncoderConfig:
  """A T5EncoderConfig from a transformers T5Config dict (config.json); ConfigError naming
  the key of what the model does not implement. The FFN follows `feed_forward_proj` as
  transformers derives it: "gated-ACT" (v1.1; "gated-gelu" is gelu_new) or "ACT" (v1.0)."""
  if hf.get("model_type") != "t5":
    raise ConfigError(f"model_type is {hf.get('model_type')!r}; expected 't5'")
  if hf.get("is_decoder"):
    raise ConfigError("is_decoder is true; only the (bidirectional) encoder is supported")
  proj = hf.get("feed_forward_proj", "relu")
  kind, _, act = proj.rpartition("-")
  if kind not in ("", "gated"):
    raise ConfigError(f"feed_forward_proj {proj!r} is not supported: 'gated-ACT' or 'ACT'")
  act = "gelu_new" if proj == "gated-gelu" else act
  if act not in T5_ACTIVATIONS:
    raise ConfigError(f"feed_forward_proj {proj!r}: activation {act!r} is not supported "
                      f"(supported: {sorted(T5_ACTIVATIONS)})")
  kwargs = {k: hf[k] for k in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers",
                               "num_heads", "relative_attention_num_buckets",
                               "relative_attention_max_distance", "layer_norm_epsilon")
            if k in hf}
  return T5EncoderConfig(**{**kwargs, "dense_act_fn": act, "is_gated_act": kind == "gated",
                            **overrides})


def clip_config(hf: Mapping[str, Any], **overrides) -> CLIPTextConfig:
  """A CLIPTextConfig from a transformers CLIPTextConfig dict (config.json); ConfigError
  naming the key of what the model does not implement."""
  if hf.get("model_type") != "clip_text_model":
    raise ConfigError(f"model_type is {hf.get('model_type')!r}; expected 'clip_text_model' "
                      "(a CLIPTextModel folder)")
  act = hf.get("hidden_act", "quick_gelu")
  if act not in CLIP_ACTIVATIONS:
    raise ConfigError(f"hidden_act {act!r} is not supported (supported: "
                      f"{sorted(CLIP_ACTIVATIONS)})")
  eos = hf.get("eos_token_id", 2)
  if not isinstance(eos, int):
    raise ConfigError(f"eos_token_id must be one id for the pooled position, got {eos!r}")
  kwargs = {k: hf[k] for k in ("vocab_size", "hidden_size", "intermediate_size",
                               "num_hidden_layers", "num_attention_heads",
                               "max_position_embeddings", "layer_norm_eps") if k in hf}
  return CLIPTextConfig(**{**kwargs, "hidden_act": act, "eos_token_id": eos, **overrides})


class Renamed:
  """A TensorSource showing `source`'s tensors under `rename(name)`."""

  def __init__(self, source: torch_names.TensorSource, rename: Callable[[str], str]):
    self._source = source
    self._names = {rename(name): name for name in source.names()}

  def names(self) -> set[str]:
    return set(self._names)

  def shape(self, name: str) -> tuple[int, ...]:
    return self._source.shape(self._names[name])

  def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
    return self._source.read(self._names[name], index)


def _load(folder: str, layout, template, shardings, rename: Callable[[set], Callable[[str], str]],
          ignore: Callable[[str], bool]) -> dict:
  """Params shaped like `template` from `folder`'s safetensors, as `torch_names.load` reads
  them (into `shardings`, or numpy without); `rename(names)` maps the checkpoint's names
  onto the layout's."""
  try:
    with SafetensorsFolder(folder, WEIGHTS) as source:
      renamed = Renamed(source, rename(source.names()))
      return torch_names.load(layout, renamed, template, shardings=shardings, ignore=ignore)
  except MappingError as e:
    raise ConfigError(f"{folder}: {e}") from None


def load_t5(folder: str, template, shardings=None) -> dict:
  """T5Encoder params shaped like `template` from a T5EncoderModel folder."""
  def rename(names):
    alias = T5_EMBED not in names  # the embedding only under the encoder's name
    return lambda name: T5_EMBED if alias and name == T5_EMBED_ALIAS else name
  return _load(folder, T5_LAYOUT, template, shardings, rename,
               ignore=lambda name: name == T5_EMBED_ALIAS)


def load_clip(folder: str, template, shardings=None) -> dict:
  """CLIPTextModel params shaped like `template` from a CLIPTextModel folder."""
  return _load(folder, CLIP_LAYOUT, template, shardings,
               lambda names: lambda name: name.removeprefix(CLIP_PREFIX),
               ignore=lambda name: name == CLIP_POSITION_IDS)


def _template(model: nn.Module, mesh, axis_rules):
  """(`model`'s params as boxed ShapeDtypeStructs, their NamedShardings under the rules)."""
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                            jnp.zeros((1, 1), jnp.int32))["params"])
  return boxed, sharding.logical_shardings(boxed, mesh, axis_rules)


class FluxTextEncoders:
  """FLUX.1's CLIP and T5 encoders with the pipeline's tokenizers, jitted on a mesh: params
  sharded by the logical rules, prompts split over the axes `batch` maps to."""

  def __init__(self, clip: CLIPTextModel, clip_params, t5: T5Encoder, t5_params,
               clip_tokenizer, t5_tokenizer, mesh, axis_rules,
               max_sequence_length: int = MAX_SEQUENCE_LENGTH):
    if max_sequence_length > MAX_SEQUENCE_LENGTH:
      raise ValueError(f"max_sequence_length cannot be greater than {MAX_SEQUENCE_LENGTH} "
                       f"(FluxPipeline's limit), got {max_sequence_length}")
    self.clip, self.clip_params = clip, clip_params
    self.t5, self.t5_params = t5, t5_params
    self.clip_tokenizer, self.t5_tokenizer = clip_tokenizer, t5_tokenizer
    self.mesh, self.axis_rules = mesh, axis_rules
    self.max_sequence_length = max_sequence_length
    self.clip_length = clip_tokenizer.model_max_length  # FluxPipeline's tokenizer_max_length
    self._batch = sharding.batch_sharding(mesh, axis_rules)
    self._rows = math.prod(mesh.shape[a] for a in jax.tree.leaves(tuple(self._batch.spec)))
    self._pooled = jax.jit(lambda p, ids: clip.apply({"params": p}, ids)[1])
    self._context = jax.jit(lambda p, ids: t5.apply({"params": p}, ids))

  @classmethod
  def from_pipeline(cls, pipeline_dir: str, mesh=None, axis_rules=None, dtype=jnp.float32,
                    param_dtype=None, max_sequence_length: int = MAX_SEQUENCE_LENGTH,
                    scan_layers: bool = True) -> "FluxTextEncoders":
    """Both encoders of a diffusers FLUX pipeline folder, weights streamed into the
    shardings of `mesh` (None: one device) under `axis_rules` (None: the project's,
    schema.mesh()). `dtype` computes, `param_dtype` (None: `dtype`) holds the weights."""
    import transformers  # only here: the models need no tokenizers

    for sub, what in SUBFOLDERS.items():
      if not os.path.isdir(os.path.join(pipeline_dir, sub)):
        raise ConfigError(f"{pipeline_dir} has no {sub}/ ({what}); a FLUX pipeline folder "
                          f"holds {', '.join(s + '/' for s in SUBFOLDERS)}")
    if mesh is None:
      mesh = sharding.make_mesh(("data", "fsdp", "tensor"), (1, 1, 1), jax.devices()[:1])
    axis_rules = sharding.rules(schema.mesh()) if axis_rules is None else axis_rules
    settings = dict(dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(param_dtype or dtype),
                    scan_layers=scan_layers)
    clip_dir, t5_dir = (os.path.join(pipeline_dir, s) for s in ("text_encoder", "text_encoder_2"))
    try:
      clip_cfg = clip_config(pretrained.required_config(clip_dir), **settings)
      t5_cfg = t5_config(pretrained.required_config(t5_dir), **settings)
    except ConfigError as e:
      raise ConfigError(f"{pipeline_dir}: {e}") from None
    clip, t5 = CLIPTextModel(clip_cfg), T5Encoder(t5_cfg)
    clip_params = load_clip(clip_dir, *_template(clip, mesh, axis_rules))
    t5_params = load_t5(t5_dir, *_template(t5, mesh, axis_rules))
    tokenizers = [transformers.AutoTokenizer.from_pretrained(os.path.join(pipeline_dir, s))
                  for s in ("tokenizer", "tokenizer_2")]
    return cls(clip, clip_params, t5, t5_params, *tokenizers, mesh, axis_rules,
               max_sequence_length)

  def tokenize(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(CLIP ids (B, 77), T5 ids (B, max_sequence_length)) int32, as FluxPipeline's
    _get_clip_prompt_embeds / _get_t5_prompt_embeds tokenize: padded to the maximum length,
    truncated beyond it."""
    ids = lambda tokenizer, length: np.asarray(tokenizer(
        list(prompts), padding="max_length", max_length=length, truncation=True,
        return_tensors="np").input_ids, np.int32)
    return (ids(self.clip_tokenizer, self.clip_length),
            ids(self.t5_tokenizer, self.max_sequence_length))

  def encode(self, prompts: list[str]) -> dict[str, np.ndarray]:
    """{"context": T5 last hidden state (B, max_sequence_length, d_t5), "pooled": CLIP
    pooler output (B, d_clip)}, float32 host arrays: FluxPipeline.encode_prompt's
    prompt_embeds and pooled_prompt_embeds (no attention mask, as it passes none)."""
    clip_ids, t5_ids = self.tokenize(prompts)
    n = len(prompts)
    rows = -(-n // self._rows) * self._rows  # whole shards: pad by repeating the last row
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.axis_rules):
      ids = sharding.global_from_full({"clip": sharding.pad_rows(clip_ids, rows),
                                       "t5": sharding.pad_rows(t5_ids, rows)}, self._batch)
      pooled = self._pooled(self.clip_params, ids["clip"])
      context = self._context(self.t5_params, ids["t5"])
    return {"context": np.asarray(sharding.to_host(context), np.float32)[:n],
            "pooled": np.asarray(sharding.to_host(pooled), np.float32)[:n]}
