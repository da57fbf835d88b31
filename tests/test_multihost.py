"""Multi-host (docs/design.md section 8), simulated: 2 local processes with 4 CPU devices each,
joined by jax.distributed (gloo), against one process with 8 devices. The pod's mesh puts
the data axis across the processes (DCN) and fsdp within each, as on a multi-slice pod."""

import json
import os
import sys

import pytest

from conftest import losses, tiny_editor_config
from jaxedit import schema
from jaxedit import config as config_lib
from jaxedit import distributed, sharding
from jaxedit.config import ConfigError
from jaxedit.trainers import editor_grpo, editor_sft
from launch import local
from test_editor_grpo_trainer import grpo_config

POD_MESH = {"shape": (1, 4, 1), "dcn_shape": (2, 1, 1), "dcn_granule": "process"}  # (2, 4, 1)


def with_mesh(config, shape, **mesh):
  config.mesh.shape = shape
  for k, v in mesh.items():  # dcn_shape, dcn_granule
    config.mesh[k] = v
  return config


DRIVER = """
import sys
import jax
from jaxedit import config, distributed
from jaxedit.trainers import editor_grpo, editor_sft

distributed.initialize(None)  # from the launcher's JAXEDIT_* variables
print("processes", jax.process_count(), "devices", jax.local_device_count(), jax.device_count(),
      flush=True)
editor_sft.train(config.load_file(sys.argv[1]), sys.argv[2])
for grpo_config, workdir in zip(sys.argv[3::2], sys.argv[4::2]):
  editor_grpo.train(config.load_file(grpo_config), workdir)
"""


def run_pod(sft_config, sft_dir, grpo_runs, tmp_path):
  """SFT, then GRPO runs [(config, workdir)], on 2 processes x 4 CPU devices (one launch:
  one start-up)."""
  runs = [(sft_config, sft_dir), *grpo_runs]
  files = [config_lib.write_file(c, str(tmp_path / f"pod_{i}.py"))
           for i, (c, _) in enumerate(runs)]
  (tmp_path / "driver.py").write_text(DRIVER)
  program = [sys.executable, str(tmp_path / "driver.py")]
  for file, (_, workdir) in zip(files, runs):
    program += [file, str(workdir)]
  code = local.run([], num_processes=2, devices_per_process=4, logdir=str(tmp_path / "logs"),
                   timeout=600, echo=False, program=program)
  log = (tmp_path / "logs" / "process_0.log").read_text()
  assert code == 0, log[-3000:]
  assert "processes 2 devices 4 8" in log
  return log


def overlap(config, rollout_devices):
  config.rollout.rollout_devices = rollout_devices
  return config


def metric(workdir, key):
  out = {}
  for line in open(os.path.join(workdir, "metrics.jsonl")):
    row = json.loads(line)
    out[row["step"]] = row[key]
  return out


def test_two_processes_train_like_one_and_resume_on_another_mesh(small_data_dir, tmp_path):
  # ---- References on 1 process with 8 devices: SFT 4 steps, GRPO (LoRA) 2 steps ----
  # (on the mesh the resumed runs use: the compilation cache compiles their steps once)
  # GRPO runs with rollouts on devices of their own (2 of each process's 4 on the pod, 4 of 8
  # here), one step off-policy: the pod saves step 1 with step 2's rollouts in flight. Its
  # rollouts and updates both span the processes (the in-order loop adds nothing here).
  sft = lambda steps: tiny_editor_config(small_data_dir, num_steps=steps, checkpoint_every=2,
                                         eval_every=-1, sample_every=-1)
  grpo = lambda steps: grpo_config(small_data_dir, ref, **{
      "train.num_steps": steps, "train.eval_every": -1, "train.sample_every": -1,
      "train.log_every": 1, "rollout.rollout_chunks": 2})
  ref, oref = str(tmp_path / "sft_ref"), str(tmp_path / "overlap_ref")
  editor_sft.train(with_mesh(sft(4), (4, 2, 1)), ref)
  editor_grpo.train(with_mesh(overlap(grpo(2), 4), (4, 1, 1)), oref)

  # ---- The same runs on 2 processes x 4 devices, data axis across them, to step 2 / 1 ----
  pod, opod = tmp_path / "sft_pod", tmp_path / "overlap_pod"
  run_pod(with_mesh(sft(2), **POD_MESH), pod,
          [(with_mesh(overlap(grpo(1), 2), **{**POD_MESH, "shape": (1, 2, 1)}), opod)],
          tmp_path)
  assert sorted(os.listdir(pod / "checkpoints")) == ["2"]
  assert sorted(os.listdir(opod / "checkpoints")) == ["1"]
  assert "behaviour" in os.listdir(opod / "checkpoints" / "1")

  # ---- ... resumed on 1 process with 8 devices, on another mesh shape ----
  editor_sft.train(with_mesh(sft(4), (4, 2, 1)), str(pod))
  editor_grpo.train(with_mesh(overlap(grpo(2), 4), (4, 1, 1)), str(opod))
  expected, got = losses(ref), losses(pod)
  assert sorted(got) == [1, 2, 3, 4]
  for step in expected:
    assert got[step] == pytest.approx(expected[step], rel=1e-5), step
  for key in ("reward/mean", "train/loss", "train/kl"):
    expected, got = metric(oref, key), metric(opod, key)
    assert sorted(got) == [1, 2], key
    for step in expected:
      assert got[step] == pytest.approx(expected[step], rel=1e-4, abs=1e-6), (key, step)


