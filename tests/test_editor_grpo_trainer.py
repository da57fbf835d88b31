"""The editor GRPO trainer: start from an SFT run, LoRA and full fine-tuning, exact resume,
before/after eval, clear config errors, and the update on 8 devices = 1 device."""

import json
import os

import jax
import numpy as np
import pytest

from jaxedit import checkpoint, lora, overlap, schema
from jaxedit.config import ConfigError
from jaxedit.interop import pretrained
from jaxedit.trainers import editor_grpo, editor_sft
from jaxedit.rl import editor_policy

from conftest import (assert_sharded_close, assert_logged_exactly, resume_after_step_one,
                      tiny_editor_config, update_after_one_rollout)


@pytest.fixture(scope="module")
def sft_dir(small_data_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("sft"))
  editor_sft.train(tiny_editor_config(small_data_dir, num_steps=4), workdir)
  return workdir


def grpo_config(data_dir, init_from, **overrides):
  sft = tiny_editor_config(data_dir)
  config = schema.editor_grpo()
  for section in ("data", "tokenizer", "model", "sample"):
    config[section] = sft[section]
  config.eval.batch_size, config.eval.num_examples = 8, 8
  config.init_from = init_from
  r = config.rollout
  r.prompts_per_step, r.group_size, r.rollout_chunks, r.num_steps = 8, 2, 2, 3
  r.minibatches, r.inner_epochs = 2, 2
  config.grpo.kl_beta = 0.04
  t = config.train
  t.num_steps, t.eval_every, t.sample_every, t.checkpoint_every = 3, 3, 3, 1
  t.eval_examples, t.sample_examples, t.async_checkpoints = 8, 4, False
  config.model.lora_rank = 4
  for key, value in overrides.items():
    section, name = key.split(".")
    config[section][name] = value
  return config


def _state(workdir, config):
  setup = editor_grpo.make_setup(config, workdir)
  mngr = checkpoint.manager(workdir, 2, async_save=False)
  return checkpoint.restore(mngr, mngr.latest_step(), setup.abstract_state)


def _sft_params(sft_dir, config):
  setup = editor_sft.make_setup(tiny_editor_config(config.data.data_dir), sft_dir)
  mngr = checkpoint.manager(sft_dir, 2, async_save=False)
  return checkpoint.restore(mngr, mngr.latest_step(), setup.abstract_state).ema_params


@pytest.fixture(scope="module")
def lora_run(small_data_dir, sft_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("grpo_lora"))
  config = grpo_config(small_data_dir, sft_dir)
  editor_grpo.train(config, workdir)
  return workdir, config


def test_lora_run_trains_adapters_only_and_logs(lora_run, sft_dir):
  workdir, config = lora_run
  state = _state(workdir, config)
  assert int(state.step) == 3
  # The frozen base is the SFT run's EMA parameters, untouched.
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.base),
               jax.device_get(_sft_params(sft_dir, config)))
  # The adapters moved away from B = 0.
  flat = jax.tree_util.tree_flatten_with_path(jax.device_get(state.params))[0]
  assert all(lora.is_adapter(tuple(k.key for k in path)) for path, _ in flat)
  assert max(np.abs(v).max() for path, v in flat if path[-1].key == "lora_b") > 0
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [r["step"] for r in rows] == [1, 2, 3]
  for key in ("reward/mean", "reward/checklist", "reward/preservation", "train/kl",
              "train/clip_fraction", "train/ratio_min", "train/ratio_max"):
    assert all(np.isfinite(r[key]) for r in rows), key
  # Over an iteration's 4 updates (the first on-policy) the ratio stays near 1 at this lr.
  assert abs(rows[0]["train/ratio_min"] - 1) < 1e-3
  curve = json.load(open(os.path.join(workdir, "curve.json")))
  assert [p["step"] for p in curve] == [0, 3]
  assert {"edit_success", "reward", "preservation"} <= set(curve[0])
  samples = os.listdir(os.path.join(workdir, "samples"))
  assert "rollout_0000003.png" in samples and "step_0000003.png" in samples


def test_resume_continues_the_same_run(lora_run, small_data_dir, sft_dir, tmp_path):
  workdir, config = lora_run
  first = grpo_config(small_data_dir, sft_dir, **{"train.num_steps": 2})
  editor_grpo.train(first, str(tmp_path))
  editor_grpo.train(config, str(tmp_path))  # resumes at step 2, runs step 3
  want = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  got = [json.loads(line) for line in open(os.path.join(tmp_path, "metrics.jsonl"))]
  assert [r["step"] for r in got] == [1, 2, 3]
  for a, b in zip(want, got):
    assert a == pytest.approx(b, rel=1e-6, abs=1e-9)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(_state(workdir, config).params),
               jax.device_get(_state(str(tmp_path), config).params))


