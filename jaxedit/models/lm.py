"""Decoder LM in the Qwen2 / Llama layout, with an explicit KV cache.

Parameters map one-to-one onto transformers `Qwen2ForCausalLM` / `LlamaForCausalLM`
(docs/design.md section 3; `jaxedit.interop.lm_transformers` holds the names): GQA, RMSNorm in
float32 without +1 offset, SwiGLU, rotate-half RoPE, optional q/k/v bias, tied or untied
head. The cache is a plain pytree passed in and returned, so decoding is a pure function
that `jit` can donate.

Sequence layout: every row shares cache slots 0..T-1; `valid` marks real tokens (padding
anywhere, e.g. left padding of prompts) and positions count only valid tokens, so a padded
row computes what the unpadded row would.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxedit.models.layers import (RMSNorm, attention, check_splash_block, dense, embed_lookup,
                                   splash_attention, stack)

Dtype = Any
ACTIVATION = ("activation_batch", "activation_length", "activation_embed")
LM_ATTENTION = ("auto", "xla", "splash")


@dataclasses.dataclass(frozen=True)
class LMConfig:
  """Defaults are Qwen2.5-0.5B's."""

  vocab_size: int = 151_936
  hidden_size: int = 896
  intermediate_size: int = 4_864
  num_layers: int = 24
  num_heads: int = 14
  num_kv_heads: int = 2
  head_dim: int = 64
  rope_theta: float = 1_000_000.0
  rms_norm_eps: float = 1e-6
  qkv_bias: bool = True  # Qwen2: True; Llama: False
  tie_embeddings: bool = True
  lora_rank: int = 0
  lora_alpha: float = 1.0
  lora_targets: tuple[str, ...] = ()
  dtype: Dtype = jnp.float32  # compute
  param_dtype: Dtype = jnp.float32
  scan_layers: bool = True
  remat_policy: str = "none"
  # auto: the TPU's splash kernel on TPU for the cache-free forward (training), else XLA's |
  # xla | splash (off TPU: Pallas' interpreter, for tests). Decoding always uses XLA's.
  attention: str = "auto"
  splash_block: int = 512  # splash attention's largest sequence block

  def __post_init__(self):
    if self.attention not in LM_ATTENTION:
      raise ValueError(f"attention must be one of {LM_ATTENTION}, got {self.attention!r}")
    check_splash_block(self.splash_block, "splash_block")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads "
                       f"{self.num_kv_heads}")
    if self.head_dim % 2:
      raise ValueError(f"head_dim {self.head_dim} must be even for RoPE")


def uses_splash(cfg: LMConfig, cached: bool) -> bool:
  """Whether a forward runs splash attention: without a cache, where `cfg.attention` asks
  for it (auto: on TPU)."""
  wanted = cfg.attention == "splash" or (cfg.attention == "auto"
                                         and jax.default_backend() == "tpu")
  return wanted and not cached


def positions_from_valid(valid: jax.Array) -> jax.Array:
  """Position of each slot among its row's valid tokens (padding gets its left neighbour's)."""
  return jnp.maximum(jnp.cumsum(valid.astype(jnp.int32), axis=-1) - 1, 0)


def rope_tables(positions: jax.Array, head_dim: int, theta: float):
  """cos/sin (B, S, head_dim) in float32 for rotate-half RoPE, as transformers computes."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq
  angles = jnp.concatenate([angles, angles], axis=-1)
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, rope) -> jax.Array:
  """x: (B, S, N, H); rotates the halves (x[:H/2], x[H/2:]) — the opposite of Flux's pairs."""
  cos, sin = rope
  x32 = x.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x32 * cos[:, :, None] + rotated * sin[:, :, None]).astype(x.dtype)


