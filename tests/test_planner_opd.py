"""Planner OPD: zero KL and gradient at the teacher, routing by task, both KL variants,
8 devices = 1, and train/eval end to end."""

import json

import jax
import numpy as np
import pytest

from conftest import assert_sharded_close, tiny_planner_config
from jaxedit.data.pipeline import make_dataset
from jaxedit import planning, schema, sharding
from jaxedit.config import ConfigError
from jaxedit.shapes.edits import TASKS
from jaxedit.trainers import planner_opd
from jaxedit.rl import planner_policy


def opd_config(data_dir, init_from, teachers, **opd):
  config = schema.planner_opd()
  sft = tiny_planner_config(data_dir)
  for section in ("data", "tokenizer", "model", "prompt"):
    config[section] = sft[section]
  config.init_from = str(init_from)
  config.init_params = "raw"  # the teachers use the SFT run's EMA: the two differ
  for task, workdir in teachers.items():
    config.opd.teachers[task] = str(workdir)
  r = config.rollout
  r.prompts_per_step, r.group_size, r.minibatches = 8, 2, 2
  for k, v in opd.items():  # each into its section: rollout or opd
    (r if k in r else config.opd)[k] = v
  t = config.train
  t.num_steps, t.log_every, t.eval_every, t.checkpoint_every = 2, 1, 2, 1
  t.eval_examples, t.async_checkpoints = 8, False
  config.eval.batch_size, config.eval.num_examples = 8, 16
  return config


def _perturbed(params, seed):
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape, x.dtype)
                                   for k, x in zip(keys, leaves)])


@pytest.fixture(scope="module")
def rollout(small_data_dir, tiny_planner_dir, tmp_path_factory):
  """A student state (one device) and one rollout batch of 16 plans with routes."""
  workdir = str(tmp_path_factory.mktemp("planner_opd"))
  config = opd_config(small_data_dir, tiny_planner_dir,
                      {t: tiny_planner_dir for t in TASKS}, minibatches=1)
  setup = planner_opd.make_setup(config, workdir, devices=jax.devices()[:1])
  start = _perturbed(planner_policy.load_start(setup, tiny_planner_dir, "params"), 0)
  state = planner_policy.init_state(setup, start)
  records = next(iter(make_dataset(setup.source("train"), 8, seed=0,
                                               fields=planner_policy.ROLLOUT_FIELDS,
                                               kinds=("abstract",))))
  arrays, _, repeated = planner_policy.rollout(setup, planning.make_plan_sampler(setup),
                                             state.params, records, jax.random.key(0))
  host = {**{k: arrays[k] for k in planner_policy.BATCH_FIELDS},
          **planner_opd.OPD.extra_fields(setup, repeated)}
  return config, workdir, setup, jax.device_get(state), host, list(repeated["task"])


def _update(setup, state, host, teachers):
  state = jax.device_put(state, planner_policy.state_shardings(setup))
  batch = sharding.global_batch(host, setup.batch_sharding)
  rewards = sharding.global_batch({"r": np.zeros(len(host["route"]), np.float32)},
                                  setup.batch_sharding)["r"]
  new, metrics = planner_opd.make_update(setup, [jax.device_put(t, setup.state_shardings.params)
                                                 for t in teachers])(state, batch, rewards)
  return jax.device_get((new.params, metrics))


@pytest.mark.parametrize("kl", ["sampled", "full_vocab"])
def test_zero_at_the_teacher_and_routing_by_task(rollout, small_data_dir, tiny_planner_dir, kl):
  _, workdir, _, state, host, tasks = rollout
  config = opd_config(small_data_dir, tiny_planner_dir, {t: tiny_planner_dir for t in TASKS},
                      minibatches=1, kl=kl)
  setup = planner_opd.make_setup(config, workdir, devices=jax.devices()[:1])
  student = state.params
  _, same = _update(setup, state, host, [student] * 3)
  # Teachers in TASKS order: only the colour prompts' teacher differs from the student.
  _, mixed = _update(setup, state, host, [_perturbed(student, 1), student, student])
  assert "colour" in tasks and set(tasks) - {"colour"}, tasks
  assert abs(float(same["kl"])) < 1e-6 and float(same["grad_norm"]) < 1e-6
  assert float(mixed["kl_colour"]) > 1e-3 and float(mixed["grad_norm"]) > 1e-3
  for task in set(tasks) - {"colour"}:
    assert abs(float(mixed[f"kl_{task}"])) < 1e-6, task


