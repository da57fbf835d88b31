"""Flow-GRPO on the editor: recorded log-probs, on-policy ratio, KL at init, 8 devices = 1."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxedit import editing, flow, flow_grpo, grpo, sharding
from jaxedit.trainers import editor_sft
from jaxedit.train import setup as setup_lib

from conftest import assert_sharded_close, tiny_editor_config

T = 4


def test_step_schedule_windows_and_fraction():
  levels, trained = flow_grpo.step_schedule(10, 0.7, 0.99)
  np.testing.assert_array_equal(levels, np.float32(0.7))
  np.testing.assert_array_equal(trained, np.arange(9))  # 0.99 drops the last step
  levels, trained = flow_grpo.step_schedule(10, 0.7, 1.0, window_size=3, window_start=2)
  np.testing.assert_array_equal(levels > 0, [0, 0, 1, 1, 1, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(trained, [2, 3, 4])
  with pytest.raises(ValueError, match="does not fit in 10 steps"):
    flow_grpo.step_schedule(10, 0.7, 1.0, window_size=3, window_start=8)
  with pytest.raises(ValueError, match="no step is trained"):
    flow_grpo.step_schedule(10, 0.7, 0.5, window_size=2, window_start=8)


def _perturbed(params, scale=0.05):
  """Zero-initialised gates and output projection make a fresh model output 0: perturb."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(7), len(leaves))
  return jax.tree.unflatten(tree, [x + scale * jax.random.normal(k, x.shape, x.dtype)
                                   for k, x in zip(keys, leaves)])


@pytest.fixture(scope="module")
def setups(small_data_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("grpo"))
  one = editor_sft.make_setup(tiny_editor_config(small_data_dir), workdir,
                              devices=jax.devices()[:1])
  config8 = tiny_editor_config(small_data_dir)
  config8.mesh.shape = (2, 2, 2)
  eight = editor_sft.make_setup(config8, workdir)
  params = _perturbed(jax.device_get(setup_lib.init_state(one).params))
  batch = editing.eval_batches(one, "train", ("atomic",), 8, 8)[0][0]
  return one, eight, params, batch


def _run(setup, params, batch, kl_beta=0.04):
  """Rollout then the GRPO gradient over the trained steps, on `setup`'s mesh."""
  model = setup.model
  velocity = lambda p, x, t, source, text: model.apply({"params": p}, x, t, source, text)
  levels, trained = flow_grpo.step_schedule(T, 0.7, 0.99)
  times = flow.sigmas(T, 3.0)
  params = jax.device_put(params, setup.state_shardings.params)
  b = sharding.global_batch(batch, setup.batch_sharding)

  def go(params, b):
    source = flow.to_model_space(b["source_image"])
    text = editing.text_inputs(b)
    x1 = jax.random.normal(jax.random.key(0), source.shape)
    out = flow_grpo.rollout(velocity, params, x1, source, text, times, levels,
                            jax.random.key(1))
    rewards = jnp.arange(source.shape[0], dtype=jnp.float32) % 3
    mb = {"latents": out["latents"], "log_probs": out["log_probs"], "source": source,
          "text": text, "advantages": grpo.group_advantages(rewards, 4)}
    frozen = jax.lax.stop_gradient(params)
    ref = lambda x, t, s, c: velocity(frozen, x, t, s, c)
    loss, grads, metrics = flow_grpo.minibatch_grads(
        lambda p, j: flow_grpo.step_loss(velocity, p, ref, mb, j, times, jnp.asarray(levels),
                                         sde_type="sde", clip_range=1e-4, kl_beta=kl_beta),
        params, jnp.asarray(trained))
    return out, loss, grads, metrics

  fn = sharding.Program(jax.jit(go), setup.mesh, setup.rules)
  return jax.device_get(fn(params, b))


def test_recorded_log_probs_ratio_and_kl_at_initialisation(setups):
  one, _, params, batch = setups
  out, loss, grads, metrics = _run(one, params, batch)
  # Recomputing the trained steps' log-probs in training gives the recorded ones: on
  # policy the ratio is 1 (up to float32 recomputation) and nothing is clipped.
  assert float(metrics["logp_drift"]) < 1e-5
  assert abs(float(metrics["ratio_min"]) - 1) < 1e-5
  assert abs(float(metrics["ratio_max"]) - 1) < 1e-5
  assert float(metrics["clip_fraction"]) == 0.0
  # The reference is the policy at initialisation: the KL is zero (up to XLA fusing the two
  # forward passes differently).
  assert float(metrics["kl"]) < 1e-12
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  assert float(global_norm(grads)) > 0
  assert out["latents"].shape == (T + 1, 8, 32, 32, 3)


def global_norm(tree):
  return np.sqrt(sum(float((np.asarray(g, np.float64) ** 2).sum())
                     for g in jax.tree.leaves(tree)))


def test_eight_devices_match_one(setups):
  one, eight, params, batch = setups
  out1, loss1, g1, m1 = _run(one, params, batch)
  out8, loss8, g8, m8 = _run(eight, params, batch)
  np.testing.assert_allclose(out1["latents"], out8["latents"], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(out1["log_probs"], out8["log_probs"], rtol=1e-4, atol=1e-5)
  assert_sharded_close(loss1, loss8, rtol=1e-4, atol=1e-6)
  assert_sharded_close(g1, g8, rtol=1e-3, atol=1e-6)