def test_distributed_settings_come_from_config_then_environment(monkeypatch):
  for name in (distributed.ENV_ADDRESS, distributed.ENV_COUNT, distributed.ENV_ID,
               distributed.ENV_AUTO):
    monkeypatch.delenv(name, raising=False)
  cfg = schema.distributed()
  assert distributed.resolve(cfg) is None  # a single process
  monkeypatch.setenv(distributed.ENV_ADDRESS, "host0:1234")
  monkeypatch.setenv(distributed.ENV_COUNT, "4")
  monkeypatch.setenv(distributed.ENV_ID, "3")
  got = distributed.resolve(cfg)
  assert (got["coordinator_address"], got["num_processes"], got["process_id"]) == \
      ("host0:1234", 4, 3)
  cfg.coordinator_address, cfg.num_processes = "10.0.0.2:8476", 2
  with pytest.raises(ConfigError, match="process id 3 is out of range for 2 processes"):
    distributed.resolve(cfg)
  monkeypatch.setenv(distributed.ENV_ID, "1")
  assert distributed.resolve(cfg)["coordinator_address"] == "10.0.0.2:8476"
  cfg.initialize = "never"
  assert distributed.resolve(cfg) is None
  cfg = schema.distributed()
  for name in (distributed.ENV_ADDRESS, distributed.ENV_COUNT, distributed.ENV_ID):
    monkeypatch.delenv(name)
  monkeypatch.setenv(distributed.ENV_AUTO, "1")  # what the pod launchers set
  assert "coordinator_address" not in distributed.resolve(cfg)  # JAX detects the cluster
  monkeypatch.setenv(distributed.ENV_ADDRESS, "host0:1234")
  with pytest.raises(ConfigError, match="num_processes .* and process_id"):
    distributed.resolve(cfg)
  cfg.initialize = "sometimes"
  with pytest.raises(ConfigError, match="distributed.initialize"):
    distributed.resolve(cfg)


def test_mesh_across_slices_names_what_does_not_fit():
  import jax

  axes = ("data", "fsdp", "tensor")
  with pytest.raises(ValueError, match="do not split into 3 granules"):
    sharding.make_mesh(axes, (1, -1, 1), jax.devices(), dcn_shape=(3, 1, 1))
  with pytest.raises(ValueError, match="dcn_granule"):
    sharding.make_mesh(axes, (1, -1, 1), jax.devices(), dcn_shape=(2, 1, 1), dcn_granule="rack")
  with pytest.raises(ValueError, match="spans 2 processes; this run has 1"):
    sharding.make_mesh(axes, (1, -1, 1), jax.devices(), dcn_shape=(2, 1, 1),
                       dcn_granule="process")
  with pytest.raises(ValueError, match="spans 2 slices; the devices are in no slices"):
    sharding.make_mesh(axes, (1, -1, 1), jax.devices(), dcn_shape=(2, 1, 1))
