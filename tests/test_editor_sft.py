"""Editor SFT: sharded equals single-device, checkpoints restore onto other meshes, kill and
restart reproduces the run, eval writes its metrics."""

import json
import os
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

from conftest import assert_sharded_close, losses, tiny_editor_config, train_command
from jaxedit import checkpoint, cli, editing, evaluation, sharding
from jaxedit.trainers import editor_sft
from jaxedit.train import setup as setup_lib
from jaxedit.train import records


def fixed_batch(setup, n=8, seed=0):
  batches = editing.eval_batches(setup, "train", ("atomic",), n, n)
  return batches[0][0]


def test_eight_devices_match_one(small_data_dir, tmp_path):
  assert jax.device_count() == 8
  one = editor_sft.make_setup(tiny_editor_config(small_data_dir).unlock(), str(tmp_path),
                              devices=jax.devices()[:1])
  config8 = tiny_editor_config(small_data_dir)
  config8.mesh.shape = (2, 2, 2)
  eight = editor_sft.make_setup(config8, str(tmp_path))
  state1 = setup_lib.init_state(one)
  state8 = jax.device_put(jax.device_get(state1), eight.state_shardings)
  # Parameters really are split: some kernel lives in pieces on several devices.
  kernel = state8.params["transformer"]["single_transformer_blocks_0"]["proj_mlp"]["kernel"]
  assert len({str(s.index) for s in kernel.addressable_shards}) > 1

  batch = fixed_batch(one)
  rng = jax.random.key(3)
  results = []
  for setup, state in ((one, state1), (eight, state8)):
    loss_fn = lambda p, b, r, s=setup: editor_sft.loss_fn(p, s.model, b, r, s.config.flow, 0.0)[0]
    grad_fn = sharding.Program(jax.jit(jax.value_and_grad(loss_fn)), setup.mesh, setup.rules)
    loss, grads = grad_fn(state.params, sharding.global_batch(batch, setup.batch_sharding), rng)
    new_state, metrics = editor_sft.make_train_step(setup)(
        state, sharding.global_batch(batch, setup.batch_sharding))
    results.append((float(loss), jax.device_get(grads), jax.device_get(new_state.params),
                    float(metrics["loss"])))
  (l1, g1, p1, m1), (l8, g8, p8, m8) = results
  assert_sharded_close(l1, l8, rtol=1e-6)
  assert_sharded_close(m1, m8, rtol=1e-6)
  assert_sharded_close(g1, g8, rtol=1e-4, atol=1e-6)
  assert_sharded_close(p1, p8, rtol=1e-5, atol=1e-6)


def test_checkpoint_restores_onto_another_mesh(small_data_dir, tmp_path):
  config = tiny_editor_config(small_data_dir)
  saved_setup = editor_sft.make_setup(config, str(tmp_path))  # data axis 8
  state = setup_lib.init_state(saved_setup)
  mngr = checkpoint.manager(str(tmp_path), keep=1, async_save=False)
  checkpoint.save(mngr, 5, state, None, config, force=True)
  mngr.wait_until_finished()
  for shape, devices in (((2, 2, 2), None), ((1, 1, 1), jax.devices()[:1])):
    other = tiny_editor_config(small_data_dir)
    other.mesh.shape = shape
    setup = editor_sft.make_setup(other, str(tmp_path), devices=devices)
    restored = checkpoint.restore(mngr, 5, setup.abstract_state)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored),
                 jax.device_get(state))
    leaf = restored.params["transformer"]["x_embedder"]["kernel"]
    assert leaf.sharding == setup.state_shardings.params["transformer"]["x_embedder"]["kernel"]


