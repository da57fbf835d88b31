"""The attention kernels: splash (the TPU's Pallas kernel, run here by Pallas' interpreter)
against softmax attention in float64 and against XLA's attention in the Flux model, on one
device and sharded over batch and heads; and the choice `model.attention` makes."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxedit import schema, sharding
from jaxedit.models import editor, flux, layers, lm

from conftest import assert_sharded_close

# A Flux model whose sequence (5 text + 2 x 24 image tokens = 53) is no multiple of 128.
CFG = flux.FluxConfig(in_channels=12, num_layers=1, num_single_layers=2, attention_head_dim=16,
                      num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=20,
                      axes_dims_rope=(4, 6, 6), qk_norm_init=2.0)
GRID, TEXT = (4, 6), 5
# The kernel's shard_map spec for q, k and v on the (2, 2, 2) mesh: batch and heads split.
SHARDED_HEADS = "P(('data', 'fsdp'), None, 'tensor', None)"


def softmax_attention_f64(q, k, v):
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  logits = np.einsum("bqnh,bknh->bnqk", q, k) / np.sqrt(q.shape[-1])
  p = np.exp(logits - logits.max(-1, keepdims=True))
  out = np.einsum("bnqk,bknh->bqnh", p / p.sum(-1, keepdims=True), v)
  return out.reshape(*out.shape[:2], -1)


@pytest.mark.parametrize("sq, skv, max_block", [(70, 200, 128), (256, 256, 512)])
def test_splash_equals_softmax_attention(sq, skv, max_block):
  # 70 x 200: queries and keys padded (to 128 and 256), two key blocks with padded keys
  # masked; 256 x 256: no padding, one block.
  rng = np.random.default_rng(0)
  q = rng.normal(size=(2, sq, 2, 32)).astype(np.float32)
  k, v = (rng.normal(size=(2, skv, 2, 32)).astype(np.float32) for _ in range(2))
  got = jax.jit(lambda q, k, v: layers.splash_attention(q, k, v, max_block))(q, k, v)
  assert got.shape == (2, sq, 64)
  np.testing.assert_allclose(got, softmax_attention_f64(q, k, v), rtol=1e-4, atol=1e-5)


def test_splash_blocks_divide_the_padded_sequence():
  assert layers.splash_block(2176, 512) == 128  # 17 x 128: no larger divisor
  assert layers.splash_block(1024, 512) == 512
  assert layers.splash_block(384, 512) == 384
  assert layers.splash_block(256, 128) == 128


def random_model_inputs(batch, seed=0):
  rng = np.random.default_rng(seed)
  f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  n = GRID[0] * GRID[1]
  return (f(batch, n, 12), jnp.asarray(rng.uniform(0.1, 0.9, batch), jnp.float32),
          f(batch, TEXT, 24), f(batch, 20), f(batch, n, 12))


def loss_and_grads(cfg, params, inputs):
  tokens, t, context, pooled, source = inputs

  def loss(params):
    out = flux.FluxTransformer(cfg).apply({"params": params}, tokens, t, context, pooled,
                                          GRID, source_tokens=source)
    return (out ** 2).mean()
  return jax.value_and_grad(loss)(params)


@pytest.mark.parametrize("scan", [True, False])
def test_flux_with_splash_attention_trains_like_xla_on_one_and_eight_devices(scan):
  """Loss and gradients with splash equal XLA attention's, and the 8-device run (batch over
  data x fsdp, heads over tensor, so the kernel runs per shard) equals one device. Unrolled,
  the last single block's queries are the 24 target rows alone (Sq != Skv)."""
  cfg = dataclasses.replace(CFG, scan_layers=scan)
  inputs = random_model_inputs(batch=4)
  shapes = jax.eval_shape(lambda: nn.unbox(flux.FluxTransformer(cfg).init(
      jax.random.key(0), *inputs[:4], GRID, source_tokens=inputs[4])["params"]))
  rng = np.random.default_rng(1)  # random everywhere: zero-initialised gates would hide bugs
  params = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape) * 0.2, jnp.float32),
                        shapes)
  step = jax.jit(loss_and_grads, static_argnums=0)
  splash = dataclasses.replace(cfg, attention="splash")
  with jax.default_matmul_precision("highest"):
    want, want_grads = step(dataclasses.replace(cfg, attention="xla"), params, inputs)
    got, grads = step(splash, params, inputs)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert_sharded_close(grads, want_grads, rtol=1e-4, atol=1e-6)

  mesh = sharding.make_mesh(("data", "fsdp", "tensor"), (2, 2, 2))
  rules = sharding.rules(schema.mesh())
  sharded = sharding.Program(step, mesh, rules)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    assert SHARDED_HEADS in str(jax.make_jaxpr(loss_and_grads, static_argnums=0)(
        splash, params, inputs))
  with jax.default_matmul_precision("highest"):
    got8, grads8 = sharded(splash, params, inputs)
  assert_sharded_close(got8, got, rtol=1e-6)
  assert_sharded_close(grads8, grads, rtol=1e-5, atol=1e-6)