def test_update_on_eight_devices_matches_one(rollout, small_data_dir, tiny_planner_dir):
  config, workdir, one, state, host, _ = rollout
  config8 = opd_config(small_data_dir, tiny_planner_dir, {t: tiny_planner_dir for t in TASKS},
                       minibatches=1)
  config8.mesh.shape = (2, 2, 2)
  eight = planner_opd.make_setup(config8, workdir)
  teachers = [_perturbed(state.params, s) for s in (1, 2, 3)]
  p1, m1 = _update(one, state, host, teachers)
  p8, m8 = _update(eight, state, host, teachers)
  assert float(m1["kl"]) > 1e-3
  assert_sharded_close(p1, p8, rtol=2e-3, atol=1e-6)
  for k in m1:
    assert_sharded_close(m1[k], m8[k], rtol=1e-3, atol=1e-6, err_msg=k)


def test_train_and_eval(small_data_dir, tiny_planner_dir, tmp_path):
  config = opd_config(small_data_dir, tiny_planner_dir, {t: tiny_planner_dir for t in TASKS},
                      kl="full_vocab")
  out = planner_opd.train(config, str(tmp_path))
  assert [p["step"] for p in out["curve"]] == [0, 2]
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert [r["step"] for r in rows] == [1, 2]
  assert rows[0]["train/kl"] > 0 and {"reward/mean", "train/kl_colour"} <= set(rows[0])
  summary = planner_opd.run_eval(config, str(tmp_path))
  saved = json.load(open(tmp_path / "eval" / "metrics.json"))
  assert saved["plan_checklist_score"] == pytest.approx(summary["plan_checklist_score"])
  assert "before" in saved and "change" in saved
  assert set(saved["plan_checklist_score_by_task"]) <= set(TASKS)


def test_config_errors_name_the_problem(small_data_dir, tiny_planner_dir, tmp_path):
  with pytest.raises(ConfigError, match="no teacher"):
    planner_opd.train(opd_config(small_data_dir, tiny_planner_dir, {}), str(tmp_path / "a"))
  with pytest.raises(ConfigError, match="prompts of task 'geometry' have no teacher"):
    planner_opd.train(opd_config(small_data_dir, tiny_planner_dir,
                                 {"colour": tiny_planner_dir}), str(tmp_path / "b"))
  with pytest.raises(ConfigError, match="opd.kl"):
    planner_opd.train(opd_config(small_data_dir, tiny_planner_dir,
                                 {"colour": tiny_planner_dir}, kl="forward"),
                      str(tmp_path / "c"))


def test_lora_student_learns_adapters_over_the_frozen_start(small_data_dir, tiny_planner_dir,
                                                            tmp_path):
  """A LoRA student: the teachers (full models) shaped as its whole model with zero
  adapters; two updates move the adapters and keep the base the SFT LM it started from."""
  from flax.traverse_util import flatten_dict
  from jaxedit import checkpoint
  config = opd_config(small_data_dir, tiny_planner_dir, {t: tiny_planner_dir for t in TASKS})
  config.model.lora_rank, config.model.lora_alpha = 4, 4.0
  config.train.lr, config.train.warmup_steps = 1e-2, 0
  planner_opd.train(config, str(tmp_path))
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert rows[0]["train/kl"] != 0 and rows[0]["train/grad_norm"] > 0  # sampled-token KL: any sign
  mngr, step = checkpoint.latest_step(str(tmp_path), "a planner workdir")
  base = flatten_dict(checkpoint.restore_subtree_on_host(mngr, step, "base"))
  trained = flatten_dict(checkpoint.restore_subtree_on_host(mngr, step, "params"))
  sft_mngr, sft_step = checkpoint.latest_step(tiny_planner_dir, "a planner workdir")
  sft = flatten_dict(checkpoint.restore_subtree_on_host(sft_mngr, sft_step, "params"))
  assert base and all(k[0] == "lm" for k in base)
  for k, v in base.items():
    np.testing.assert_array_equal(v, sft[k])
  assert max(float(np.abs(v).max()) for k, v in trained.items() if k[-1] == "lora_b") > 0