def test_eval_writes_before_and_after(lora_run, capsys):
  workdir, config = lora_run
  summary = editor_grpo.run_eval(config, workdir)
  saved = json.load(open(os.path.join(workdir, "eval", "metrics.json")))
  assert saved["edit_success"] == pytest.approx(summary["edit_success"])
  for key in ("edit_success", "checklist_score", "reward", "preservation",
              "edit_success_by_task", "num_examples"):
    assert key in saved and key in saved["before"], key
  assert saved["num_examples"] == 8
  assert saved["change"]["reward"] == pytest.approx(saved["reward"] - saved["before"]["reward"])
  assert os.path.exists(os.path.join(workdir, "eval", "edits_before.png"))


def test_a_lora_run_starts_another_with_its_adapters_merged(lora_run, small_data_dir,
                                                             tmp_path):
  """A LoRA GRPO run as init_from (of a full fine-tuning run here): the start is its base with
  its EMA adapters folded in, W + (alpha / r) A B."""
  workdir, config = lora_run
  state = jax.device_get(_state(workdir, config))
  want = lora.merge(lora.join(state.ema_params, state.base), config.model.lora_rank,
                    config.model.lora_alpha or config.model.lora_rank)
  full = grpo_config(small_data_dir, workdir, **{"model.lora_rank": 0})
  pretrained.copy_tokenizer(workdir, str(tmp_path))
  setup = editor_grpo.make_setup(full, str(tmp_path))
  got = jax.device_get(editor_policy.load_sft(setup, workdir))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), got,
               jax.device_get(want))
  moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), got, state.base)
  assert max(jax.tree.leaves(moved)) > 0  # the adapters changed something


def test_full_fine_tuning_keeps_a_frozen_reference(small_data_dir, sft_dir, tmp_path):
  config = grpo_config(small_data_dir, sft_dir, **{"model.lora_rank": 0, "train.num_steps": 1,
                                                   "train.eval_every": 0, "train.lr": 1e-3})
  editor_grpo.train(config, str(tmp_path))
  state = jax.device_get(_state(str(tmp_path), config))
  sft = jax.device_get(_sft_params(sft_dir, config))
  assert state.base is None
  jax.tree.map(np.testing.assert_array_equal, state.reference, sft)
  moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), state.params, sft)
  assert max(jax.tree.leaves(moved)) > 0


def test_config_errors_name_the_problem(small_data_dir, sft_dir, tmp_path):
  with pytest.raises(ConfigError, match="init_from"):
    editor_grpo.train(grpo_config(small_data_dir, ""), str(tmp_path / "a"))
  with pytest.raises(ConfigError, match="no checkpoint"):
    os.makedirs(tmp_path / "empty")
    open(tmp_path / "empty" / "tokenizer.json", "w").write(
        open(os.path.join(sft_dir, "tokenizer.json")).read())
    editor_grpo.train(grpo_config(small_data_dir, str(tmp_path / "empty")), str(tmp_path / "b"))
  with pytest.raises(ConfigError, match="model.num_layers = 1 there, 2 here"):
    editor_grpo.train(grpo_config(small_data_dir, sft_dir, **{"model.num_layers": 2}),
                      str(tmp_path / "c"))
  with pytest.raises(ConfigError, match="model.scan_layers = False there, True here"):
    editor_grpo.train(grpo_config(small_data_dir, sft_dir, **{"model.scan_layers": True}),
                      str(tmp_path / "c2"))
  with pytest.raises(ConfigError, match="group_size"):
    editor_grpo.train(grpo_config(small_data_dir, sft_dir, **{"rollout.group_size": 1}),
                      str(tmp_path / "d"))
  with pytest.raises(ConfigError, match="no rewards configured"):
    editor_grpo.train(grpo_config(small_data_dir, sft_dir, **{
        "rewards.checklist": {"weight": 0.0, "strict": False},
        "rewards.preservation": {"weight": 0.0}}), str(tmp_path / "e"))