def test_divisible_spec_replicates_what_does_not_divide():
  mesh = sharding.make_mesh(("data", "fsdp", "tensor"), (2, 2, 2))
  spec = jax.sharding.PartitionSpec(("data", "fsdp"), None, "tensor", None)
  assert layers.divisible_spec(spec, (8, 53, 2, 16), mesh) == spec
  assert layers.divisible_spec(spec, (2, 53, 3, 16), mesh) == jax.sharding.PartitionSpec(
      None, None, None, None)


@pytest.mark.parametrize("backend, dtype, want", [
    ("tpu", jnp.float32, "splash"), ("tpu", jnp.bfloat16, "splash"),
    ("gpu", jnp.bfloat16, "cudnn"), ("gpu", jnp.float32, None), ("cpu", jnp.bfloat16, None)])
def test_auto_picks_the_backends_fused_kernel(monkeypatch, backend, dtype, want):
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  assert flux.attention_implementation("auto", dtype) == want
  assert flux.attention_implementation("splash", dtype) == "splash"
  assert flux.attention_implementation("xla", dtype) is None
  with pytest.raises(ValueError, match="model.attention must be one of"):
    flux.attention_implementation("flash", dtype)


def test_splash_block_config_error_names_the_key():
  model = schema.editor_model()
  model.splash_block = 100
  with pytest.raises(ValueError, match="model.splash_block must be a positive multiple of 128"):
    editor.editor_config(model, image_size=32, vocab_size=100)


def test_splash_with_causal_segments_equals_softmax_attention():
  # Grouped-query (4 query heads, 2 key heads), 150 tokens padded to 256; row 0 left-padded,
  # row 1 right-padded: a token sees the earlier tokens of its own segment.
  rng = np.random.default_rng(0)
  s = 150
  q = rng.normal(size=(2, s, 4, 32)).astype(np.float32)
  k, v = (rng.normal(size=(2, s, 2, 32)).astype(np.float32) for _ in range(2))
  valid = np.ones((2, s), np.int32)
  valid[0, :20], valid[1, 130:] = 0, 0
  got = jax.jit(lambda q, k, v, ids: layers.splash_attention(
      q, k, v, 128, causal=True, segment_ids=ids))(q, k, v, valid)
  k4, v4 = np.repeat(k, 2, axis=2), np.repeat(v, 2, axis=2)
  for row in range(2):
    for i in np.flatnonzero(valid[row]):
      keys = np.flatnonzero(valid[row, :i + 1])
      want = softmax_attention_f64(q[row:row + 1, i:i + 1], k4[row:row + 1, keys],
                                   v4[row:row + 1, keys])
      np.testing.assert_allclose(got[row, i], want[0, 0], rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="as many queries as keys"):
    layers.splash_attention(q[:, :10], k, v, causal=True)


@pytest.mark.parametrize("scan", [True, False])
def test_lm_with_splash_attention_trains_like_xla_on_one_and_eight_devices(scan):
  """The planner LM's teacher-forced forward (padding on either side, a vision-like prefix):
  log-probs of the valid tokens and gradients with splash equal XLA attention's, and 8
  devices (batch over data x fsdp, query and key heads over tensor) equal one."""
  cfg = lm.LMConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=16, scan_layers=scan)
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(0, 64, (4, 40)), jnp.int32)
  prefix = jnp.asarray(rng.normal(size=(4, 6, 64)), jnp.float32)
  valid = np.ones((4, 46), bool)
  valid[1, 6:15], valid[2, 30:] = False, False  # left padding after the prefix; right padding
  valid = jnp.asarray(valid)
  shapes = jax.eval_shape(lambda: nn.unbox(lm.DecoderLM(cfg).init(
      jax.random.key(0), ids, valid, prefix=prefix)["params"]))
  params = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape) * 0.2, jnp.float32),
                        shapes)

  def loss(cfg, params):
    logits = lm.DecoderLM(cfg).apply({"params": params}, ids, valid, prefix=prefix)[:, 6:-1]
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None], -1)[..., 0]
    keep = valid[:, 7:] & valid[:, 6:-1]
    return -(logp * keep).sum() / keep.sum()

  step = jax.jit(jax.value_and_grad(loss, argnums=1), static_argnums=0)
  splash = dataclasses.replace(cfg, attention="splash")
  with jax.default_matmul_precision("highest"):
    want, want_grads = step(dataclasses.replace(cfg, attention="xla"), params)
    got, grads = step(splash, params)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert_sharded_close(grads, want_grads, rtol=1e-4, atol=1e-6)

  mesh = sharding.make_mesh(("data", "fsdp", "tensor"), (2, 2, 2))
  rules = sharding.rules(schema.mesh())
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    jaxpr = str(jax.make_jaxpr(loss, static_argnums=0)(splash, params))
  assert SHARDED_HEADS in jaxpr  # 2 of the 4 query heads and 1 of the 2 key heads a shard
  with jax.default_matmul_precision("highest"):
    got8, grads8 = sharding.Program(step, mesh, rules)(splash, params)
  assert_sharded_close(got8, got, rtol=1e-6)
  assert_sharded_close(grads8, grads, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="attention must be one of"):
    lm.LMConfig(attention="cudnn")
