"""Building blocks shared by the editor (Flux) and the planner (Qwen2/Llama): Dense layers
with logical axis names and optional LoRA, RMSNorm, attention, and scanned or unrolled layer
stacks."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any


def dense(cfg, features: int, axes: tuple[str, str], name: str,
          zero_init: bool = False, use_bias: bool = True) -> nn.Dense:
  """A Dense with logical axis names on kernel (in, out) and bias (out,); `cfg` is any config
  with `dtype` and `param_dtype`. A LoRADense where `cfg` puts adapters on `name`."""
  kernel_init = nn.initializers.zeros_init() if zero_init else nn.initializers.xavier_uniform()
  kwargs = dict(use_bias=use_bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                kernel_init=nn.with_logical_partitioning(kernel_init, axes),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), axes[1:]),
                name=name)
  rank = getattr(cfg, "lora_rank", 0)
  if rank and name in cfg.lora_targets:
    return LoRADense(features, rank=rank, alpha=cfg.lora_alpha, axes=axes, **kwargs)
  return nn.Dense(features, **kwargs)


def embed_lookup(embed: nn.Embed, ids: jax.Array) -> jax.Array:
  """`embed(ids)`, reading the table whole along its `embed` axis (gathered over fsdp, as
  FSDP gathers every weight it uses): rows gathered from the fsdp-split table come out split
  along `embed`, which SPMD turns into batch-split rows (and back, for the gradient) only by
  replicating them."""
  table = nn.with_logical_constraint(embed.embedding, ("vocab", None))
  return jnp.take(table, ids, axis=0).astype(embed.dtype or table.dtype)


class LoRADense(nn.Dense):
  """Dense + a low-rank update applied, not merged: y = x W + b + (alpha / r) (x A) B.

  The base kernel and bias keep nn.Dense's names, so dropping `lora_a`/`lora_b` (adapters
  disabled) or merging them (jaxedit.lora.merge) gives the plain model's parameters."""

  rank: int = 0
  alpha: float = 1.0
  axes: tuple[str, str] = (None, None)

  @nn.compact
  def __call__(self, x):
    y = super().__call__(x)
    a = self.param("lora_a", nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                          (self.axes[0], None)),
                   (x.shape[-1], self.rank), self.param_dtype)
    b = self.param("lora_b", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                          (None, self.axes[1])),
                   (self.rank, self.features), self.param_dtype)
    low = jnp.dot(jnp.dot(x.astype(self.dtype), a.astype(self.dtype)), b.astype(self.dtype))
    return y + (self.alpha / self.rank) * low


