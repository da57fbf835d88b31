"""Online policy distillation: the per-step KL against float64 maths, the ODE limit, routing,
the token-level KLs, and the editor OPD trainer (zero loss at the teacher, routing inside the
update, 8 devices = 1, train and eval end to end)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxedit import lora, opd, schema
from jaxedit.config import ConfigError
from jaxedit.interop import pretrained
from jaxedit.trainers import editor_opd
from jaxedit.rl import editor_policy
from jaxedit.data.pipeline import make_dataset

from conftest import assert_sharded_close, tiny_editor_config


# ------------------------------------------------------------------------------------------
# Maths in float64.
# ------------------------------------------------------------------------------------------
def mean_and_std64(x, v, t, t_next, a, sde_type):
  """docs/design.md section 5, transcribed in float64."""
  x, v = np.float64(x), np.float64(v)
  dt = t_next - t
  if sde_type == "sde":
    sigma = a * np.sqrt(t / (1 - (t_next if t >= 1 else t)))
    mean = x * (1 + sigma**2 / (2 * t) * dt) + v * (1 + sigma**2 * (1 - t) / (2 * t)) * dt
    return mean, sigma * np.sqrt(-dt)
  std = t_next * np.sin(a * np.pi / 2)
  mean = (x - t * v) * (1 - t_next) + (x + (1 - t) * v) * np.sqrt(t_next**2 - std**2)
  return mean, std


def numerical_kl(mu_p, mu_q, std):
  """sum over dims of the integral of p log(p / q), p = N(mu_p, std^2), q = N(mu_q, std^2),
  by the trapezoidal rule on a fine grid."""
  total = 0.0
  for a, b in zip(mu_p.ravel(), mu_q.ravel()):
    y = np.linspace(a - 14 * std, a + 14 * std, 20_001)
    logp = -(y - a) ** 2 / (2 * std**2) - np.log(std * np.sqrt(2 * np.pi))
    logq = -(y - b) ** 2 / (2 * std**2) - np.log(std * np.sqrt(2 * np.pi))
    total += np.trapezoid(np.exp(logp) * (logp - logq), y)
  return total


@pytest.mark.parametrize("sde_type, t, t_next", [("sde", 0.75, 0.6), ("sde", 1.0, 0.9),
                                                 ("cps", 0.75, 0.6)])
def test_step_kl_equals_numerical_kl(sde_type, t, t_next):
  rng = np.random.default_rng(0)
  x, v_s, v_t = (rng.normal(size=(2, 3, 2, 2)) for _ in range(3))
  got = np.asarray(opd.step_kl(jnp.float32(x), jnp.float32(v_s), jnp.float32(v_t), t, t_next,
                               0.7, sde_type))
  for i in range(2):
    mu_s, std = mean_and_std64(x[i], v_s[i], t, t_next, 0.7, sde_type)
    mu_t, _ = mean_and_std64(x[i], v_t[i], t, t_next, 0.7, sde_type)
    np.testing.assert_allclose(got[i], numerical_kl(mu_s, mu_t, std), rtol=2e-4)


def test_ode_branch_is_the_limit_of_mean_matching():
  rng = np.random.default_rng(1)
  x, v_s, v_t = (rng.normal(size=(3, 4, 4, 3)) for _ in range(3))
  t, t_next = 0.7, 0.55
  ode = np.asarray(opd.step_kl(jnp.float32(x), jnp.float32(v_s), jnp.float32(v_t), t, t_next,
                               0.0))
  # Noise level 0: 0.5 ||mu_S - mu_T||^2 with Euler means, = 0.5 dt^2 ||v_S - v_T||^2.
  want = 0.5 * (t_next - t) ** 2 * ((v_s - v_t) ** 2).sum((1, 2, 3))
  np.testing.assert_allclose(ode, want, rtol=1e-5)
  # s^2 KL of the SDE step tends to it as the noise level a -> 0 (the error is O(a^2)).
  gaps = []
  for a in (0.3, 0.03, 0.003):
    kl = np.asarray(opd.step_kl(jnp.float32(x), jnp.float32(v_s), jnp.float32(v_t), t,
                                t_next, a), np.float64)
    _, std = mean_and_std64(x[0], v_s[0], t, t_next, a, "sde")
    gaps.append(np.abs(std**2 * kl - want).max() / want.max())
  assert gaps[0] > 10 * gaps[1] > 0 and gaps[2] < 1e-4, gaps


def test_routing():
  tasks = ["geometry", "colour", "colour", "geometry"]
  assert opd.route(tasks, ["colour", "geometry"], "task") == [1, 0, 0, 1]
  assert opd.route(tasks, ["colour", "geometry"], "round_robin") == [0, 1, 0, 1]
  with pytest.raises(ValueError, match="no teacher for task 'geometry'"):
    opd.route(tasks, ["colour"], "task")
  per_teacher = jnp.stack([jnp.zeros((4, 2)), jnp.ones((4, 2))])
  np.testing.assert_array_equal(opd.routed(per_teacher, jnp.array([1, 0, 0, 1])),
                                [[1, 1], [0, 0], [0, 0], [1, 1]])


def test_token_kls():
  rng = np.random.default_rng(2)
  student, teacher = rng.normal(size=(2, 3, 7)), rng.normal(size=(2, 3, 7))
  logp = lambda z: z - np.log(np.exp(z).sum(-1, keepdims=True))
  p = np.exp(logp(student))
  want = (p * (logp(student) - logp(teacher))).sum(-1)
  np.testing.assert_allclose(opd.full_vocab_kl(jnp.float32(student), jnp.float32(teacher)),
                             want, rtol=1e-5)
  assert np.abs(opd.full_vocab_kl(jnp.float32(student), jnp.float32(student))).max() < 1e-6

  # The sampled-token surrogate's expected gradient (exact expectation over the vocabulary)
  # is the gradient of the exact reverse KL.
  def expected_surrogate_grad(z):
    def per_token(z, y):
      ls = jax.nn.log_softmax(z)[y]
      lt = jax.nn.log_softmax(jnp.float32(teacher[0, 0]))[y]
      return opd.sampled_token_kl(ls, lt)[0]
    probs = jax.nn.softmax(z)
    grads = jnp.stack([jax.grad(per_token)(z, y) for y in range(z.shape[0])])
    return (jax.lax.stop_gradient(probs)[:, None] * grads).sum(0)

  z = jnp.float32(student[0, 0])
  exact = jax.grad(lambda z: opd.full_vocab_kl(z, jnp.float32(teacher[0, 0])))(z)
  np.testing.assert_allclose(expected_surrogate_grad(z), exact, rtol=1e-4, atol=1e-6)
  _, estimate = opd.sampled_token_kl(jnp.float32(1.5), jnp.float32(0.25))
  assert float(estimate) == pytest.approx(1.25)


# ------------------------------------------------------------------------------------------
# The editor OPD trainer on a tiny model.
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sft_dir(tiny_editor_dir):
  return tiny_editor_dir


def opd_config(data_dir, init_from, teachers, **overrides):
  sft = tiny_editor_config(data_dir)
  config = schema.editor_opd()
  for section in ("data", "tokenizer", "model", "sample"):
    config[section] = sft[section]
  config.eval.batch_size, config.eval.num_examples = 8, 8
  config.model.text_max_len = 64  # as in tiny_editor_dir
  config.init_from = init_from
  config.init_params = "params"  # the teachers are the SFT run's EMA: the two differ
  for task, workdir in teachers.items():
    config.opd.teachers[task] = workdir
  r = config.rollout
  r.prompts_per_step, r.group_size, r.rollout_chunks, r.num_steps = 16, 1, 2, 3
  r.minibatches, r.inner_epochs = 2, 1
  t = config.train
  t.num_steps, t.eval_every, t.sample_every, t.checkpoint_every = 2, 2, 2, 1
  t.eval_examples, t.sample_examples, t.async_checkpoints = 8, 4, False
  t.lr = 1e-3
  config.model.lora_rank = 4
  for key, value in overrides.items():
    section, name = key.rsplit(".", 1)
    node = config
    for part in section.split("."):
      node = node[part]
    node[name] = value
  return config


def _prompts_and_chunks(setup, config, state):
  prompts = next(iter(make_dataset(
      setup.source("train"), 8, seed=0, fields=editor_policy.PROMPT_FIELDS, kinds=("atomic",),
      map_fn=lambda r: editor_policy.tokenize(setup, r))))
  prompts = {**prompts, **editor_opd.route(setup, prompts)}
  levels, trained = setup.levels_and_steps(1)
  chunks, _ = editor_policy.rollout_and_score(
      setup, editor_policy.make_rollout(setup), editor_policy.make_rewards(config, setup.world),
      state.params, state.base, prompts, levels, jax.random.key(0),
      editor_policy.DEVICE_FIELDS + ("route",))
  return prompts, jax.device_get(chunks), levels, trained


def _update(setup, host_state, chunks, levels, trained, teachers):
  state = jax.device_put(host_state, setup.state_shardings)
  traj = editor_policy.trajectory_sharding(setup)
  put = [{k: jax.device_put(v, traj if k in ("latents", "log_probs") else setup.batch_sharding)
          for k, v in c.items()} for c in chunks]
  teachers = [jax.device_put(t, setup.teacher_shardings) for t in teachers]
  new, metrics = editor_opd.make_update(setup, teachers)(state, put, levels, trained)
  return jax.device_get((new.params, metrics))


def _perturbed(params, scale=0.05, seed=7):
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(tree, [x + scale * jax.random.normal(k, x.shape, x.dtype)
                                   for k, x in zip(keys, leaves)])


@pytest.fixture(scope="module")
def one_device(small_data_dir, sft_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("opd_one"))
  # One update per iteration: its metrics are those of the rollout policy itself.
  config = opd_config(small_data_dir, sft_dir, {"colour": sft_dir, "geometry": sft_dir},
                      **{"rollout.minibatches": 1, "rollout.prompts_per_step": 8})
  pretrained.copy_tokenizer(sft_dir, workdir)
  setup = editor_opd.make_setup(config, workdir, devices=jax.devices()[:1])
  # A 4-step SFT run's output layers are still near their zero init, so the student's
  # velocity barely depends on its adapters: perturb the base for a telling gradient.
  state = editor_policy.init_state(setup, _perturbed(
      editor_policy.load_sft(setup, sft_dir)))
  prompts, chunks, levels, trained = _prompts_and_chunks(setup, config, state)
  return config, workdir, setup, jax.device_get(state), prompts, chunks, levels, trained


def test_zero_loss_and_gradient_at_the_teacher_and_routing(one_device):
  config, _, setup, state, prompts, chunks, levels, trained = one_device
  # The student starts as the SFT base (LoRA B = 0): its merged parameters are a teacher
  # equal to it.
  plain = lora.merge(setup.policy(state.params, state.base), 4, 4)
  other = _perturbed(plain, seed=5)
  _, same = _update(setup, state, chunks, levels, trained, [plain, plain])
  _, mixed = _update(setup, state, chunks, levels, trained, [plain, other])
  # Both teachers equal the student: the KL and its gradient vanish (to float32 rounding:
  # merged and applied adapters are summed in different orders).
  assert float(same["kl"]) < 1e-7 * float(mixed["kl_geometry"])
  assert float(same["grad_norm"]) < 1e-3 * float(mixed["grad_norm"])
  # The colour teacher is the student, the geometry teacher differs: only geometry prompts
  # see a KL, so each prompt went to its own task's teacher.
  tasks = set(np.asarray(prompts["task"]).astype(str))
  assert tasks == {"colour", "geometry"}, tasks
  assert float(mixed["kl_colour"]) < 1e-7 * float(mixed["kl_geometry"])


def test_update_on_eight_devices_matches_one(one_device, small_data_dir, sft_dir):
  config, workdir, one, state, _, chunks, levels, trained = one_device
  config8 = opd_config(small_data_dir, sft_dir, {"colour": sft_dir, "geometry": sft_dir},
                       **{"rollout.minibatches": 1, "rollout.prompts_per_step": 8})
  config8.mesh.shape = (2, 2, 2)
  eight = editor_opd.make_setup(config8, workdir)
  teachers = jax.device_get(editor_opd.load_teachers(one))
  p1, m1 = _update(one, state, chunks, levels, trained, teachers)
  p8, m8 = _update(eight, state, chunks, levels, trained, teachers)
  assert float(m1["kl"]) > 0
  assert_sharded_close(p1, p8, rtol=2e-3, atol=1e-6)
  for k in m1:
    assert_sharded_close(m1[k], m8[k], rtol=1e-3, atol=1e-7, err_msg=k)


def test_train_and_eval(small_data_dir, sft_dir, tmp_path):
  """(Resuming is GRPO's loop, tested in test_editor_grpo_trainer.)"""
  config = opd_config(small_data_dir, sft_dir, {"colour": sft_dir, "geometry": sft_dir})
  workdir = str(tmp_path / "run")
  editor_opd.train(config, workdir)
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [r["step"] for r in rows] == [1, 2]
  for key in ("train/kl", "train/kl_colour", "train/kl_geometry", "reward/mean"):
    assert all(np.isfinite(r[key]) for r in rows), key
  assert rows[0]["train/kl"] > 0
  summary = editor_opd.run_eval(config, workdir)
  saved = json.load(open(os.path.join(workdir, "eval", "metrics.json")))
  assert saved["edit_success"] == pytest.approx(summary["edit_success"])
  assert set(saved["edit_success_by_task"]) <= {"colour", "geometry"}
  assert "edit_success_by_task" in saved["before"]


def test_config_errors_name_the_problem(small_data_dir, sft_dir, tmp_path):
  with pytest.raises(ConfigError, match="no teacher"):
    editor_opd.train(opd_config(small_data_dir, sft_dir, {}), str(tmp_path / "a"))
  with pytest.raises(ConfigError, match="prompts of task 'geometry' have no teacher"):
    editor_opd.train(opd_config(small_data_dir, sft_dir, {"colour": sft_dir}),
                     str(tmp_path / "b"))
  with pytest.raises(ConfigError, match="opd.routing"):
    editor_opd.train(opd_config(small_data_dir, sft_dir, {"colour": sft_dir},
                                **{"opd.routing": "random"}), str(tmp_path / "c"))
  with pytest.raises(ConfigError, match="model.num_layers = 1 there, 2 here"):
    editor_opd.train(opd_config(small_data_dir, sft_dir, {"colour": sft_dir},
                                **{"train.tasks": ("colour",), "model.num_layers": 2}),
                     str(tmp_path / "d"))
  with pytest.raises(ConfigError, match="unknown task 'color'"):
    editor_opd.train(opd_config(small_data_dir, sft_dir, {"colour": sft_dir},
                                **{"train.tasks": ("color",)}), str(tmp_path / "e"))
