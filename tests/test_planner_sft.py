"""Planner SFT: the trainer runs sharded and writes what it promises; the teacher-forced
log-probs equal the sampler's; 8 devices equal 1."""

import json
import os

import jax
import numpy as np
import pytest

from conftest import assert_sharded_close, tiny_planner_config
from jaxedit.data.pipeline import make_dataset
from jaxedit import planning, sharding
from jaxedit.config import ConfigError
from jaxedit.models.editor import patchify
from jaxedit.trainers import planner_sft
from jaxedit.train import setup as setup_lib


def test_train_and_eval_write_curves_plans_and_metrics(small_data_dir, tmp_path):
  config = tiny_planner_config(small_data_dir)
  config.mesh.shape = (2, 2, 2)
  out = planner_sft.train(config, str(tmp_path))
  lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  losses = [l["loss"] for l in lines]
  assert len(losses) == 6 and losses[-1] < losses[0]
  # The cell head is trained beside the plan (train.cell_loss_weight = 1).
  assert lines[-1]["cell_loss"] < lines[0]["cell_loss"]
  assert lines[-1]["loss"] == pytest.approx(lines[-1]["plan_loss"] + lines[-1]["cell_loss"],
                                            rel=1e-5)
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
  batches = planning.eval_batches(setup, "train", n, n)
  return batches[0][0]


def test_teacher_forced_logprobs_equal_the_samplers(small_data_dir, tmp_path):
  config = tiny_planner_config(small_data_dir)
  config.mesh.shape = (1, 1, 1)
  setup = planner_sft.make_setup(config, str(tmp_path), devices=jax.devices()[:1])
  params = setup_lib.init_state(setup).params
  arrays = batch_of(setup)
  samples = planning.make_plan_sampler(setup)(params, arrays, jax.random.key(0), 1.0)
  forced = {**arrays, "plan": np.asarray(samples.tokens), "plan_valid": np.asarray(samples.valid)}
  with jax.default_matmul_precision("highest"):
    logits = planning.completion_logits(params, setup.model, forced)
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
    params = setup_lib.init_state(setup).params
    batch = sharding.global_batch(batch_of(setup), setup.batch_sharding)
    fn = jax.jit(jax.value_and_grad(
        lambda p, b: planner_sft.loss_fn(p, setup.model, b, cell_loss_weight=1.0)[0]))
    with jax.default_matmul_precision("highest"):
      grads.append(jax.device_get(sharding.Program(fn, setup.mesh, setup.rules)(params, batch)))
  (loss1, g1), (loss8, g8) = grads
  assert np.abs(g1["cell_head"]["kernel"]).max() > 0
  assert_sharded_close(loss8, loss1, rtol=1e-6)
  assert_sharded_close(g8, g1, rtol=1e-4, atol=1e-7)


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
  config.model.vocab_size = 512
  config.sample.attend_chunk = -1
  with pytest.raises(ConfigError, match="'sample.attend_chunk' must be >= 0"):
    planner_sft.make_setup(config, str(tmp_path))


def test_trimmed_padding_gives_the_same_loss(small_data_dir, tmp_path):
  config = tiny_planner_config(small_data_dir)
  config.mesh.shape = (1, 1, 1)
  config.prompt.pad_multiple = 8
  setup = planner_sft.make_setup(config, str(tmp_path), devices=jax.devices()[:1])
  params = setup_lib.init_state(setup).params
  ds = make_dataset(setup.source("train"), 8, seed=0,
                                fields=planning.RECORD_FIELDS, kinds=("abstract",))
  records = next(iter(ds))
  full, trimmed = setup.examples(records), setup.examples(records, trim=True)
  assert trimmed["plan"].shape[1] < full["plan"].shape[1]
  assert trimmed["plan"].shape[1] % 8 == 0 and trimmed["prompt"].shape[1] % 8 == 0
  with jax.default_matmul_precision("highest"):
    losses = [planner_sft.loss_fn(params, setup.model, b)[0] for b in (full, trimmed)]
  np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)


