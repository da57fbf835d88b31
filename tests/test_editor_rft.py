"""Rejection-sampling fine-tuning (trainers/editor_rft): each group's best-judged edit is the
flow-matching target; masked or low-scored groups train nothing; the targets pad to split
over the data-parallel devices. On edit records the README's block runs it
(tests/test_own_data_readme.py)."""

import jax.numpy as jnp
import numpy as np

from conftest import tiny_editor_config
from jaxedit import schema
from jaxedit.trainers import editor_rft


def rft_config(data_dir, init_from):
  sft = tiny_editor_config(data_dir)
  config = schema.editor_rft()
  for section in ("data", "tokenizer", "model", "sample"):
    config[section] = sft[section]
  config.eval.batch_size, config.eval.num_examples = 8, 8
  config.model.text_max_len = 64  # as in tiny_editor_dir
  config.init_from = init_from
  r = config.rollout
  r.prompts_per_step, r.group_size, r.rollout_chunks, r.num_steps = 4, 2, 1, 3
  t = config.train
  t.num_steps, t.eval_every, t.sample_every, t.checkpoint_every = 2, 2, 2, 1
  t.eval_examples, t.sample_examples, t.async_checkpoints = 8, 4, False
  return config


def test_best_of_groups_picks_the_best_scored():
  nan = np.nan
  rewards = jnp.array([0.2, 0.9, 0.1,   # best: index 1
                       nan, 0.3, 0.4,   # masked never chosen: 5
                       nan, nan, nan,   # all masked: weight 0
                       0.05, 0.02, 0.0])  # best below min_reward 0.1: weight 0
  index, keep = editor_rft.best_of_groups(rewards, 3, 0.1)
  np.testing.assert_array_equal(index[np.asarray(keep) > 0], [1, 5])
  np.testing.assert_array_equal(keep, [1, 1, 0, 0])
  assert index.shape == (4,) and (np.asarray(index) < 12).all()


def test_update_on_eight_devices_matches_one(small_data_dir, tiny_editor_dir, tmp_path):
  """One rollout on one device, a masked sample and a group below the bar among its
  rewards; the update on 8 data-parallel devices (4 targets padded to 8 there) and on one device
  gives the same parameters and metrics, and trains on the kept targets only."""
  import jax

  from conftest import assert_sharded_close
  from jaxedit.data.pipeline import make_dataset
  from jaxedit.interop import pretrained
  from jaxedit.rl import editor_policy

  config = rft_config(small_data_dir, tiny_editor_dir)
  config.rft.min_reward = 0.5
  pretrained.copy_tokenizer(tiny_editor_dir, str(tmp_path))
  one = editor_rft.make_setup(config, str(tmp_path), devices=jax.devices()[:1])
  config8 = rft_config(small_data_dir, tiny_editor_dir)
  config8.rft.min_reward, config8.mesh.shape = 0.5, (8, 1, 1)
  eight = editor_rft.make_setup(config8, str(tmp_path))
  assert (editor_rft.minibatch_size(one), editor_rft.minibatch_size(eight)) == (4, 8)
  state = editor_policy.init_state(one, editor_policy.load_sft(one, tiny_editor_dir))
  prompts = next(iter(make_dataset(
      one.source("train"), 4, seed=0, fields=editor_policy.PROMPT_FIELDS, kinds=("atomic",),
      map_fn=lambda r: editor_policy.tokenize(one, r))))
  levels, trained = one.levels_and_steps(1)
  chunks, _ = editor_policy.rollout_and_score(
      one, editor_policy.make_rollout(one), editor_policy.make_rewards(config, one.world),
      state.params, state.base, prompts, levels, jax.random.key(0))
  chunks = jax.device_get(chunks)
  chunks[0]["rewards"] = np.array([0.9, np.nan, 0.2, 0.7, 0.1, 0.3, np.nan, 0.6], np.float32)
  host_state = jax.device_get(state)
  results = []
  for setup in (one, eight):
    placed = jax.device_put(host_state, setup.state_shardings)
    traj = editor_policy.trajectory_sharding(setup)
    put = [{k: jax.device_put(v, traj if k in ("latents", "log_probs") else setup.batch_sharding)
            for k, v in c.items()} for c in chunks]
    new, metrics = editor_rft.make_update(setup)(placed, put, levels, trained)
    results.append(jax.device_get((new.params, metrics)))
  (p1, m1), (p8, m8) = results
  assert float(m1["kept_fraction"]) == 0.75  # groups 0, 1, 3 reach 0.5; group 2 does not
  assert np.isfinite(float(m1["loss"])) and float(m1["grad_norm"]) > 0
  changed = jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(a - b).max(), p1,
                                         jax.device_get(state.params)))
  assert max(changed) > 0
  assert_sharded_close(p1, p8, rtol=2e-3, atol=1e-6)
  for k in m1:
    assert_sharded_close(m1[k], m8[k], rtol=1e-3, atol=1e-6, err_msg=k)