class RMSNorm(nn.Module):
  """RMSNorm over the last axis in float32, weight without +1 offset (torch.nn.RMSNorm,
  Qwen2RMSNorm); `axis` is the weight's logical name."""

  eps: float = 1e-6
  init: float = 1.0
  axis: str = "head_dim"
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.constant(self.init),
                                                             (self.axis,)),
                       (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt((x32**2).mean(-1, keepdims=True) + self.eps)
    return (y * scale.astype(jnp.float32)).astype(x.dtype)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None):
  """Softmax attention as XLA einsums: q (B, S, N, H), keys (B, K, H, T) and values
  (B, K, T, H), K dividing N (grouped-query); mask (B, 1, S, T) of the keys each query sees.
  -> (B, S, N*H).

  Keys and values laid out so that both dots are plain batched matmuls, neither operand
  transposed: jax.nn.dot_product_attention batches over the strided head axis of
  (B, T, N, H), 10% slower per Flux rollout on CPU, and keys as (B, K, T, H) made the logits
  the costliest matmul of a decoded token. Softmax in float32; a query with no visible key
  attends uniformly instead of giving NaN."""
  b, s, n, h = q.shape
  kv = k.shape[1]
  # A group's queries side by side: (B, K, G*S, H), so both dots are 4-D batched matmuls.
  q = q.transpose(0, 2, 1, 3).reshape(b, kv, -1, h)
  logits = jnp.einsum("bkqh,bkht->bkqt", q, k).astype(jnp.float32) / np.sqrt(h)
  if mask is not None:
    mask = jnp.broadcast_to(mask[:, :, None], (b, 1, n // kv, s, mask.shape[-1]))
    logits = jnp.where(mask.reshape(b, 1, -1, mask.shape[-1]), logits,
                       jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkqt,bkth->bkqh", probs, v).reshape(b, n, s, h)
  return out.transpose(0, 2, 1, 3).reshape(b, s, n * h)


SPLASH_LANES = 128  # the kernel's sequence blocks are multiples of the TPU's lane width


def splash_block(length: int, max_block: int) -> int:
  """The largest multiple of 128 that divides `length` (a multiple of 128) and is at most
  `max_block` (at least 128)."""
  lanes = length // SPLASH_LANES
  return SPLASH_LANES * max(d for d in range(1, lanes + 1)
                            if lanes % d == 0 and d * SPLASH_LANES <= max(max_block, 128))


def check_splash_block(block: int, key: str) -> None:
  """Raises unless `block` (the config key `key`) can be a splash block bound."""
  if block < SPLASH_LANES or block % SPLASH_LANES:
    raise ValueError(f"{key} must be a positive multiple of {SPLASH_LANES} (the TPU's lane "
                     f"width), got {block}")


def divisible_spec(spec: jax.sharding.PartitionSpec, shape: tuple[int, ...], mesh):
  """`spec` without the mesh axes whose sizes do not divide their dimension (replicated
  there instead), as shard_map needs even shards."""
  dims = []
  for size, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    dims.append(axes if axes and size % math.prod(mesh.shape[a] for a in axes) == 0 else None)
  return jax.sharding.PartitionSpec(*dims)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, max_block: int = 512,
                     causal: bool = False, segment_ids: jax.Array | None = None):
  """Softmax attention by the TPU's Pallas splash (flash) kernel, which never materialises
  the S x S scores: q (B, Sq, N, H), k and v (B, Skv, K, H), K dividing N (grouped-query)
  -> (B, Sq, N*H). `causal`: query i sees keys 0..i (Sq == Skv). `segment_ids`: optional
  (B, S) integers >= 0 (Sq == Skv); a query sees only the keys of its own segment (the
  LM's padding is segment 0, its tokens 1).

  Sequences are padded to multiples of 128 (the kernel's lane width), in blocks of at most
  `max_block`; padded keys get segment -1, so no query attends to them (padded queries are
  dropped). Under a mesh (`jax.set_mesh`), the kernel runs per shard (shard_map) over the
  batch and head axes that the logical rules map `activation_batch` and `heads` to, as
  MaxText runs it. Off TPU the same kernel runs in Pallas' interpreter: slow, for tests."""
  from jax.experimental.pallas.ops.tpu.splash_attention import (
      splash_attention_kernel as splash, splash_attention_mask as masks)

  b, sq, n, h = q.shape
  skv = k.shape[1]
  if (causal or segment_ids is not None) and sq != skv:
    raise ValueError(f"causal or segmented splash attention needs as many queries as keys, "
                     f"got {sq} and {skv}")
  round_up = lambda s: -(-s // SPLASH_LANES) * SPLASH_LANES
  lq, lkv = round_up(sq), round_up(skv)
  bq, bkv = splash_block(lq, max_block), splash_block(lkv, max_block)
  blocks = splash.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq,
                             block_kv_dkv=bkv, block_kv_dkv_compute=bkv, block_q_dq=bq,
                             block_kv_dq=bkv)
  segmented = segment_ids is not None or lkv != skv
  ids = lambda length: (jnp.zeros((b, length), jnp.int32) if segment_ids is None
                        else segment_ids.astype(jnp.int32))
  # Padded queries see the padded keys (-1), or every key where none is padded.
  ids_q = jnp.pad(ids(sq), ((0, 0), (0, lq - sq)), constant_values=-1 if lkv != skv else 0)
  ids_kv = jnp.pad(ids(skv), ((0, 0), (0, lkv - skv)), constant_values=-1)
  interpret = jax.default_backend() != "tpu"

  def heads_first(x, length):  # (B, S, N, H) -> (B, N, length, H)
    return jnp.pad(x.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, length - x.shape[1]), (0, 0)))

  def per_shard(q, k, v, ids_q, ids_kv):
    head_mask = masks.CausalMask((lq, lkv)) if causal else masks.FullMask((lq, lkv))
    kernel = splash.make_splash_mha(masks.MultiHeadMask([head_mask] * q.shape[2]),
                                    block_sizes=blocks, head_shards=1, q_seq_shards=1,
                                    interpret=interpret)
    run = lambda q, k, v, ids_q, ids_kv: kernel(
        q, k, v, segment_ids=splash.SegmentIds(ids_q, ids_kv) if segmented else None)
    out = jax.vmap(run)(heads_first(q * jnp.asarray(1 / np.sqrt(h), q.dtype), lq),
                        heads_first(k, lkv), heads_first(v, lkv), ids_q, ids_kv)
    return out[:, :, :sq].transpose(0, 2, 1, 3)  # (B, Sq, N, H)

  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty:
    logical = nn.logical_to_mesh_axes(("activation_batch", None, "heads", None))
    spec_q, spec_kv = (divisible_spec(logical, x.shape, mesh) for x in (q, k))
    if spec_q[2] != spec_kv[2]:  # query heads split where their key heads are not: keep whole
      spec_q, spec_kv = (jax.sharding.PartitionSpec(*x[:2], None, None)
                         for x in (spec_q, spec_kv))
    rows = jax.sharding.PartitionSpec(spec_q[0], None)
    per_shard = jax.shard_map(per_shard, in_specs=(spec_q, spec_kv, spec_kv, rows, rows),
                              out_specs=spec_q, check_vma=False)
  return per_shard(q, k, v, ids_q, ids_kv).reshape(b, sq, n * h)