def init_cache(cfg: LMConfig, batch: int, length: int):
  """Empty KV cache in the compute dtype, keys (batch, kv_heads, head_dim, length) and values
  (batch, kv_heads, length, head_dim), as `layers.attention` reads them: with scanned layers
  one {k, v} with a leading layer axis; unrolled, a tuple of per-layer {k, v}, which
  attention reads where they lie (slicing a layer out of a stacked cache copies it every
  token)."""
  shapes = {"k": (batch, cfg.num_kv_heads, cfg.head_dim, length),
            "v": (batch, cfg.num_kv_heads, length, cfg.head_dim)}
  layer = lambda *lead: {name: jnp.zeros((*lead, *shape), cfg.dtype)
                         for name, shape in shapes.items()}
  return layer(cfg.num_layers) if cfg.scan_layers else tuple(layer() for _ in
                                                             range(cfg.num_layers))


def cache_length(cache) -> int:
  """The number of slots of a cache from `init_cache`."""
  return (cache[0] if isinstance(cache, tuple) else cache)["v"].shape[-2]


def grow_cache(cache, length: int):
  """The cache with empty slots appended up to `length`: a decoder attends to every slot of
  its cache, so it grows the cache as it fills it rather than attend to empty slots."""
  def grow(name, x):
    axis = x.ndim - 1 if name == "k" else x.ndim - 2  # keys (..., H, T), values (..., T, H)
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, length - x.shape[axis])
    return jnp.pad(x, pad)
  grow_layer = lambda c: {name: grow(name, x) for name, x in c.items()}
  return tuple(map(grow_layer, cache)) if isinstance(cache, tuple) else grow_layer(cache)


class Attention(nn.Module):
  cfg: LMConfig

  @nn.compact
  def __call__(self, x, cache, layer, rope, mask, index):
    cfg = self.cfg
    b, s, _ = x.shape
    q = dense(cfg, cfg.num_heads * cfg.head_dim, ("embed", "heads"), "q_proj",
              use_bias=cfg.qkv_bias)(x).reshape(b, s, cfg.num_heads, cfg.head_dim)
    k, v = (dense(cfg, cfg.num_kv_heads * cfg.head_dim, ("embed", "kv_heads"), name,
                  use_bias=cfg.qkv_bias)(x).reshape(b, s, cfg.num_kv_heads, cfg.head_dim)
            for name in ("k_proj", "v_proj"))
    q, k = apply_rope(q, rope), apply_rope(k, rope)
    if uses_splash(cfg, cached=cache is not None):  # `mask` is (B, S) validity here
      out = splash_attention(q, k, v, cfg.splash_block, causal=True, segment_ids=mask)
      return dense(cfg, cfg.hidden_size, ("heads", "embed"), "o_proj", use_bias=False)(
          out), cache
    k = k.transpose(0, 2, 3, 1)  # (B, K, H, S)
    v = v.transpose(0, 2, 1, 3)  # (B, K, S, H)
    at = {"k": (0, 0, 0, index), "v": (0, 0, index, 0)}  # this call's slots in a layer's cache
    if isinstance(cache, tuple):  # unrolled layers: `layer` is a Python int
      # Write this call's keys/values into the layer's own buffers (in place).
      mine = {name: jax.lax.dynamic_update_slice(cache[layer][name], new.astype(
          cache[layer][name].dtype), at[name]) for name, new in (("k", k), ("v", v))}
      cache = cache[:layer] + (mine,) + cache[layer + 1:]
      k, v = mine["k"], mine["v"]
    elif cache is not None:
      # Write into the whole (layers, ...) cache at (layer, slots): a small in-place update,
      # where slicing the layer out and stacking it back would copy the cache every token.
      # Attend over this layer's slots, the new ones included.
      cache = {name: jax.lax.dynamic_update_slice(
                   cache[name], new.astype(cache[name].dtype)[None], (layer, *at[name]))
               for name, new in (("k", k), ("v", v))}
      k, v = (jax.lax.dynamic_index_in_dim(cache[name], layer, 0, keepdims=False)
              for name in ("k", "v"))
    out = attention(q, k.astype(q.dtype), v.astype(q.dtype), mask)
    out = dense(cfg, cfg.hidden_size, ("heads", "embed"), "o_proj", use_bias=False)(out)
    return out, cache


