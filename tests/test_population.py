"""Population mode: K learning rates trained at once in one program follow the runs they
stand for, step for step."""

import json
import os

import pytest

from conftest import losses, tiny_editor_config
from jaxedit.config import ConfigError
from jaxedit.trainers import editor_sft

RATES = (1e-3, 4e-3)


def test_population_follows_the_single_runs(small_data_dir, tmp_path):
  config = lambda: tiny_editor_config(small_data_dir, num_steps=3, checkpoint_every=0)
  pop = config()
  pop.mesh.shape = (2, 4, 1)
  pop.population = json.dumps([{"train.lr": lr} for lr in RATES])
  out = editor_sft.train(pop, str(tmp_path / "pop"))
  assert [m["settings"]["train.lr"] for m in out["members"]] == list(RATES)
  summary = json.load(open(tmp_path / "pop" / "population.json"))
  assert [m["num_examples"] for m in summary] == [8, 8]
  # Member 1 (not the config's rate) follows the run it stands for, step for step.
  single = config()
  single.mesh.shape, single.train.lr = (2, 4, 1), RATES[1]
  single.train.eval_every = single.train.sample_every = -1
  editor_sft.train(single, str(tmp_path / "single"))
  expected, got = losses(tmp_path / "single"), losses(tmp_path / "pop" / "member_1")
  assert sorted(got) == [1, 2, 3]
  for step in expected:
    assert got[step] == pytest.approx(expected[step], rel=1e-5), step
  # The two members did train differently from step 2 on (their rates differ).
  a, b = (losses(tmp_path / "pop" / f"member_{i}") for i in range(2))
  assert a[1] == b[1] and a[3] != b[3]


def test_population_refuses_settings_that_change_the_program(small_data_dir, tmp_path):
  config = tiny_editor_config(small_data_dir)
  config.population = json.dumps([{"train.lr": 1e-3}, {"train.batch_size": 16}])
  with pytest.raises(ConfigError, match="'train.batch_size' changes the compiled program"):
    editor_sft.train(config, str(tmp_path))
  config.population = "[{'train.lr': 1e-3}]"
  with pytest.raises(ConfigError, match="JSON list"):
    editor_sft.train(config, str(tmp_path))
  assert not os.path.exists(tmp_path / "checkpoints")
