"""Sweeps: declared in config files, checked before they run, and cheap: a sweep over traced
hyperparameters (learning rate and KL beta together) compiles the GRPO step once, counted in
the persistent compilation cache; a shape-changing key is flagged before anything runs."""

import json
import os
import subprocess
import sys

import pytest

from jaxedit import config as config_lib
from jaxedit import sweep
from jaxedit.config import ConfigError
from launch import sweep as sweep_launcher
from test_editor_grpo_trainer import grpo_config

SWEEP = '''

from jaxedit import sweep


def get_sweep(arg=None):
  return sweep.zip(sweep.values("train.lr", [1e-3, 3e-3]),
                   sweep.values("grpo.kl_beta", [0.01, 0.1]))
'''


def test_points_from_product_and_zip():
  lr = sweep.values("train.lr", [1, 2])
  beta = sweep.values("grpo.kl_beta", [0.0, 0.5])
  assert sweep.product(lr, beta) == [
      {"train.lr": 1, "grpo.kl_beta": 0.0}, {"train.lr": 1, "grpo.kl_beta": 0.5},
      {"train.lr": 2, "grpo.kl_beta": 0.0}, {"train.lr": 2, "grpo.kl_beta": 0.5}]
  assert sweep.zip(lr, beta) == [{"train.lr": 1, "grpo.kl_beta": 0.0},
                                 {"train.lr": 2, "grpo.kl_beta": 0.5}]
  with pytest.raises(ConfigError, match="equal length"):
    sweep.zip(lr, sweep.values("x", [1]))
  assert sweep.name({"train.lr": 0.001, "model.axes_dims_rope": (4, 6, 6)}) == \
      "lr=0.001,axes_dims_rope=4-6-6"
  assert sweep.recompiling_keys("editor_grpo", sweep.product(lr, beta) + [
      {"rewards.checklist.weight": 2.0, "rollout.num_steps": 4}]) == ["rollout.num_steps"]


def test_the_shipped_sweep_loads_and_a_bad_point_is_named(tmp_path):
  points = sweep.load("configs/shapes_editor_grpo.py")
  assert len(points) == 4 and sweep.check("configs/shapes_editor_grpo.py", points)
  bad = tmp_path / "bad.py"
  bad.write_text(open("configs/shapes_editor_sft.py").read() + '''

def get_sweep(arg=None):
  return [{"train.lr": 1e-3}, {"train.lrr": 1e-3}]
''')
  with pytest.raises(ConfigError, match=r"sweep point 1 .*'train.lrr'.*did you mean 'train.lr'"):
    sweep.check(str(bad), sweep.load(str(bad)))


def test_a_sweep_over_lr_and_kl_beta_compiles_the_step_once(small_data_dir, tiny_editor_dir,
                                                            tmp_path):
  config = grpo_config(small_data_dir, tiny_editor_dir, **{
      "train.num_steps": 1, "train.eval_every": -1, "train.sample_every": -1})
  config.model.text_max_len = 64  # tiny_editor_dir's
  path = tmp_path / "grpo_sweep.py"
  config_lib.write_file(config, str(path))
  path.write_text(path.read_text() + SWEEP)
  root, cache = tmp_path / "sweep", tmp_path / "xla_cache"
  env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(cache)}
  out = subprocess.run([sys.executable, "launch/sweep.py", "--config", str(path), "--workdir",
                        str(root), "--in_process"], capture_output=True, text=True, env=env,
                       timeout=900)
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
  assert "one compiled program for all" in out.stdout
  results = json.load(open(root / "sweep_summary.json"))
  assert [r["code"] for r in results] == [0] * 2
  compiled = [r["compiled"] for r in results]
  # The first run compiles the rollout and the update (so the count sees compiles); the
  # second, with another learning rate and KL beta, compiles neither.
  assert {"rollout", "update"} <= set(compiled[0])
  assert "update" not in compiled[1] and "rollout" not in compiled[1], compiled[1]
  assert len([e for e in os.listdir(cache) if e.startswith("jit_update-")]) == 1
  # The learning rate reached the compiled update as an input.
  rates = [r["metrics"]["train/lr"] for r in results]
  assert rates[:2] == pytest.approx([1e-3, 3e-3])
  table = (root / "sweep_summary.md").read_text()
  assert len(table.splitlines()) == 4 and "| lr=0.003,kl_beta=0.1 |" in table
  assert sweep_launcher.read_metrics(str(root / results[0]["name"]))["train/lr"] == rates[0]


def test_a_sweep_on_one_tpu_pod_creates_it_once_and_deletes_it_last(capsys):
  code = sweep_launcher.main([
      "--config", "configs/shapes_editor_grpo.py", "--workdir", "gs://bucket/sweep",
      "--on", "tpu_vm", "--pod", "--name s1 --zone us-east5-a --accelerator v5p-8",
      "--dry_run", "--", "--config.init_from=gs://bucket/sft"])
  assert code == 0
  lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("[dry run] gcloud")]
  creates = [l for l in lines if " tpu-vm create s1 " in l]
  runs = [l for l in lines if "jaxedit train" in l]
  deletes = [l for l in lines if " tpu-vm delete s1 " in l]
  assert len(creates) == 1 and len(deletes) == 1 and len(runs) == 4
  assert lines.index(creates[0]) < lines.index(runs[0]) and lines[-1] == deletes[0]
  assert "lr=0.001,kl_beta=0.04" in runs[3] and "init_from=gs://bucket/sft" in runs[3]
  # A dry run writes no summary, and a gs:// root never becomes a local folder "gs:".
  assert not os.path.exists("gs:")
