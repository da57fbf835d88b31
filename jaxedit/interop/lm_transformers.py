"""Parameter mapping between jaxedit's DecoderLM and transformers Qwen2ForCausalLM /
LlamaForCausalLM.

Names map one-to-one under the torch prefix `model.` (`lm_head` sits outside it); the
embedding is (vocab, hidden) on both sides. A tied model has no `lm_head` tensor; transformers
may still list one in its state dict, so loading ignores it (generic rules:
`interop.torch_names`).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from jaxedit.errors import MappingError
from jaxedit.schema import LM_ARCHITECTURE
from jaxedit.interop.torch_names import Layout, from_torch, to_torch
from jaxedit.models.lm import LMConfig

__all__ = ["ARCHITECTURE", "MappingError", "to_transformers", "from_transformers", "hf_config", "lm_config"]

ARCHITECTURE = LM_ARCHITECTURE  # the LMConfig fields a pretrained model fixes
LAYOUT = Layout(stacks=("layers",), prefix=lambda head: "" if head == "lm_head" else "model.")


def to_transformers(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Flax params (boxed or not) -> transformers state dict of numpy arrays."""
  return to_torch(LAYOUT, params)


def from_transformers(state_dict: Mapping[str, Any], template: Mapping[str, Any],
                      cfg: LMConfig) -> dict:
  """transformers state dict -> flax params shaped like `template`; MappingError names every
  missing, unexpected or mis-shaped tensor."""
  return from_torch(LAYOUT, state_dict, template, ignore=ignored(cfg))


def ignored(cfg: LMConfig):
  """Names loading may find or miss: a tied model's lm_head (transformers may list it)."""
  return lambda name: cfg.tie_embeddings and name == "lm_head.weight"


def hf_config(cfg: LMConfig, architecture: str = "qwen2", **extra) -> dict[str, Any]:
  """Keyword arguments of transformers' Qwen2Config / LlamaConfig for an LMConfig."""
  if architecture not in ("qwen2", "llama"):
    raise ValueError(f"architecture must be 'qwen2' or 'llama', got {architecture!r}")
  if architecture == "qwen2" and not cfg.qkv_bias:
    raise ValueError("Qwen2 has q/k/v biases; set qkv_bias=True or export as llama")
  kwargs = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
                num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
                head_dim=cfg.head_dim, rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_norm_eps,
                tie_word_embeddings=cfg.tie_embeddings, hidden_act="silu")
  if architecture == "llama":
    kwargs.update(attention_bias=cfg.qkv_bias, mlp_bias=False)
  return {**kwargs, **extra}


def lm_config(hf: Mapping[str, Any], **overrides) -> LMConfig:
  """An LMConfig from a transformers config dict (config.json of a Qwen2 or Llama model)."""
  model_type = hf.get("model_type", "qwen2")
  if model_type not in ("qwen2", "llama"):
    raise ValueError(f"unsupported model_type {model_type!r}; expected qwen2 or llama")
  if hf.get("mlp_bias"):
    raise ValueError("mlp_bias=True is not supported")
  rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}  # transformers 5 / 4
  if rope.get("rope_type", rope.get("type", "default")) != "default":
    raise ValueError(f"RoPE scaling {rope} is not supported (plain RoPE only)")
  if hf.get("use_sliding_window"):
    raise ValueError("sliding-window attention is not supported")
  heads = hf["num_attention_heads"]
  kwargs = dict(
      vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
      intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
      num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
      head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
      rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10_000.0))),
      rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
      qkv_bias=True if model_type == "qwen2" else bool(hf.get("attention_bias", False)),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)))
  return LMConfig(**{**kwargs, **overrides})
