"""The RL loop with a policy and an algorithm of the test's own (a Gaussian bandit trained
by group-normalised REINFORCE): what a new algorithm or policy plugs into; and train states
saved under the old field name `frozen` restore under today's names."""

import dataclasses
import json
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import resume_after_step_one
from jaxedit import checkpoint, grpo, sharding
from jaxedit.config import ConfigError
from jaxedit.rl import driver
from jaxedit.rl.driver import PolicyState

TARGET, GROUP, LR = 3.0, 16, 0.2


class Prompts:
  """A checkpointable iterator of iteration seeds."""

  def __init__(self):
    self.position = 0

  def __next__(self):
    self.position += 1
    return self.position

  def get_state(self):
    return {"position": self.position}

  def set_state(self, state):
    self.position = state["position"]


@dataclasses.dataclass
class Setup:
  config: Any
  mesh: Any


class Bandit(driver.Policy):
  """Actions a ~ N(mu, 1), reward -(a - TARGET)^2; the reference is the start."""

  start_kind = "a bandit"

  @staticmethod
  def abstract_state(setup):
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=sharding.replicated(setup.mesh))
    return PolicyState(jax.ShapeDtypeStruct((), jnp.int32,
                                            sharding=sharding.replicated(setup.mesh)),
                       {"mu": scalar}, {"mu": scalar}, None, reference={"mu": scalar})

  @classmethod
  def evaluate(cls, setup, state, out):
    after, before = float(state.ema_params["mu"]), float(state.reference["mu"])
    return {"mu": after, "before": {"mu": before}, "change": driver.change({"mu": before},
                                                                            {"mu": after})}

  def start_state(self):
    mu = {"mu": jnp.float32(float(self.setup.config.init_from))}
    return PolicyState(jnp.int32(0), mu, mu, None, reference=mu)

  def train_prompts(self):
    return Prompts()

  def roll(self, step, params, base, data_iter):
    assert base is None  # no LoRA base: the bandit trains every parameter
    seed = next(data_iter)
    noise = np.random.default_rng(seed).standard_normal(GROUP).astype(np.float32)
    actions = float(params["mu"]) + noise
    return actions, -(actions - TARGET) ** 2

  def update_inputs(self, rollouts, step):
    return tuple(jnp.asarray(x) for x in rollouts)

  def scalars(self, rollouts):
    return {"reward/mean": float(np.mean(rollouts[1]))}

  def validate(self, state, step):
    return {"mu": float(state.ema_params["mu"])}, None


def make_update(setup):
  @jax.jit
  def update(state, actions, rewards):
    advantages = grpo.group_advantages(rewards, GROUP, std_scope="group")
    grad = jnp.mean(advantages * (actions - state.params["mu"]))  # d/dmu E[A log p(a)]
    mu = {"mu": state.params["mu"] + LR * grad}
    return state.replace(step=state.step + 1, params=mu, ema_params=mu), {"grad": grad}
  return update


REINFORCE = driver.Algorithm(
    "REINFORCE", Bandit, lambda config, workdir, devices=None: Setup(
        config, jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("x",))), make_update)


def bandit_config(num_steps=6):
  return ml_collections.ConfigDict({
      "init_from": "0.0",
      "rollout": {"rollout_devices": 0},
      "train": {"num_steps": num_steps, "log_every": 1, "eval_every": 3, "sample_every": -1,
                "checkpoint_every": 1, "keep_checkpoints": 10, "async_checkpoints": False}})


def test_a_policy_and_algorithm_of_ones_own_train_resume_and_evaluate(tmp_path):
  config = bandit_config()
  whole, resumed = tmp_path / "whole", tmp_path / "resumed"
  out = driver.train(config, str(whole), REINFORCE)
  assert out["step"] == 6 and [p["step"] for p in out["curve"]] == [0, 3, 6]
  rows = [json.loads(line) for line in open(whole / "metrics.jsonl")]
  assert [r["step"] for r in rows] == list(range(1, 7))
  rewards = [r["reward/mean"] for r in rows]
  assert np.mean(rewards[-2:]) > np.mean(rewards[:2])  # the policy moved towards TARGET
  assert all(r["train/grad"] > 0 for r in rows)  # mu < TARGET all along: pushed up
  # Resumed from step 1 (data position included), the run ends with the same metrics.
  resume_after_step_one(whole, resumed, lambda w: driver.train(config, w, REINFORCE))
  again = [json.loads(line) for line in open(resumed / "metrics.jsonl")]
  assert again == rows
  summary = driver.run_eval(config, str(resumed), REINFORCE)
  assert summary["step"] == 6 and summary["before"]["mu"] == 0.0
  assert summary["change"]["mu"] == pytest.approx(summary["mu"]) and summary["mu"] > 0
  assert json.load(open(resumed / "eval" / "metrics.json"))["mu"] == summary["mu"]


def test_a_fresh_run_needs_a_start(tmp_path):
  config = bandit_config()
  config.init_from = ""
  with pytest.raises(ConfigError, match="init_from.*a bandit"):
    driver.train(config, str(tmp_path), REINFORCE)


@flax.struct.dataclass
class SavedBefore:
  """An RL state as runs saved it before the base and the reference had names of their own."""
  step: Any
  params: Any
  frozen: Any


@pytest.mark.parametrize("field", ["base", "reference"])
def test_states_saved_with_frozen_restore_under_todays_names(field, tmp_path):
  mngr = checkpoint.manager(str(tmp_path), 1, async_save=False)
  old = SavedBefore(jnp.int32(4), {"w": jnp.arange(3.0)}, {"w": jnp.full(3, 7.0)})
  checkpoint.save(mngr, 4, old, None, ml_collections.ConfigDict({"trainer": "x"}))
  replicated = sharding.replicated(jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("x",)))
  a = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated)
  target = PolicyState(a(old.step), jax.tree.map(a, old.params), None, None,
                       **{field: jax.tree.map(a, old.frozen)})
  state = checkpoint.restore(mngr, 4, target)
  assert isinstance(state, PolicyState) and int(state.step) == 4
  np.testing.assert_array_equal(getattr(state, field)["w"], np.full(3, 7.0))
  np.testing.assert_array_equal(state.params["w"], np.arange(3.0))
  assert getattr(state, {"base": "reference", "reference": "base"}[field]) is None
  sub = checkpoint.restore_subtree(mngr, 4, field, jax.tree.map(a, old.frozen))
  np.testing.assert_array_equal(sub["w"], np.full(3, 7.0))