def test_update_on_eight_devices_matches_one(small_data_dir, sft_dir, tmp_path):
  """One rollout on one device; the same trajectories and rewards updated on a (2, 2, 2)
  mesh and on one device give the same parameters and metrics."""
  config = grpo_config(small_data_dir, sft_dir)
  pretrained.copy_tokenizer(sft_dir, str(tmp_path))
  one = editor_grpo.make_setup(config, str(tmp_path), devices=jax.devices()[:1])
  config8 = grpo_config(small_data_dir, sft_dir)
  config8.mesh.shape = (2, 2, 2)
  eight = editor_grpo.make_setup(config8, str(tmp_path))
  (s1, m1), (s8, m8) = update_after_one_rollout((one, eight), editor_grpo.make_update, config,
                                                 sft_dir, 8)
  assert_sharded_close(s1.params, s8.params, rtol=2e-3, atol=1e-6)
  assert_sharded_close(s1.ema_params, s8.ema_params, rtol=2e-3, atol=1e-6)
  for k in m1:
    assert_sharded_close(m1[k], m8[k], rtol=1e-3, atol=1e-6, err_msg=k)


def test_overlapped_rollouts_run_one_update_behind(small_data_dir, sft_dir, tmp_path):
  """Rollouts on 4 devices overlapping the update on the other 4: iteration k updates on
  rollouts of the parameters before update k - 1 (before update 1 for k = 1, 2), as written
  out below one step after another, on the same meshes. Resumed from step 1's checkpoint,
  saved while step 2's rollouts were in flight, the run ends the same."""
  config = grpo_config(small_data_dir, sft_dir, **{
      "rollout.rollout_devices": 4, "train.eval_every": 0, "train.sample_every": 0,
      "train.keep_checkpoints": 3, "train.lr": 1e-2})  # steps that move the policy
  whole, resumed = tmp_path / "whole", tmp_path / "resumed"
  editor_grpo.train(config, str(whole))
  resume_after_step_one(whole, resumed, lambda workdir: editor_grpo.train(config, workdir))

  ref_dir = str(tmp_path / "reference")
  pretrained.copy_tokenizer(sft_dir, ref_dir)
  setup, rollout_setup = overlap.make_setups(editor_grpo.make_setup, config, ref_dir)
  assert rollout_setup.mesh.devices.size == 4 and setup.mesh.devices.size == 4
  assert not set(rollout_setup.mesh.devices.flat) & set(setup.mesh.devices.flat)
  state = editor_policy.init_state(setup, editor_policy.load_sft(setup, sft_dir))
  prompts = editor_policy.train_prompts(setup)
  rollout, update = editor_policy.make_rollout(rollout_setup), editor_grpo.make_update(setup)
  reward_fn = editor_policy.make_rewards(config, setup.world)
  base = overlap.to_mesh(state.base, rollout_setup.mesh)

  def rollouts(step, params):
    chunks, _ = editor_policy.rollout_and_score(
        rollout_setup, rollout, reward_fn,
        jax.device_put(params, rollout_setup.state_shardings.params),
        base, editor_policy.next_prompts(prompts, config.rollout),
        setup.levels_and_steps(step)[0], jax.random.fold_in(jax.random.key(0), step))
    return overlap.to_mesh(chunks, setup.mesh)

  def update_on(state, step, chunks):
    return update(state, chunks, *setup.levels_and_steps(step))

  params0 = jax.device_get(state.params)
  first, second = rollouts(1, params0), rollouts(2, params0)
  state, m1 = update_on(state, 1, first)
  params1 = jax.device_get(state.params)
  third = rollouts(3, params1)
  state, m2 = update_on(state, 2, second)
  state, m3 = update_on(state, 3, third)
  want = jax.device_get(state.params)
  assert max(float(np.abs(a - b).max()) for a, b in zip(
      jax.tree.leaves(params1), jax.tree.leaves(want))) > 1e-3  # updates 2, 3 moved it
  for run in (whole, resumed):  # the same programs on the same devices: equal, bit for bit
    assert_logged_exactly(run, [m1, m2, m3])
    jax.tree.map(np.testing.assert_array_equal,
                 jax.device_get(_state(str(run), config).params), want)


def test_overlap_config_errors(small_data_dir, sft_dir, tmp_path):
  pretrained.copy_tokenizer(sft_dir, str(tmp_path))
  for devices in (8, -1):
    config = grpo_config(small_data_dir, sft_dir, **{"rollout.rollout_devices": devices})
    with pytest.raises(ConfigError, match=rf"'rollout.rollout_devices' = {devices} must be in "
                                          r"\[0, 8\): 0 runs rollout and update on every"):
      overlap.make_setups(editor_grpo.make_setup, config, str(tmp_path))
