"""The planner LM equals transformers Qwen2ForCausalLM / LlamaForCausalLM with the same
weights; cached decoding equals uncached decoding; the sampler's filters and stop tokens."""

import dataclasses

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxedit import sampling, sharding  # noqa: E402
from jaxedit.interop import lm_transformers  # noqa: E402
from jaxedit.models.lm import DecoderLM, LMConfig, init_cache  # noqa: E402
from jaxedit.models.planner import Planner, PlannerConfig, VisionConfig  # noqa: E402

ARCHS = {"qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
         "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM)}


def tiny(arch="qwen2", scan=True, **kw):
  qwen = arch == "qwen2"
  return LMConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=8, rope_theta=5000.0, qkv_bias=qwen,
                  tie_embeddings=qwen, scan_layers=scan, **kw)


def torch_model(cfg, arch, seed=0):
  config_cls, model_cls = ARCHS[arch]
  torch.manual_seed(seed)
  model = model_cls(config_cls(**lm_transformers.hf_config(cfg, arch))).eval()
  with torch.no_grad():  # random values everywhere (zero biases would hide bugs)
    for p in model.parameters():
      p.normal_(0.0, 0.2)
  return model


def padded_batch():
  ids = np.random.default_rng(0).integers(0, 64, (3, 9)).astype(np.int32)
  valid = np.ones((3, 9), bool)
  valid[1, :4] = False  # left padding
  valid[2, 6:] = False  # right padding
  return ids, valid