def init_as_scanned(model: nn.Module, scanned: nn.Module, stacks: tuple[str, ...], rng,
                    *args, **kwargs) -> dict:
  """`model.init(rng, ...)["params"]` drawn as `scanned` (the same model with scanned layers)
  draws them, in `model`'s layout: the same seed gives the same weights whether the layers
  are scanned or unrolled (a fresh draw could land a short run elsewhere entirely)."""
  params = scanned.init(rng, *args, **kwargs)["params"]
  return params if model is scanned else unstack_layers(params, stacks)


def unstack_layers(params: dict, stacks: tuple[str, ...]) -> dict:
  """Scanned parameters as unrolled ones: each `{name: leaves with a leading layer axis}` in
  `stacks` becomes `{name_0: layer 0, name_1: ...}`; boxed leaves drop the layer axis name."""
  boxed = lambda leaf: isinstance(leaf, nn.Partitioned)

  def layer(leaf, i):
    if boxed(leaf):
      return dataclasses.replace(leaf, value=leaf.value[i], names=leaf.names[1:])
    return leaf[i]

  out = {}
  for name, value in params.items():
    if name in stacks:
      first = jax.tree.leaves(value, is_leaf=boxed)[0]
      for i in range((first.value if boxed(first) else first).shape[0]):
        out[f"{name}_{i}"] = jax.tree.map(lambda leaf: layer(leaf, i), value, is_leaf=boxed)
    else:
      out[name] = unstack_layers(value, stacks) if isinstance(value, dict) else value
  return out


def remat(block_cls, cfg):
  """`block_cls` rematerialised by `cfg.remat_policy` (none | full | a jax.checkpoint_policies
  name)."""
  if cfg.remat_policy == "none":
    return block_cls
  policy = None if cfg.remat_policy == "full" else getattr(jax.checkpoint_policies,
                                                           cfg.remat_policy)
  return nn.remat(block_cls, policy=policy, prevent_cse=not cfg.scan_layers)


def stack(block_cls, cfg, length: int, name: str, in_axes: tuple) -> Callable:
  """`length` blocks `block_cls(cfg)(carry, *args) -> (carry, y)` as one function
  `(carry, *args) -> (carry, ys)`: scanned (params with a leading 'layers' axis) or unrolled
  (blocks named `{name}_{i}`). `in_axes` per arg: `nn.broadcast` (shared by every layer) or
  0 (sliced per layer, e.g. a KV cache); ys are stacked on a leading layer axis."""
  block_cls = remat(block_cls, cfg)
  if cfg.scan_layers:
    scanned = nn.scan(block_cls, variable_axes={"params": 0}, split_rngs={"params": True},
                      in_axes=in_axes, length=length,
                      metadata_params={nn.PARTITION_NAME: "layers"})
    return lambda carry, *args: scanned(cfg, name=name)(carry, *args)

  def unrolled(carry, *args):
    ys = []
    for i in range(length):
      layer_args = [a if ax is nn.broadcast else jax.tree.map(lambda v: v[i], a)
                    for a, ax in zip(args, in_axes)]
      carry, y = block_cls(cfg, name=f"{name}_{i}")(carry, *layer_args)
      ys.append(y)
    return carry, jax.tree.map(lambda *v: jnp.stack(v), *ys) if ys else None
  return unrolled
