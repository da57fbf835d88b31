"""Planner SFT: the trainer runs sharded and writes what it promises; the teacher-forced
log-probs equal the sampler's; 8 devices equal 1."""

import json
import os

import jax
import numpy as np
import pytest

from conftest import tiny_planner_config
from jaxedit import sharding
from jaxedit.config import ConfigError
from jaxedit.trainers import planner_sft


def test_train_and_eval_write_curves_plans_and_metrics(small_data_dir, tmp_path):
  config = tiny_planner_config(small_data_dir)
  config.mesh.shape = (2, 2, 2)
  out = planner_sft.train(config, str(tmp_path))
  losses = [json.loads(l)["loss"] for l in open(tmp_path / "metrics.jsonl")]
  assert len(losses) == 6 and losses[-1] < losses[0]
  assert [p["step"] for p in out["curve"]] == [3, 6]
  assert os.path.exists(tmp_path / "samples" / "plans_0000006.txt")
  assert os.path.exists(tmp_path / "tokenizer.json")
  summary = planner_sft.run_eval(config, str(tmp_path))
  saved = json.load(open(tmp_path / "eval" / "metrics.json"))
  assert saved == json.loads(json.dumps(summary))
  for key in ("plan_checklist_score", "plan_exact", "plan_parses"):
    assert 0.0 <= saved[key] <= 1.0 and 0.0 <= saved["held_out_families"][key] <= 1.0
  assert saved["num_examples"] + saved["held_out_families"]["num_examples"] == 16
  assert "instruction: " in open(tmp_path / "eval" / "plans.txt").read()


def batch_of(setup, n=8):
  batches = planner_sft.eval_batches(setup, "train", n, n)
  return batches[0][0]


def test_teacher_forced_logprobs_equal_the_samplers(small_data_dir, tmp_path):
  config = tiny_planner_config(small_data_dir)
  config.mesh.shape = (1, 1, 1)
  setup = planner_sft.make_setup(config, str(tmp_path), devices=jax.devices()[:1])
  params = planner_sft.init_state(setup).params
  arrays = batch_of(setup)
  samples = planner_sft.make_plan_sampler(setup)(params, arrays, jax.random.key(0), 1.0)
  forced = {**arrays, "plan": np.asarray(samples.tokens), "plan_valid": np.asarray(samples.valid)}
  with jax.default_matmul_precision("highest"):
    logits = planner_sft.completion_logits(params, setup.model, forced)
  logp = jax.nn.log_softmax(logits)
  logp = np.take_along_axis(np.asarray(logp), forced["plan"][..., None], -1)[..., 0]
  valid = forced["plan_valid"]
  assert valid.sum() > 8
  np.testing.assert_allclose(logp[valid], np.asarray(samples.logprobs)[valid], atol=2e-5)


def test_loss_and_grads_on_8_devices_match_1(small_data_dir, tmp_path):
  config = tiny_planner_config(small_data_dir)
  grads = []
  for shape, devices in (((1, 1, 1), jax.devices()[:1]), ((2, 2, 2), jax.devices())):
    config.mesh.shape = shape
    setup = planner_sft.make_setup(config, str(tmp_path), devices=devices)
    params = planner_sft.init_state(setup).params
    batch = sharding.global_batch(batch_of(setup), setup.batch_sharding)
    fn = jax.jit(jax.value_and_grad(lambda p, b: planner_sft.loss_fn(p, setup.model, b)[0]))
    with jax.default_matmul_precision("highest"):
      grads.append(jax.device_get(sharding.in_context(fn, setup.mesh, setup.rules)(params, batch)))
  (loss1, g1), (loss8, g8) = grads
  np.testing.assert_allclose(loss8, loss1, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), g8, g1)


def test_prompts_and_plans_too_long_are_clear_errors(small_data_dir, tmp_path):
  config = tiny_planner_config(small_data_dir)
  config.mesh.shape = (1, 1, 1)
  config.prompt.max_prompt_len = 4
  setup = planner_sft.make_setup(config, str(tmp_path), devices=jax.devices()[:1])
  with pytest.raises(ValueError, match="exceeds prompt.max_prompt_len 4"):
    batch_of(setup)
  config.model.vocab_size = 100
  with pytest.raises(ConfigError, match="model.vocab_size 100 is smaller"):
    planner_sft.make_setup(config, str(tmp_path))


def test_trimmed_padding_gives_the_same_loss(small_data_dir, tmp_path):
  config = tiny_planner_config(small_data_dir)
  config.mesh.shape = (1, 1, 1)
  config.prompt.pad_multiple = 8
  setup = planner_sft.make_setup(config, str(tmp_path), devices=jax.devices()[:1])
  params = planner_sft.init_state(setup).params
  ds = planner_sft.make_dataset(setup.source("train"), 8, seed=0,
                                fields=planner_sft.RECORD_FIELDS, kinds=("abstract",))
  records = next(iter(ds))
  full, trimmed = setup.examples(records), setup.examples(records, trim=True)
  assert trimmed["plan"].shape[1] < full["plan"].shape[1]
  assert trimmed["plan"].shape[1] % 8 == 0 and trimmed["prompt"].shape[1] % 8 == 0
  with jax.default_matmul_precision("highest"):
    losses = [planner_sft.loss_fn(params, setup.model, b)[0] for b in (full, trimmed)]
  np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)