def test_cell_loss_reads_each_patch_against_its_scene_cell(small_data_dir, tmp_path):
  """The cell labels are in the patches' order: an occupied cell's patch has the shape's
  pixels; the loss is the float64 cross-entropy of shapes plus that of colours."""
  config = tiny_planner_config(small_data_dir)
  config.mesh.shape = (1, 1, 1)
  setup = planner_sft.make_setup(config, str(tmp_path), devices=jax.devices()[:1])
  arrays = batch_of(setup)
  scene = arrays["source_scene"]
  patches = np.asarray(patchify(arrays["source_image"].astype(np.float32), 8))
  occupied = scene.reshape(len(scene), -1, 2)[..., 0] > 0
  background = patches[..., :3].reshape(*patches.shape[:2], -1, 3)[..., :1, :]
  has_pixels = (np.abs(patches.reshape(*patches.shape[:2], -1, 3) - background) > 0).any((2, 3))
  assert occupied.any() and (has_pixels == occupied).all()

  classes = setup.model.cfg.vision.cell_classes
  assert classes == (5, 7)  # 4 shapes and 6 colours, each with "empty"
  logits = np.random.default_rng(0).normal(size=(*occupied.shape, sum(classes)))
  loss, accuracy = planner_sft.cell_loss(jax.numpy.asarray(logits, np.float32), scene, classes)
  labels = scene.reshape(len(scene), -1, 2)
  want = 0.0
  for i, part in enumerate(np.split(logits, [classes[0]], axis=-1)):
    logp = part - np.log(np.exp(part).sum(-1, keepdims=True))
    want += -np.take_along_axis(logp, labels[..., i:i + 1], -1).mean()
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  right = ((logits[..., :5].argmax(-1) == labels[..., 0])
           & (logits[..., 5:].argmax(-1) == labels[..., 1]))
  np.testing.assert_allclose(float(accuracy), right.mean())


def test_cell_head_config_errors(small_data_dir, tmp_path):
  config = tiny_planner_config(small_data_dir)
  config.model.vision.cell_head = False
  with pytest.raises(ConfigError, match="'train.cell_loss_weight' > 0 needs a cell head"):
    planner_sft.make_setup(config, str(tmp_path))
  config.model.vision.cell_head = True
  config.model.vision.patch_size = 4
  with pytest.raises(ConfigError, match="needs one patch per grid cell: patch_size 4 cuts "
                                        "the 32px image into 8 patches a side, the grid is 4"):
    planner_sft.make_setup(config, str(tmp_path))


def test_summarize_plans_by_family_and_task():
  scores = {"plan_checklist_score": np.array([1.0, 0.5, 0.0, 0.25, 1.0], np.float32),
            "plan_exact": np.array([1, 0, 0, 0, 1], np.float32)}
  groups = {"family": ["a", "a", "b", "b", "c"],
            "task": ["colour", "geometry", "colour", "mixed", "colour"]}
  held_out = np.array([False, False, False, False, True])
  s = planning.summarize_plans(scores, groups, held_out)
  assert s["num_examples"] == 4 and s["plan_checklist_score"] == pytest.approx(0.4375)
  assert s["plan_checklist_score_by_task"] == pytest.approx(
      {"colour": 0.5, "geometry": 0.5, "mixed": 0.25})
  assert s["plan_exact_by_task"] == pytest.approx({"colour": 0.5, "geometry": 0.0, "mixed": 0.0})
  assert s["plan_checklist_score_by_family"] == pytest.approx({"a": 0.75, "b": 0.125})
  held = s["held_out_families"]
  assert held["num_examples"] == 1 and held["plan_exact_by_task"] == {"colour": 1.0}


def test_caption_rows_ask_for_the_scene_description():
  records = {"instruction": np.asarray(["a", "b", "c", "d"]),
             "scene_text": np.asarray(["s0", "s1", "s2", "s3"]),
             "plan_steps": np.asarray(['["p0"]', '["p1"]', '["p2"]', '["p3"]']),
             "source_image": np.zeros((4, 2, 2, 3), np.uint8)}
  out = planner_sft.with_captions(records, 0.5)
  assert list(out["instruction"]) == [planner_sft.CAPTION_REQUEST] * 2 + ["c", "d"]
  assert list(out["plan_steps"]) == ["s0", "s1", '["p2"]', '["p3"]']
  assert list(records["instruction"]) == ["a", "b", "c", "d"]  # the input is left alone
  assert planner_sft.with_captions(records, 0.0) is records
