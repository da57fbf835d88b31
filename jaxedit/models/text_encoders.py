"""FLUX.1's text encoders: the T5 v1.1 encoder (`text_encoder_2`, its hidden states are the
transformer's context) and the CLIP text model (`text_encoder`, its pooled output is the
pooled projection).

Parameters and maths map one-to-one onto transformers `T5EncoderModel` and `CLIPTextModel`
(`jaxedit.interop.text_encoders_transformers` holds the names). Every parameter carries
logical axis names, so a T5-XXL (4.7B) shards over fsdp and tensor; the layer stacks can be
scanned and rematerialised. Norms run in float32.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxedit.models.layers import RMSNorm, attention, dense, embed_lookup, stack

Dtype = Any
ACTIVATION = ("activation_batch", "activation_length", "activation_embed")


def quick_gelu(x: jax.Array) -> jax.Array:
  return x * jax.nn.sigmoid(1.702 * x)


# transformers' ACT2FN names -> functions, for the activations each model supports.
T5_ACTIVATIONS = {"gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
                  "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
                  "gelu": lambda x: jax.nn.gelu(x, approximate=False),
                  "relu": jax.nn.relu, "silu": jax.nn.silu}
CLIP_ACTIVATIONS = {"quick_gelu": quick_gelu,
                    "gelu": lambda x: jax.nn.gelu(x, approximate=False)}


def _check_activation(act: str, supported: dict, model: str) -> None:
  if act not in supported:
    raise ValueError(f"{model} activation must be one of {sorted(supported)}, got {act!r}")


@dataclasses.dataclass(frozen=True)
class T5EncoderConfig:
  """Defaults are T5 v1.1 XXL's encoder (FLUX.1's text_encoder_2); field names are
  transformers' T5Config's. The FFN is gated (v1.1) or not (v1.0, transformers' default)."""

  vocab_size: int = 32_128
  d_model: int = 4096
  d_kv: int = 64
  d_ff: int = 10_240
  num_layers: int = 24
  num_heads: int = 64
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  dense_act_fn: str = "gelu_new"
  is_gated_act: bool = True
  dtype: Dtype = jnp.float32  # compute
  param_dtype: Dtype = jnp.float32
  scan_layers: bool = True
  remat_policy: str = "none"

  def __post_init__(self):
    _check_activation(self.dense_act_fn, T5_ACTIVATIONS, "T5")

  @property
  def inner_dim(self) -> int:
    return self.num_heads * self.d_kv


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """Defaults are CLIP ViT-L/14's text model (FLUX.1's text_encoder); field names are
  transformers' CLIPTextConfig's. `eos_token_id` picks the pooled position: 2 (the value of
  checkpoints older than transformers PR #24773, FLUX.1's included) means the largest id of
  each row, any other value its first occurrence."""

  vocab_size: int = 49_408
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  eos_token_id: int = 2
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  scan_layers: bool = True
  remat_policy: str = "none"

  def __post_init__(self):
    _check_activation(self.hidden_act, CLIP_ACTIVATIONS, "CLIP")
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of "
                       f"num_attention_heads {self.num_attention_heads}")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads


def embedding(cfg, num: int, features: int, axes: tuple, name: str) -> nn.Embed:
  return nn.Embed(num, features, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name,
                  embedding_init=nn.with_logical_partitioning(nn.initializers.normal(1.0), axes))


# ------------------------------------------------------------------------------------------
# T5.
# ------------------------------------------------------------------------------------------
def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
  """(length, length) bucket of key position minus query position, bidirectional (the
  encoder's): transformers' T5Attention._relative_position_bucket, computed in numpy at
  trace time with its float32 log so every boundary falls where torch puts it."""
  relative = np.arange(length)[None, :] - np.arange(length)[:, None]
  half = num_buckets // 2
  buckets = (relative > 0).astype(np.int64) * half
  distance = np.abs(relative)
  max_exact = half // 2
  # Distances under max_exact are exact; clamping them keeps the log finite where unused.
  ratio = np.maximum(distance, max_exact).astype(np.float32) / np.float32(max_exact)
  large = max_exact + (np.log(ratio) / np.float32(math.log(max_distance / max_exact))
                       * np.float32(half - max_exact)).astype(np.int64)
  large = np.minimum(large, half - 1)
  return buckets + np.where(distance < max_exact, distance, large)


