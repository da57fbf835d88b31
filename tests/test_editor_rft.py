"""Rejection-sampling fine-tuning (trainers/editor_rft): each group's best-judged edit is the
flow-matching target; masked or low-scored groups train nothing; the targets pad to split
over the data-parallel devices. On edit records the README's block runs it
(tests/test_own_data_readme.py)."""

import jax
import jax.numpy as jnp
import numpy as np

from conftest import assert_sharded_close, tiny_editor_config, update_after_one_rollout
from jaxedit import schema
from jaxedit.interop import pretrained
from jaxedit.rl import editor_policy
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
  rewards; the update on 8 data-parallel devices (4 targets padded to 8 there) and on one
  device gives the same parameters and metrics, and trains on the kept targets only."""
  config = rft_config(small_data_dir, tiny_editor_dir)
  config.rft.min_reward = 0.5
  pretrained.copy_tokenizer(tiny_editor_dir, str(tmp_path))
  one = editor_rft.make_setup(config, str(tmp_path), devices=jax.devices()[:1])
  config8 = rft_config(small_data_dir, tiny_editor_dir)
  config8.rft.min_reward, config8.mesh.shape = 0.5, (8, 1, 1)
  eight = editor_rft.make_setup(config8, str(tmp_path))
  assert (editor_rft.minibatch_size(one), editor_rft.minibatch_size(eight)) == (4, 8)
  rewards = np.array([0.9, np.nan, 0.2, 0.7, 0.1, 0.3, np.nan, 0.6], np.float32)
  (s1, m1), (s8, m8) = update_after_one_rollout((one, eight), editor_rft.make_update, config,
                                                 tiny_editor_dir, 4, rewards)
  assert float(m1["kept_fraction"]) == 0.75  # groups 0, 1, 3 reach 0.5; group 2 does not
  assert np.isfinite(float(m1["loss"])) and float(m1["grad_norm"]) > 0
  start = editor_policy.load_sft(one, tiny_editor_dir)
  changed = jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(a - b).max(), s1.params,
                                         jax.device_get(start)))
  assert max(changed) > 0
  assert_sharded_close(s1.params, s8.params, rtol=2e-3, atol=1e-6)
  for k in m1:
    assert_sharded_close(m1[k], m8[k], rtol=1e-3, atol=1e-6, err_msg=k)
