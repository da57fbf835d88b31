"""FLUX.1's text encoders equal transformers' T5EncoderModel and CLIPTextModel, load from
their safetensors folders (sharded too, either naming) into a mesh's shardings, and encode
prompts as diffusers' FluxPipeline.encode_prompt does."""

import json
import os
import re

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

import tiny_flux  # noqa: E402
from conftest import assert_sharded_close  # noqa: E402
from jaxedit import schema, sharding  # noqa: E402
from jaxedit.config import ConfigError  # noqa: E402
from jaxedit.interop import text_encoders_transformers as te  # noqa: E402
from jaxedit.interop import torch_names  # noqa: E402
from jaxedit.models import text_encoders  # noqa: E402

T5_HF = dict(vocab_size=40, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
             relative_attention_num_buckets=8, relative_attention_max_distance=20,
             feed_forward_proj="gated-gelu", dropout_rate=0.0)
CLIP_HF = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=77, bos_token_id=0, pad_token_id=1)
WORDS = ["a", "red", "blue", "green", "circle", "square", "make", "the", "every", "shape",
         "left", "of"]
PROMPTS = ["make every red shape blue", "a green circle left of the square!",
           " ".join(["the red square"] * 30)]  # past both maximum lengths: truncated
L = 40  # T5 positions 0..39: every bucket, the log-spaced ones and the clamped last


