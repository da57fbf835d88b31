"""Planner GRPO: starts from the SFT planner, on-policy ratio 1 and KL 0 at the start,
sharded, resumable, and `jaxedit eval` writes before/after."""

import json
import os

import jax
import numpy as np
import pytest

from conftest import assert_logged_exactly, resume_after_step_one, tiny_planner_grpo_config
from jaxedit.data.pipeline import make_dataset
from jaxedit import checkpoint, lora, overlap, planning, sharding, workdirs
from jaxedit.config import ConfigError
from jaxedit.trainers import planner_grpo
from jaxedit.rl import planner_policy


@pytest.fixture(scope="module")
def sft_dir(tiny_planner_dir):
  return tiny_planner_dir


def test_first_update_is_on_policy_and_starts_at_the_reference(small_data_dir, sft_dir, tmp_path):
  config = tiny_planner_grpo_config(small_data_dir, sft_dir, minibatches=1)
  config.mesh.shape = (2, 2, 2)
  setup = planner_grpo.make_setup(config, str(tmp_path))
  start = planner_policy.load_start(setup, str(sft_dir), "ema_params")
  state = planner_policy.init_state(setup, start)
  records = next(iter(make_dataset(setup.source("train"), 4, seed=0,
                                               fields=planner_policy.ROLLOUT_FIELDS,
                                               kinds=("abstract",))))
  sampler = planning.make_plan_sampler(setup)
  arrays, texts, repeated = planner_policy.rollout(setup, sampler, state.params, records,
                                                 jax.random.key(0))
  assert len(texts) == 16 and len(repeated["instruction"]) == 16
  rewards = np.linspace(0, 1, 16).astype(np.float32)
  batch = sharding.global_batch({k: arrays[k] for k in ("source_image", "prompt", "prompt_valid",
                                                        "plan", "plan_valid")},
                                setup.batch_sharding)
  # The rollout's teacher-forced log-probs equal what the sampler recorded.
  samples = sampler(state.params, sharding.global_batch(
      {k: arrays[k] for k in ("source_image", "prompt", "prompt_valid")}, setup.batch_sharding),
      jax.random.key(0), config.rollout.temperature)
  logp = planner_policy.sequence_logprobs(state.params, setup.model, batch, 1.0)
  valid = arrays["plan_valid"]
  np.testing.assert_allclose(np.asarray(logp)[valid], np.asarray(samples.logprobs)[valid],
                             atol=5e-5)
  # (the update donates `state`: check the log-probs first)
  update = planner_grpo.make_update(setup)
  _, metrics = update(state, batch, sharding.global_batch({"r": rewards},
                                                          setup.batch_sharding)["r"])
  m = jax.device_get(metrics)
  np.testing.assert_allclose([m["ratio_min"], m["ratio_max"]], [1.0, 1.0], atol=1e-5)
  assert abs(float(m["kl"])) < 1e-6 and float(m["clip_fraction"]) == 0.0