class T5Attention(nn.Module):
  """Self-attention without 1/sqrt(d) scaling, plus the shared relative position bias."""

  cfg: T5EncoderConfig

  @nn.compact
  def __call__(self, x, bias, mask):
    cfg = self.cfg
    b, s, _ = x.shape
    q, k, v = (dense(cfg, cfg.inner_dim, ("embed", "heads"), name, use_bias=False)(x)
               .reshape(b, s, cfg.num_heads, cfg.d_kv) for name in ("q", "k", "v"))
    logits = jnp.einsum("bqnh,bknh->bnqk", q, k).astype(jnp.float32) + bias
    if mask is not None:
      logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bnqk,bknh->bqnh", probs, v).reshape(b, s, cfg.inner_dim)
    return dense(cfg, cfg.d_model, ("heads", "embed"), "o", use_bias=False)(out)


class T5FFN(nn.Module):
  """wo(act(wi_0(x)) * wi_1(x)) when gated (v1.1), else wo(act(wi(x)))."""

  cfg: T5EncoderConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    act = T5_ACTIVATIONS[cfg.dense_act_fn]
    if cfg.is_gated_act:
      gate = dense(cfg, cfg.d_ff, ("embed", "mlp"), "wi_0", use_bias=False)(x)
      hidden = act(gate) * dense(cfg, cfg.d_ff, ("embed", "mlp"), "wi_1", use_bias=False)(x)
    else:
      hidden = act(dense(cfg, cfg.d_ff, ("embed", "mlp"), "wi", use_bias=False)(x))
    return dense(cfg, cfg.d_model, ("mlp", "embed"), "wo", use_bias=False)(hidden)


class T5Block(nn.Module):
  cfg: T5EncoderConfig

  @nn.compact
  def __call__(self, h, bias, mask):
    cfg = self.cfg
    norm = lambda name: RMSNorm(cfg.layer_norm_epsilon, axis="embed",
                                param_dtype=cfg.param_dtype, name=name)
    h = h + T5Attention(cfg, name="attention")(norm("attention_norm")(h), bias, mask)
    h = h + T5FFN(cfg, name="ffn")(norm("ffn_norm")(h))
    return nn.with_logical_constraint(h, ACTIVATION), None


class T5Encoder(nn.Module):
  """Last hidden state (B, L, d_model) of T5EncoderModel.

  Args of __call__:
    input_ids: (B, L) int32.
    attention_mask: optional (B, L), nonzero where a key may be attended to; None: every
      token (FLUX passes none, so its padding is attended to).
  """

  cfg: T5EncoderConfig

  @nn.compact
  def __call__(self, input_ids, attention_mask=None):
    cfg = self.cfg
    length = input_ids.shape[1]
    h = embed_lookup(embedding(cfg, cfg.vocab_size, cfg.d_model, ("vocab", "embed"), "shared"),
                     input_ids)
    h = nn.with_logical_constraint(h, ACTIVATION)
    # The first layer's relative position bias, shared by every layer: (1, heads, L, L).
    table = embedding(cfg, cfg.relative_attention_num_buckets, cfg.num_heads, (None, "heads"),
                      "relative_attention_bias").embedding
    buckets = relative_position_buckets(length, cfg.relative_attention_num_buckets,
                                        cfg.relative_attention_max_distance)
    bias = jnp.take(table.astype(jnp.float32), buckets, axis=0).transpose(2, 0, 1)[None]
    mask = None if attention_mask is None else attention_mask.astype(bool)[:, None, None, :]
    h, _ = stack(T5Block, cfg, cfg.num_layers, "block", (nn.broadcast, nn.broadcast))(
        h, bias, mask)
    return RMSNorm(cfg.layer_norm_epsilon, axis="embed", param_dtype=cfg.param_dtype,
                   name="final_layer_norm")(h)