def randomized(model, seed=0):
  """`model` (torch) with random weights everywhere: norm weights near 1, the rest ~0.2."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      p.copy_(1 + 0.1 * noise if "norm" in name and name.endswith("weight") else 0.2 * noise)
  return model.eval()


def t5_model(seed=0, **overrides):
  return randomized(transformers.T5EncoderModel(transformers.T5Config(**{**T5_HF, **overrides})),
                    seed)


def clip_model(seed=0, **overrides):
  config = transformers.CLIPTextConfig(**{"vocab_size": 64, "eos_token_id": 2, **CLIP_HF,
                                          **overrides})
  return randomized(transformers.CLIPTextModel(config), seed)


def template(model):
  return jax.eval_shape(lambda: model.init(jax.random.key(0),
                                           jnp.zeros((1, 1), jnp.int32))["params"])


def loaded(torch_model, folder, scan=True, **save):
  """(flax model, numpy params) of `torch_model` saved to `folder` and loaded back."""
  torch_model.save_pretrained(folder, **save)
  hf = json.load(open(os.path.join(folder, "config.json")))
  if hf["model_type"] == "t5":
    model = text_encoders.T5Encoder(te.t5_config(hf, scan_layers=scan))
    return model, te.load_t5(folder, template(model))
  model = text_encoders.CLIPTextModel(te.clip_config(hf, scan_layers=scan))
  return model, te.load_clip(folder, template(model))


def rel_error(ours, ref) -> float:
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


def test_relative_position_buckets_match_transformers():
  attention = transformers.models.t5.modeling_t5.T5Attention
  for length, buckets, distance in ((512, 32, 128), (L, 8, 20)):
    relative = torch.arange(length)[None, :] - torch.arange(length)[:, None]
    ref = attention._relative_position_bucket(relative, True, buckets, distance).numpy()
    np.testing.assert_array_equal(
        text_encoders.relative_position_buckets(length, buckets, distance), ref)


@pytest.mark.parametrize("padded, scan, ffn", [(False, True, "gated-gelu"),
                                                (True, False, "relu"),
                                                (False, False, "gated-silu")])
def test_t5_matches_transformers(tmp_path, padded, scan, ffn):
  """T5 v1.1 (FLUX.1's, gated), v1.0 (transformers' default, relu) and a gated silu."""
  ref_model = t5_model(feed_forward_proj=ffn)
  model, params = loaded(ref_model, str(tmp_path), scan)
  rng = np.random.default_rng(1)
  ids = rng.integers(2, T5_HF["vocab_size"], size=(2, L)).astype(np.int32)
  mask = np.ones_like(ids)
  if padded:  # right padding, as a tokenizer pads: pad id 0, masked
    mask[0, 25:], mask[1, 7:] = 0, 0
    ids[mask == 0] = 0
  ours = jax.jit(lambda p, i, m: model.apply({"params": p}, i, m))(
      params, ids, mask if padded else None)
  with torch.no_grad():
    ref = ref_model(torch.from_numpy(ids).long(),
                    attention_mask=torch.from_numpy(mask) if padded else None
                    ).last_hidden_state.numpy()
  assert rel_error(ours, ref) < 1e-5, rel_error(ours, ref)


@pytest.mark.parametrize("eos_token_id, scan, act", [(2, False, "quick_gelu"), (7, True, "gelu")])
def test_clip_matches_transformers(tmp_path, eos_token_id, scan, act):
  ref_model = clip_model(eos_token_id=eos_token_id, hidden_act=act)
  model, params = loaded(ref_model, str(tmp_path), scan)
  rng = np.random.default_rng(2)
  ids = rng.integers(8, 64, size=(3, 20)).astype(np.int32)
  mask = np.ones_like(ids)
  if eos_token_id == 7:  # first occurrence pooled: twice in row 0; right padding, masked
    ids[0, [5, 12]], ids[1, 19], ids[2, 9] = 7, 7, 7
    mask[2, 10:] = 0
  ours_h, ours_pooled = jax.jit(lambda p, i, m: model.apply({"params": p}, i, m))(
      params, ids, mask if eos_token_id == 7 else None)
  with torch.no_grad():
    ref = ref_model(torch.from_numpy(ids).long(),
                    attention_mask=torch.from_numpy(mask) if eos_token_id == 7 else None)
  ref_h, ref_pooled = ref.last_hidden_state.numpy(), ref.pooler_output.numpy()
  assert rel_error(ours_h, ref_h) < 1e-5, rel_error(ours_h, ref_h)
  assert rel_error(ours_pooled, ref_pooled) < 1e-5, rel_error(ours_pooled, ref_pooled)
  expected = (ids.argmax(-1) if eos_token_id == 2 else (ids == 7).argmax(-1))
  np.testing.assert_allclose(ours_pooled, np.asarray(ours_h)[np.arange(3), expected])


def test_loads_sharded_folders_and_either_naming(tmp_path):
  """One file or shards with an index, transformers 5 names or 4's (CLIP's `text_model.`
  prefix and position_ids buffer; T5's embedding as encoder.embed_tokens only): the same
  params, which map back onto the torch state dict."""
  for kind, ref_model, layout, load in (("t5", t5_model(), te.T5_LAYOUT, te.load_t5),
                                        ("clip", clip_model(), te.CLIP_LAYOUT, te.load_clip)):
    model, single = loaded(ref_model, str(tmp_path / kind / "single"))
    _, shards = loaded(ref_model, str(tmp_path / kind / "shards"), max_shard_size="8KB")
    assert len(os.listdir(tmp_path / kind / "shards")) > 3
    jax.tree.map(np.testing.assert_array_equal, shards, single)
    state = {k: v.numpy() for k, v in ref_model.state_dict().items()}
    ours = torch_names.to_torch(layout, single)
    for name in ours:
      np.testing.assert_array_equal(ours[name], state[name], err_msg=name)
    if kind == "t5":
      state[te.T5_EMBED_ALIAS] = state.pop(te.T5_EMBED)
    else:
      state = {te.CLIP_PREFIX + k: v for k, v in state.items()}
      state[te.CLIP_PREFIX + te.CLIP_POSITION_IDS] = np.arange(77)[None]
    old = tmp_path / kind / "old"
    os.makedirs(old)
    save_file(state, str(old / te.WEIGHTS))
    jax.tree.map(np.testing.assert_array_equal, load(str(old), template(model)), single)


# ------------------------------------------------------------------------------------------
# A tiny FLUX pipeline folder: CLIP and T5 with tokenizers built here.
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("flux_pipeline")
  clip_vocab = tiny_flux.clip_tokenizer_files(str(root / "tokenizer"))
  t5_tokenizer = tiny_flux.t5_tokenizer()  # a T5 Unigram: <pad> 0, </s> 1, <unk> 2
  t5_tokenizer.save_pretrained(str(root / "tokenizer_2"))
  clip_model(vocab_size=clip_vocab).save_pretrained(str(root / "text_encoder"))
  t5_model(vocab_size=len(t5_tokenizer)).save_pretrained(str(root / "text_encoder_2"))
  return str(root)


def test_encode_matches_flux_pipeline(pipeline_dir):
  encoders = te.FluxTextEncoders.from_pipeline(pipeline_dir, max_sequence_length=24)
  out = encoders.encode(PROMPTS)
  clip_ids, t5_ids = encoders.tokenize(PROMPTS)
  assert clip_ids.shape == (3, 77) and t5_ids.shape == (3, 24)
  assert (t5_ids[:2] == 0).any() and not (t5_ids[2] == 0).any()  # padded and truncated
  load = lambda cls, sub: cls.from_pretrained(os.path.join(pipeline_dir, sub))
  pipe = diffusers.FluxPipeline(
      scheduler=None, vae=None, transformer=None,
      text_encoder=load(transformers.CLIPTextModel, "text_encoder"),
      tokenizer=load(transformers.AutoTokenizer, "tokenizer"),
      text_encoder_2=load(transformers.T5EncoderModel, "text_encoder_2"),
      tokenizer_2=load(transformers.AutoTokenizer, "tokenizer_2"))
  with torch.no_grad():
    context, pooled, _ = pipe.encode_prompt(PROMPTS, device="cpu", max_sequence_length=24)
  assert out["context"].shape == (3, 24, T5_HF["d_model"]) and out["context"].dtype == np.float32
  assert rel_error(out["context"], context.numpy()) < 1e-5, rel_error(out["context"], context)
  assert rel_error(out["pooled"], pooled.numpy()) < 1e-5, rel_error(out["pooled"], pooled)


def test_sharded_encode_shards_kernels_and_matches_one_device(pipeline_dir):
  mesh = sharding.make_mesh(("data", "fsdp", "tensor"), (2, 2, 2))
  rules = sharding.rules(schema.mesh())
  one = te.FluxTextEncoders.from_pipeline(pipeline_dir, max_sequence_length=24)
  spread = te.FluxTextEncoders.from_pipeline(pipeline_dir, mesh, rules, max_sequence_length=24)
  kernels = {"q", "k", "v", "o", "wi_0", "wi_1", "wo", "shared", "q_proj", "k_proj", "v_proj",
             "out_proj", "fc1", "fc2", "token_embedding"}
  for params in (spread.t5_params, spread.clip_params):
    for path, leaf in flax.traverse_util.flatten_dict(params).items():
      if kernels & set(path) and path[-1] in ("kernel", "embedding"):
        axes = set(jax.tree.leaves(tuple(leaf.sharding.spec)))
        assert axes == {"fsdp", "tensor"}, (path, leaf.sharding.spec)
        assert leaf.addressable_shards[0].data.size * 4 == leaf.size, path
  assert_sharded_close(spread.encode(PROMPTS), one.encode(PROMPTS), rtol=1e-5)


def test_bad_folders_give_named_errors(pipeline_dir, tmp_path):
  broken = tmp_path / "pipeline"
  broken.mkdir()
  for sub in ("text_encoder", "tokenizer", "tokenizer_2"):
    os.symlink(os.path.join(pipeline_dir, sub), broken / sub)
  with pytest.raises(ConfigError, match=re.escape(f"{broken} has no text_encoder_2/ "
                                                  "(T5EncoderModel)")):
    te.FluxTextEncoders.from_pipeline(str(broken))
  (broken / "text_encoder_2").mkdir()
  hf = transformers.T5Config(**T5_HF).to_dict()
  odd = {**hf, "feed_forward_proj": "gated-gelu-fast"}
  for config, error in ((odd, f"{broken}: feed_forward_proj 'gated-gelu-fast'"),
                        (hf, f"{broken / 'text_encoder_2'} has neither model.safetensors")):
    json.dump(config, open(broken / "text_encoder_2" / "config.json", "w"))
    with pytest.raises(ConfigError, match=re.escape(error)):
      te.FluxTextEncoders.from_pipeline(str(broken))
  with pytest.raises(ConfigError, match="activation 'tanh'"):
    te.t5_config({**hf, "feed_forward_proj": "gated-tanh"})
  with pytest.raises(ConfigError, match="model_type is 'umt5'"):
    te.t5_config({**hf, "model_type": "umt5"})
  with pytest.raises(ConfigError, match="hidden_act 'relu'"):
    te.clip_config({"model_type": "clip_text_model", "hidden_act": "relu"})
  wider = text_encoders.T5Encoder(te.t5_config(hf, d_ff=64))
  folder = os.path.join(pipeline_dir, "text_encoder_2")
  with pytest.raises(ConfigError, match=re.escape(folder) + r": .*wi_0.weight has shape "
                                        r"\(48, 32\), expected \(64, 32\)"):
    te.load_t5(folder, template(wider))
  with pytest.raises(ValueError, match="max_sequence_length cannot be greater than 512"):
    te.FluxTextEncoders.from_pipeline(pipeline_dir, max_sequence_length=513)