def test_train_resume_and_eval(small_data_dir, sft_dir, tiny_editor_dir, tmp_path):
  """With both rewards: the visual one runs every rollout plan through the tiny editor."""
  config = tiny_planner_grpo_config(small_data_dir, sft_dir)
  config.mesh.shape = (2, 2, 2)
  config.editor = tiny_editor_dir  # (the baseline's eval is tested in test_plan_then_edit)
  config.rewards.visual.weight = 1.0
  out = planner_grpo.train(config, str(tmp_path))
  assert [p["step"] for p in out["curve"]] == [0, 2]
  lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert [l["step"] for l in lines] == [1, 2]
  assert {"reward/mean", "reward/visual", "train/kl", "train/clip_fraction",
          "train/ratio_min"} <= set(lines[0])
  # Resume: two more steps continue from the checkpoint, not from the SFT start.
  config.train.num_steps = 4
  config.rewards.visual.weight = 0.0  # (tested above; spares loading the editor again)
  planner_grpo.train(config, str(tmp_path))
  assert [json.loads(l)["step"] for l in open(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]
  summary = planner_grpo.run_eval(config, str(tmp_path))
  saved = json.load(open(tmp_path / "eval" / "metrics.json"))
  assert saved["step"] == 4 and "before" in saved and "change" in saved
  assert saved["change"]["plan_checklist_score"] == pytest.approx(
      summary["plan_checklist_score"] - summary["before"]["plan_checklist_score"])
  for scores in (summary, summary["before"], summary["held_out_families"]):
    assert 0.0 <= scores["e2e_success"] <= scores["e2e_runs"] <= 1.0
  assert "e2e_success" in summary["change"]
  for name in ("e2e_after.png", "e2e_before.png"):
    assert os.path.exists(tmp_path / "eval" / name)
  # `jaxedit edit` finds the editor in the saved config
  assert workdirs.load_planner(str(tmp_path)).config.editor == tiny_editor_dir


def test_bad_configs(small_data_dir, sft_dir, tmp_path):
  config = tiny_planner_grpo_config(small_data_dir, "")
  with pytest.raises(ConfigError, match="init_from"):
    planner_grpo.make_setup(config, str(tmp_path))
  config = tiny_planner_grpo_config(small_data_dir, sft_dir)
  config.rewards.visual.weight = 1.0
  with pytest.raises(ConfigError, match="rewards.visual.weight > 0 needs an editor"):
    planner_grpo.make_setup(config, str(tmp_path))
  config = tiny_planner_grpo_config(small_data_dir, sft_dir)
  config.model.num_layers = 3
  setup = planner_grpo.make_setup(config, str(tmp_path / "x"))
  with pytest.raises(ConfigError, match="model.num_layers = 2 there, 3 here"):
    planner_policy.load_start(setup, str(sft_dir), "ema_params")


def test_overlapped_rollouts_run_one_update_behind(small_data_dir, sft_dir, tmp_path):
  """Plans sampled on 4 devices while the other 4 update: iteration k updates on plans of the
  parameters before update k - 1 (before update 1 for k = 1, 2), as written out below on the
  same meshes; resumed from step 1's checkpoint (step 2's plans in flight), the run ends the
  same."""
  config = tiny_planner_grpo_config(small_data_dir, sft_dir, rollout_devices=4)
  t = config.train
  t.num_steps, t.eval_every, t.keep_checkpoints, t.lr, t.warmup_steps = 3, -1, 3, 1e-2, 0
  whole, resumed = tmp_path / "whole", tmp_path / "resumed"
  planner_grpo.train(config, str(whole))
  resume_after_step_one(whole, resumed, lambda workdir: planner_grpo.train(config, workdir))

  setup, rollout_setup = overlap.make_setups(planner_grpo.make_setup, config,
                                             str(tmp_path / "reference"))
  assert not set(rollout_setup.mesh.devices.flat) & set(setup.mesh.devices.flat)
  state = planner_policy.init_state(setup, planner_policy.load_start(setup, str(sft_dir),
                                                                 "ema_params"))
  prompts = planner_policy.train_prompts(setup)
  sampler, update = planning.make_plan_sampler(rollout_setup), planner_grpo.make_update(setup)

  def plans(step, params):
    arrays, texts, records = planner_policy.rollout(
        rollout_setup, sampler, jax.device_put(params, rollout_setup.state_shardings.params),
        next(prompts), jax.random.fold_in(jax.random.key(0), step))
    rewards = planner_policy.cognitive_rewards(texts, records, config.rewards.cognitive)
    return (sharding.global_batch({k: arrays[k] for k in planner_policy.BATCH_FIELDS},
                                  setup.batch_sharding),
            sharding.global_batch({"r": rewards}, setup.batch_sharding)["r"])

  params0 = jax.device_get(state.params)
  first, second = plans(1, params0), plans(2, params0)
  state, m1 = update(state, *first)
  third = plans(3, jax.device_get(state.params))
  state, m2 = update(state, *second)
  state, m3 = update(state, *third)
  want = jax.device_get(state.params)
  for run in (whole, resumed):  # the same programs on the same devices: equal, bit for bit
    assert_logged_exactly(run, [m1, m2, m3])
    mngr = checkpoint.manager(str(run), 3, async_save=False)
    got = checkpoint.restore(mngr, 3, planner_policy.PlannerPolicy.abstract_state(setup))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(got.params), want)