@pytest.fixture(scope="module")
def finished_run(small_data_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("run")
  out = subprocess.run(train_command(small_data_dir, workdir, num_steps=8), capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  return workdir


def wait_for_steps(path, n, proc, timeout=300):
  start = time.time()
  while time.time() - start < timeout:
    if os.path.exists(path) and len(open(path).read().splitlines()) >= n:
      return
    assert proc.poll() is None, "training ended before it could be killed"
    time.sleep(0.2)
  raise TimeoutError(path)


def test_killed_run_resumes_step_for_step(finished_run, small_data_dir, tmp_path):
  """SIGTERM (a preemption: save and exit 0), resume, SIGKILL (no warning: back to the last
  periodic checkpoint), resume to the end: the losses are the uninterrupted run's."""
  command = train_command(small_data_dir, tmp_path, num_steps=8)
  metrics = os.path.join(tmp_path, "metrics.jsonl")
  for sig, lines in ((signal.SIGTERM, 3), (signal.SIGKILL, 5)):
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    wait_for_steps(metrics, lines, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    if sig == signal.SIGTERM:
      assert proc.returncode == 0, err[-3000:]
      assert "preempted at step" in err
    else:
      assert proc.returncode == -signal.SIGKILL
      assert "resumed from step" in err
    assert max(losses(tmp_path)) < 8, "the run finished before the signal arrived"
  out = subprocess.run(command, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "resumed from step" in out.stderr
  expected, got = losses(finished_run), losses(tmp_path)
  assert sorted(got) == list(range(1, 9))
  for step in expected:
    assert got[step] == pytest.approx(expected[step], rel=1e-6), step


def test_eval_writes_metrics_and_a_grid(finished_run, small_data_dir, capsys):
  args = train_command(small_data_dir, finished_run, num_steps=8)[3:]
  args[0] = "eval"
  assert cli.main(args) == 0
  metrics = json.load(open(os.path.join(finished_run, "eval", "metrics.json")))
  assert metrics["num_examples"] == 16 and metrics["split"] == "test"
  assert 0.0 <= metrics["edit_success"] <= metrics["checklist_score"] <= 1.0
  assert set(metrics["edit_success_by_task"]) <= {"colour", "geometry"}
  assert all(f.startswith("atomic_") for f in metrics["edit_success_by_family"])
  assert os.path.getsize(os.path.join(finished_run, "eval", "edits.png")) > 1000
  curve = json.load(open(os.path.join(finished_run, "curve.json")))
  assert all(0 < p["train_minutes"] <= p["minutes"] for p in curve)
  samples = os.listdir(os.path.join(finished_run, "samples"))
  assert samples and os.path.exists(os.path.join(finished_run, "curve.json"))


def test_summary_groups_success_by_label():
  scores = {"success": np.array([1, 0, 1, 1], np.float32), "score": np.ones(4, np.float32)}
  summary = evaluation.summarize(scores, {"task": ["colour", "geometry", "geometry", "colour"]})
  assert summary["edit_success"] == 0.75 and summary["num_examples"] == 4
  assert summary["edit_success_by_task"] == {"colour": 1.0, "geometry": 0.5}


def test_scoring_accepts_targets_and_rejects_sources(small_data_dir, tmp_path):
  setup = editor_sft.make_setup(tiny_editor_config(small_data_dir), str(tmp_path))
  (arrays, info), = editing.eval_batches(setup, "test", ("atomic",), 30, 30)
  checklists = info["checklist"]
  right = evaluation.score_edits(arrays["target_image"][:30], checklists, setup.world)
  wrong = evaluation.score_edits(arrays["source_image"][:30], checklists, setup.world)
  assert right["success"].all() and (right["score"] == 1).all()
  assert not wrong["success"].any() and (wrong["score"] < 1).all()


def test_bad_trainer_configs_are_named(small_data_dir, tmp_path, capsys):
  base = ["train", "--config", "configs/shapes_editor_sft.py", "--workdir", str(tmp_path),
          f"--config.data.data_dir={small_data_dir}"]
  assert cli.main(base + ["--config.mesh.shape=(3, 1, 1)"]) == 2
  assert "mesh shape (3, 1, 1) needs 3 devices, have 8" in capsys.readouterr().err
  assert cli.main(base + ["--config.train.batch_size=12"]) == 2
  assert "'train.batch_size' = 12 must divide over the 8 data-parallel devices" in \
      capsys.readouterr().err
  assert cli.main(base + ["--config.model.patch_size=5"]) == 2
  assert "not divisible by model.patch_size" in capsys.readouterr().err
  assert cli.main(base + ["--config.flow.grounding_weight=0"]) == 2
  assert "'flow.grounding_weight' must be > 0 with model.text_layout_grid set" in \
      capsys.readouterr().err


def test_metrics_are_written_one_logged_step_late(tmp_path):
  """The loop hands over device metrics; they are fetched when the next step is logged (the
  host never waits on the step it just dispatched), and the last ones at flush."""
  class Writer:
    def __init__(self):
      self.rows = []

    def write_scalars(self, step, scalars):
      self.rows.append((step, scalars))

  writer = Writer()
  log = records.MetricsLog(writer, str(tmp_path), prefix="train/")
  log(10, {"loss": jax.numpy.float32(0.5)}, {"reward/mean": 1.0})
  assert writer.rows == [] and not os.path.exists(tmp_path / "metrics.jsonl")
  log(20, {"loss": jax.numpy.float32(0.25)})
  assert writer.rows == [(10, {"train/loss": 0.5, "reward/mean": 1.0})]
  log.flush()
  log.flush()  # nothing pending: writes nothing
  assert writer.rows[1:] == [(20, {"train/loss": 0.25})]
  lines = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert lines == [{"step": 10, "train/loss": 0.5, "reward/mean": 1.0},
                   {"step": 20, "train/loss": 0.25}]