def load(cfg, model):
  ids, valid = padded_batch()
  template = jax.eval_shape(lambda: DecoderLM(cfg).init(jax.random.key(0), ids, valid))
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  return lm_transformers.from_transformers(state, template["params"], cfg), state


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("scan", [True, False])
def test_logits_match_transformers(arch, scan):
  cfg = tiny(arch, scan)
  model = torch_model(cfg, arch)
  params, _ = load(cfg, model)
  ids, valid = padded_batch()
  with jax.default_matmul_precision("highest"):
    ours = np.asarray(DecoderLM(cfg).apply({"params": params}, ids, valid))
  with torch.no_grad():
    ref = model(input_ids=torch.from_numpy(ids.astype(np.int64)),
                attention_mask=torch.from_numpy(valid.astype(np.int64)),
                position_ids=torch.from_numpy(np.maximum(np.cumsum(valid, 1) - 1, 0))).logits
  ref = ref.numpy()
  err = np.abs(ours - ref)[valid].max() / np.abs(ref[valid]).max()
  assert err < 1e-5, err
  # A left-padded row computes what the unpadded row computes.
  with jax.default_matmul_precision("highest"):
    alone = np.asarray(DecoderLM(cfg).apply({"params": params}, ids[1:2, 4:], valid[1:2, 4:]))
  np.testing.assert_allclose(ours[1, 4:], alone[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_transformers_round_trip_and_config(arch):
  cfg = tiny(arch)
  model = torch_model(cfg, arch)
  params, state = load(cfg, model)
  back = lm_transformers.to_transformers(params)
  tied_head = {"lm_head.weight"} if cfg.tie_embeddings else set()
  assert set(back) == set(state) - tied_head
  for name, value in back.items():
    np.testing.assert_array_equal(value, state[name])
  assert lm_transformers.lm_config(model.config.to_dict()) == cfg


def test_loading_names_missing_extra_and_misshaped_tensors():
  cfg = tiny("llama")
  params, state = load(cfg, torch_model(cfg, "llama"))
  broken = dict(state)
  del broken["model.layers.1.mlp.up_proj.weight"]
  broken["model.layers.2.mlp.up_proj.weight"] = np.zeros((48, 32), np.float32)
  broken["lm_head.weight"] = np.zeros((64, 31), np.float32)
  with pytest.raises(lm_transformers.MappingError) as e:
    lm_transformers.from_transformers(broken, params, cfg)
  msg = str(e.value)
  assert "missing tensors: model.layers.1.mlp.up_proj.weight" in msg
  assert "unexpected tensors: model.layers.2.mlp.up_proj.weight" in msg
  assert "lm_head.weight has shape (64, 31), expected (64, 32)" in msg


def test_lm_config_rejects_what_it_cannot_run():
  hf = transformers.LlamaConfig(**lm_transformers.hf_config(tiny("llama"), "llama")).to_dict()
  with pytest.raises(ValueError, match="RoPE scaling"):
    lm_transformers.lm_config({**hf, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}})
  with pytest.raises(ValueError, match="model_type"):
    lm_transformers.lm_config({**hf, "model_type": "gpt2"})


def planner(seed=0, scan=True):
  cfg = PlannerConfig(tiny(scan=scan), VisionConfig(image_size=16, patch_size=8, width=16))
  model = Planner(cfg)
  ids, valid = sampling.left_pad([[5, 6, 7, 8, 9], [3, 4], [10, 11, 12]], pad_id=0)
  image = np.random.default_rng(seed).uniform(-1, 1, (3, 16, 16, 3)).astype(np.float32)
  full_valid = np.concatenate([np.ones((3, 4), bool), valid], 1)
  params = model.init(jax.random.key(seed), ids, full_valid, image=image)["params"]
  leaves, tree = jax.tree.flatten(flax.linen.unbox(params))
  rng = np.random.default_rng(seed)  # sharp distributions: greedy is well separated
  params = jax.tree.unflatten(tree, [(rng.normal(size=l.shape) * 0.5).astype(np.float32)
                                     for l in leaves])
  return model, params, ids, valid, image


@pytest.mark.parametrize("scan", [True, False])  # one stacked cache, or one per layer
def test_cached_decoding_equals_uncached(scan):
  cfg = tiny(scan=scan)
  model = DecoderLM(cfg)
  ids, valid = sampling.left_pad([[5, 6, 7, 8, 9], [3, 4]], pad_id=0)
  params = jax.jit(model.init)(jax.random.key(0), ids, valid)["params"]
  apply = jax.jit(model.apply)
  slots = np.zeros((2, 8), bool)
  slots[:, :5] = valid
  with jax.default_matmul_precision("highest"):
    full = apply({"params": params}, ids, valid)
    logits, cache = apply({"params": params}, ids, slots, cache=init_cache(cfg, 2, 8))
    np.testing.assert_allclose(np.asarray(logits)[valid], np.asarray(full)[valid], atol=1e-5)
    seq, seq_valid = ids, valid
    for step, token in enumerate([[11, 12], [13, 14], [15, 16]]):
      token = np.asarray(token, np.int32)[:, None]
      slots[:, 5 + step] = True
      logits, cache = apply({"params": params}, token, slots, cache=cache, index=5 + step)
      seq = np.concatenate([seq, token], 1)
      seq_valid = np.concatenate([seq_valid, np.ones((2, 1), bool)], 1)
      full = apply({"params": params}, seq, seq_valid)
      np.testing.assert_allclose(np.asarray(logits)[:, 0], np.asarray(full)[:, -1], atol=1e-5)


def uncached_greedy(model, params, ids, valid, image, steps):
  """Greedy decoding by re-running the whole sequence for every token, no cache. The
  sequence sits at the start of a fixed-length buffer (one compile): the causal mask keeps
  the filler after it from touching the logits read at its end."""
  width = ids.shape[1] + steps
  apply = jax.jit(lambda x, img: model.apply(
      {"params": params}, x, np.ones((1, model.cfg.prefix_len + width), bool), image=img))
  rows = []
  for r in range(ids.shape[0]):
    seq = [int(t) for t, v in zip(ids[r], valid[r]) if v]
    prompt_len = len(seq)
    for _ in range(steps):
      x = np.zeros((1, width), np.int32)
      x[0, :len(seq)] = seq
      logits = apply(x, image[r:r + 1])
      seq.append(int(np.argmax(logits[0, model.cfg.prefix_len + len(seq) - 1])))
    rows.append(seq[prompt_len:])
  return np.asarray(rows)


@pytest.fixture(scope="module")
def greedy_reference():
  """The planner of `planner()` and its 6 greedy tokens per row, decoded without a cache."""
  model, params, ids, valid, image = planner()
  with jax.default_matmul_precision("highest"):
    want = uncached_greedy(model, params, ids, valid, image, 6)
  return (model, params, ids, valid, image), want


@pytest.mark.parametrize("attend_chunk", [0, 4])  # one segment; segments of 4 and 2 tokens
def test_greedy_sampler_equals_uncached_greedy_decoding(greedy_reference, attend_chunk):
  (model, params, ids, valid, image), want = greedy_reference
  sample = sampling.make_sampler(model, sampling.SamplingConfig(
      6, stop_ids=(), pad_id=0, attend_chunk=attend_chunk))
  with jax.default_matmul_precision("highest"):
    out = sample(params, ids, valid, jax.random.key(0), temperature=0.0, image=image)
  np.testing.assert_array_equal(np.asarray(out.tokens), want)
  assert np.asarray(out.valid).all()


def test_stop_tokens_end_rows(greedy_reference):
  (model, params, ids, valid, image), want = greedy_reference
  stop = int(want[0, 2])  # row 0 stops at its third token, in the second of three segments
  sample = sampling.make_sampler(model, sampling.SamplingConfig(6, stop_ids=(stop,), pad_id=0,
                                                                attend_chunk=2))
  out = jax.tree.map(np.asarray, sample(params, ids, valid, jax.random.key(0), 0.0, image))
  for r in range(3):
    hits = np.flatnonzero(want[r] == stop)
    end = hits[0] + 1 if hits.size else 6
    np.testing.assert_array_equal(out.tokens[r, :end], want[r, :end])
    assert out.valid[r, :end].all() and not out.valid[r, end:].any()
    assert (out.tokens[r, end:] == 0).all() and (out.logprobs[r, end:] == 0).all()
  assert out.valid[0].sum() == 3


def test_filter_logits():
  logits = jnp.log(jnp.asarray([[0.5, 0.05, 0.3, 0.15]]))
  inf = -np.inf
  np.testing.assert_array_equal(np.isinf(sampling.filter_logits(logits, 2, 1.0)),
                                [[False, True, False, True]])
  # top-p 0.75: 0.5 (mass before 0), 0.3 (0.5), 0.15 (0.8 >= 0.75: dropped)
  kept = sampling.filter_logits(logits, 0, 0.75)
  np.testing.assert_array_equal(np.asarray(kept)[0] == inf, [False, True, False, True])
  np.testing.assert_array_equal(sampling.filter_logits(logits, 0, 1.0), logits)


def test_greedy_token_is_the_first_argmax_with_its_log_softmax():
  # Ties go to the first index, as jnp.argmax; -inf logits (filtered) are never picked.
  logits = jnp.asarray([[0.1, 2.0, 2.0, -1.0], [-np.inf, -3.0, -np.inf, -3.0],
                        [5.0, 1.0, 5.0, 5.0]], jnp.float32)
  token, logp = sampling.sample_token(logits, jax.random.key(0), jnp.float32(0.0),
                                      sampling.SamplingConfig(1, stop_ids=(), pad_id=0))
  np.testing.assert_array_equal(token, np.argmax(np.asarray(logits), -1))
  want = jax.nn.log_softmax(logits, -1)[np.arange(3), np.asarray(token)]
  np.testing.assert_allclose(logp, want, rtol=1e-6)


def test_sampled_tokens_are_those_of_jax_random_categorical():
  logits = jax.random.normal(jax.random.key(0), (64, 50)) * 2
  settings = sampling.SamplingConfig(1, stop_ids=(), pad_id=0)
  for seed in range(3):
    rng = jax.random.key(seed)
    token, logp = sampling.sample_token(logits, rng, jnp.float32(0.5), settings)
    np.testing.assert_array_equal(token, jax.random.categorical(rng, logits / 0.5))
    np.testing.assert_allclose(
        logp, jax.nn.log_softmax(logits / 0.5)[np.arange(64), np.asarray(token)], atol=1e-5)


def test_sampled_logprobs_are_those_of_the_filtered_distribution():
  model, params, ids, valid, image = planner()
  settings = sampling.SamplingConfig(1, stop_ids=(), pad_id=0, top_k=3)
  out = sampling.make_sampler(model, settings)(params, ids, valid, jax.random.key(3), 0.7,
                                               image)
  full_valid = np.concatenate([np.ones((3, 4), bool), valid], 1)
  logits = model.apply({"params": params}, ids, full_valid, image=image)[:, -1] / 0.7
  top3 = np.sort(np.asarray(logits), -1)[:, -3:]
  token_logit = np.take_along_axis(np.asarray(logits), np.asarray(out.tokens), -1)[:, 0]
  assert (token_logit >= top3[:, 0] - 1e-6).all()  # sampled inside the top 3
  want = token_logit - np.log(np.exp(top3).sum(-1))
  np.testing.assert_allclose(np.asarray(out.logprobs)[:, 0], want, atol=1e-5)


@pytest.mark.parametrize("scan", [True, False])  # one stacked cache, or one per layer
def test_sharded_sampler_matches_one_device(scan):
  model, params, ids, valid, image = planner(scan=scan)
  ids, valid, image = (np.concatenate([a] * 3)[:8] for a in (ids, valid, image))
  # Segments of 2, 2 and 1 tokens: the cache grows between them on both layouts.
  settings = sampling.SamplingConfig(5, stop_ids=(7,), pad_id=0, top_p=0.9, attend_chunk=2)
  one = sampling.make_sampler(model, settings)(params, ids, valid, jax.random.key(1), 1.0,
                                               image)
  mesh = sharding.make_mesh(("data", "fsdp", "tensor"), (2, 2, 2))
  rules = (("batch", ("data", "fsdp")), ("activation_batch", ("data", "fsdp")),
           ("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"), ("vocab", "tensor"))
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), ids,
                                            np.ones((8, 4 + ids.shape[1]), bool), image=image))
  shardings = sharding.logical_shardings(boxed["params"], mesh, rules)
  sharded_params = jax.device_put(params, shardings)
  batch = sharding.batch_sharding(mesh, rules)
  many = sampling.make_sampler(model, settings, mesh, rules)(
      sharded_params, *(jax.device_put(a, batch) for a in (ids, valid)), jax.random.key(1), 1.0,
      jax.device_put(image, batch))
  whole = sampling.make_sampler(model, dataclasses.replace(settings, attend_chunk=0))(
      params, ids, valid, jax.random.key(1), 1.0, image)  # one segment, the whole cache
  for other in (many, whole):
    np.testing.assert_array_equal(np.asarray(other.tokens), np.asarray(one.tokens))
    np.testing.assert_array_equal(np.asarray(other.valid), np.asarray(one.valid))
    np.testing.assert_allclose(np.asarray(other.logprobs), np.asarray(one.logprobs), atol=1e-5)


def test_planner_initial_parameters_do_not_depend_on_the_layer_layout():
  from jaxedit.models.planner import init_params

  weights = {}
  for scan in (True, False):
    model, _, ids, valid, image = planner(scan=scan)
    full_valid = np.concatenate([np.ones((3, 4), bool), valid], 1)
    weights[scan] = flax.linen.unbox(init_params(model, jax.random.key(0), ids, full_valid,
                                                 image=image))
  stacked = weights[True]["lm"]["layers"]["mlp"]["down_proj"]["kernel"]
  for i in range(2):
    np.testing.assert_array_equal(weights[False]["lm"][f"layers_{i}"]["mlp"]["down_proj"]["kernel"],
                                  stacked[i])
  np.testing.assert_array_equal(weights[False]["lm"]["embed_tokens"]["embedding"],
                                weights[True]["lm"]["embed_tokens"]["embedding"])