class MLP(nn.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  cfg: LMConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    gate = dense(cfg, cfg.intermediate_size, ("embed", "mlp"), "gate_proj", use_bias=False)(x)
    up = dense(cfg, cfg.intermediate_size, ("embed", "mlp"), "up_proj", use_bias=False)(x)
    return dense(cfg, cfg.hidden_size, ("mlp", "embed"), "down_proj", use_bias=False)(
        nn.silu(gate) * up)


class DecoderLayer(nn.Module):
  cfg: LMConfig

  @nn.compact
  def __call__(self, carry, rope, mask, index):
    h, cache, layer = carry
    cfg = self.cfg
    norm = lambda name: RMSNorm(cfg.rms_norm_eps, axis="embed", param_dtype=cfg.param_dtype,
                                name=name)
    attn, cache = Attention(cfg, name="self_attn")(norm("input_layernorm")(h), cache, layer,
                                                   rope, mask, index)
    h = h + attn
    h = h + MLP(cfg, name="mlp")(norm("post_attention_layernorm")(h))
    return (nn.with_logical_constraint(h, ACTIVATION), cache, layer + 1), None


class DecoderLM(nn.Module):
  """Logits (float32) of a causal LM; with a cache, also the updated cache.

  Args of __call__:
    ids: (B, S) token ids.
    valid: (B, T) which slots hold real tokens; T = S (prefix included) without a cache,
      the cache length with one.
    cache: optional {k, v} from `init_cache`; this call writes slots index..index+S-1.
    index: the first slot this call writes (an int32 scalar, traced).
    prefix: optional (B, P, hidden) embeddings placed before the tokens (e.g. image tokens).
    positions: optional (B, S) RoPE positions; default `positions_from_valid` of this call's
      slots.
    last_only: logits of the last position only (prefill for sampling).
    head_span: (start, length): logits of those positions only (a completion's, in
      training: the output head is a large share of a small LM's work).
  """

  cfg: LMConfig

  @nn.compact
  def __call__(self, ids, valid, cache=None, index=0, prefix=None, positions=None,
               last_only: bool = False, head_span: tuple[int, int] | None = None):
    cfg = self.cfg
    embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype,
                     param_dtype=cfg.param_dtype, name="embed_tokens",
                     embedding_init=nn.with_logical_partitioning(
                         nn.initializers.normal(0.02), ("vocab", "embed")))
    h = embed_lookup(embed, ids)
    if prefix is not None:
      h = jnp.concatenate([prefix.astype(h.dtype), h], axis=1)
    s = h.shape[1]
    slots = jnp.arange(s) + index  # the cache slots of this call's tokens
    if positions is None:
      positions = jnp.take(positions_from_valid(valid), slots, axis=1)
    length = valid.shape[1]
    causal = jnp.arange(length)[None, :] <= slots[:, None]  # (S, T)
    mask = (causal[None] & valid[:, None, :])[:, None]  # (B, 1, S, T)
    if uses_splash(cfg, cached=cache is not None):
      mask = valid.astype(jnp.int32)  # segments: tokens 1, padding 0; the kernel is causal
    rope = rope_tables(positions, cfg.head_dim, cfg.rope_theta)
    h = nn.with_logical_constraint(h, ACTIVATION)
    # The cache rides in the carry with the layer index, so each layer updates it in place.
    # Scanned, the layer index is a traced counter; unrolled, a Python int (static indexing).
    first_layer = jnp.zeros((), jnp.int32) if cfg.scan_layers else 0
    (h, cache, _), _ = stack(DecoderLayer, cfg, cfg.num_layers, "layers",
                             (nn.broadcast, nn.broadcast, nn.broadcast))(
                                 (h, cache, first_layer), rope, mask, index)
    h = RMSNorm(cfg.rms_norm_eps, axis="embed", param_dtype=cfg.param_dtype, name="norm")(h)
    if last_only:
      h = h[:, -1:]
    elif head_span is not None:
      h = h[:, head_span[0]:head_span[0] + head_span[1]]
    if cfg.tie_embeddings:
      logits = embed.attend(h)
    else:
      logits = dense(cfg, cfg.vocab_size, ("embed", "vocab"), "lm_head", use_bias=False)(h)
    logits = logits.astype(jnp.float32)
    return logits if cache is None else (logits, cache)