def test_lora_grpo_starts_on_policy_over_the_frozen_sft_lm(small_data_dir, sft_dir, tmp_path):
  """LoRA: fresh adapters (B = 0) and the SFT vision prefix train over the SFT LM, frozen;
  the first update is on policy with zero KL, and moves the adapters, not the base."""
  config = tiny_planner_grpo_config(small_data_dir, sft_dir, minibatches=1)
  config.model.lora_rank, config.model.lora_alpha = 4, 4.0
  config.train.lr, config.train.warmup_steps = 1e-2, 0
  setup = planner_grpo.make_setup(config, str(tmp_path))
  state = planner_policy.init_state(setup, planner_policy.load_start(setup, str(sft_dir),
                                                                     "ema_params"))
  assert set(state.base) == {"lm"} and set(state.params) == {"lm", "vision"}
  base0, params0 = jax.device_get(state.base), jax.device_get(state.params)
  records = next(iter(make_dataset(setup.source("train"), 4, seed=0,
                                   fields=planner_policy.ROLLOUT_FIELDS, kinds=("abstract",))))
  arrays, _, _ = planner_policy.rollout(setup, planning.make_plan_sampler(setup),
                                        lora.whole(state.params, state.base), records,
                                        jax.random.key(0))
  batch = sharding.global_batch({k: arrays[k] for k in planner_policy.BATCH_FIELDS},
                                setup.batch_sharding)
  rewards = sharding.global_batch({"r": np.linspace(0, 1, 16).astype(np.float32)},
                                  setup.batch_sharding)["r"]
  state, metrics = planner_grpo.make_update(setup)(state, batch, rewards)
  m = jax.device_get(metrics)
  np.testing.assert_allclose([m["ratio_min"], m["ratio_max"]], [1.0, 1.0], atol=1e-5)
  assert abs(float(m["kl"])) < 1e-6
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.base), base0)
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()),
                       jax.device_get(state.params), params0)
  assert max(jax.tree.leaves(moved["lm"])) > 0 and max(jax.tree.leaves(moved["vision"])) > 0


def test_grpo_from_a_lora_sft_run_starts_from_the_merged_model(small_data_dir, tmp_path):
  from conftest import tiny_planner_config
  from jaxedit.trainers import planner_sft
  sft = tiny_planner_config(small_data_dir, num_steps=2, eval_every=-1, checkpoint_every=2,
                            lr=1e-2, warmup_steps=0)
  sft.model.lora_rank, sft.model.lora_alpha = 4, 8.0
  sft_dir = str(tmp_path / "sft")
  planner_sft.train(sft, sft_dir)
  loaded = workdirs.load_planner(sft_dir, batch_size=8)  # adapters joined onto the LM
  config = tiny_planner_grpo_config(small_data_dir, sft_dir)
  setup = planner_grpo.make_setup(config, str(tmp_path / "grpo"))
  start = planner_policy.load_start(setup, sft_dir, "ema_params")
  batch = sharding.global_batch({k: v for k, v in planning.eval_batches(
      setup, "validation", 8, 8)[0][0].items()}, setup.batch_sharding)
  with jax.default_matmul_precision("highest"):
    merged = planning.completion_logits(start, setup.model, batch)
    joined = planning.completion_logits(loaded.params, loaded.setup.model, batch)
  assert float(np.abs(np.asarray(joined)).max()) > 0
  np.testing.assert_allclose(np.asarray(merged), np.asarray(joined), atol=2e-4, rtol=1e-4)