# ------------------------------------------------------------------------------------------
# CLIP.
# ------------------------------------------------------------------------------------------
def layer_norm(cfg: CLIPTextConfig, name: str) -> nn.LayerNorm:
  """torch.nn.LayerNorm in float32 (two-pass variance), weight and bias along `embed`."""
  init = lambda f: nn.with_logical_partitioning(f, ("embed",))
  return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=jnp.float32, param_dtype=cfg.param_dtype,
                      use_fast_variance=False, scale_init=init(nn.initializers.ones_init()),
                      bias_init=init(nn.initializers.zeros_init()), name=name)


class CLIPAttention(nn.Module):
  cfg: CLIPTextConfig

  @nn.compact
  def __call__(self, x, mask):
    cfg = self.cfg
    b, s, _ = x.shape
    q, k, v = (dense(cfg, cfg.hidden_size, ("embed", "heads"), name)(x)
               .reshape(b, s, cfg.num_attention_heads, cfg.head_dim)
               for name in ("q_proj", "k_proj", "v_proj"))
    out = attention(q, k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3), mask)
    return dense(cfg, cfg.hidden_size, ("heads", "embed"), "out_proj")(out)


class CLIPMLP(nn.Module):
  cfg: CLIPTextConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    x = dense(cfg, cfg.intermediate_size, ("embed", "mlp"), "fc1")(x)
    return dense(cfg, cfg.hidden_size, ("mlp", "embed"), "fc2")(CLIP_ACTIVATIONS[cfg.hidden_act](x))


class CLIPLayer(nn.Module):
  cfg: CLIPTextConfig

  @nn.compact
  def __call__(self, h, mask):
    cfg = self.cfg
    normed = lambda name, x: layer_norm(cfg, name)(x).astype(cfg.dtype)
    h = h + CLIPAttention(cfg, name="self_attn")(normed("layer_norm1", h), mask)
    h = h + CLIPMLP(cfg, name="mlp")(normed("layer_norm2", h))
    return nn.with_logical_constraint(h, ACTIVATION), None


class CLIPEmbeddings(nn.Module):
  cfg: CLIPTextConfig

  @nn.compact
  def __call__(self, input_ids):
    cfg = self.cfg
    tokens = embedding(cfg, cfg.vocab_size, cfg.hidden_size, ("vocab", "embed"),
                       "token_embedding")
    positions = embedding(cfg, cfg.max_position_embeddings, cfg.hidden_size, (None, "embed"),
                          "position_embedding")
    return (embed_lookup(tokens, input_ids)
            + positions.embedding[None, :input_ids.shape[1]].astype(cfg.dtype))


class CLIPTextModel(nn.Module):
  """(last hidden state (B, L, hidden), pooled (B, hidden)) of transformers' CLIPTextModel:
  causal attention, final LayerNorm, pooled = the final hidden state at each row's EOS.

  Args of __call__:
    input_ids: (B, L) int32, L <= max_position_embeddings.
    attention_mask: optional (B, L), nonzero where a key may be attended to (on top of the
      causal mask); None: every token (as FLUX calls it).
  """

  cfg: CLIPTextConfig

  @nn.compact
  def __call__(self, input_ids, attention_mask=None):
    cfg = self.cfg
    length = input_ids.shape[1]
    if length > cfg.max_position_embeddings:
      raise ValueError(f"CLIP input of {length} tokens is longer than max_position_embeddings "
                       f"{cfg.max_position_embeddings}")
    h = nn.with_logical_constraint(CLIPEmbeddings(cfg, name="embeddings")(input_ids), ACTIVATION)
    mask = jnp.tril(jnp.ones((length, length), bool))[None, None]  # (1, 1, S, T)
    if attention_mask is not None:
      mask = mask & attention_mask.astype(bool)[:, None, None, :]
    h, _ = stack(CLIPLayer, cfg, cfg.num_hidden_layers, "layers", (nn.broadcast,))(h, mask)
    h = layer_norm(cfg, "final_layer_norm")(h).astype(cfg.dtype)
    eos = (jnp.argmax(input_ids, axis=-1) if cfg.eos_token_id == 2
           else jnp.argmax(input_ids == cfg.eos_token_id, axis=-1))
    pooled = jnp.take_along_axis(h, eos[:, None, None], axis=1)[:, 0]
    return h, pooled
