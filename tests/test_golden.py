"""Every trainer trains as it did when the golden fixtures were recorded (tests/golden.py):
the same logged metrics at every step, on one device and on eight; and workdirs written
then still evaluate, resume and export."""

import json
import os
import shutil
import subprocess
import sys

import pytest

import golden
from jaxedit import export, registry

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.parametrize("devices", [1, 8])
def test_every_trainer_logs_the_golden_metrics(devices, small_data_dir):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  out = subprocess.run([sys.executable, os.path.join(HERE, "golden.py"), "check",
                        "--devices", str(devices), "--data_dir", str(small_data_dir)],
                       env=env, capture_output=True, text=True, timeout=1200)
  report = out.stdout.strip().splitlines()
  assert out.returncode == 0, "\n".join(report[-60:]) + out.stderr[-3000:]
  assert report[-1].endswith(": 0 differences"), report[-5:]


def test_compare_names_every_difference():
  rows = [{"step": 1, "loss": (0.5).hex(), "lr": (0.0).hex()}]
  assert golden.compare({"a": rows}, {"a": rows}, exact=True) == []
  off = [{"step": 1, "loss": (0.5 + 2 ** -30).hex(), "lr": (0.0).hex()}]
  assert golden.compare({"a": rows}, {"a": off}, exact=True) == [
      f"a step 1 loss: 0.5 in the fixture, {0.5 + 2 ** -30!r} now"]
  assert golden.compare({"a": rows}, {"a": off}, exact=False) == []  # within rtol elsewhere
  # Elsewhere: a relative 1e-3, or an absolute 1e-5 for metrics that are noise around zero.
  loss = [{"step": 1, "loss": (3e-9).hex()}, {"step": 2, "loss": (0.25).hex()}]
  near = [{"step": 1, "loss": (5e-9).hex()}, {"step": 2, "loss": (0.25 * (1 + 5e-4)).hex()}]
  assert golden.compare({"a": loss}, {"a": near}, exact=False) == []
  far = [{"step": 1, "loss": (3e-9).hex()}, {"step": 2, "loss": (0.25 * (1 + 2e-3)).hex()}]
  assert len(golden.compare({"a": loss}, {"a": far}, exact=False)) == 1
  nan = [{"step": 1, "loss": float("nan").hex()}]
  assert golden.compare({"a": nan}, {"a": nan}, exact=True) == []
  assert "runs:" in golden.compare({"a": rows}, {"b": rows}, exact=True)[0]
  assert "metrics" in golden.compare({"a": rows}, {"a": [{"step": 1}]}, exact=True)[0]


@pytest.mark.parametrize("devices", [1, 8])
def test_recordings_of_other_platforms_agree_within_the_off_platform_tolerance(devices):
  """The same code recorded on two processors differs bitwise but within what the check
  allows a platform it has no recording of."""
  recordings = json.load(open(golden.fixture_path(devices)))["recordings"]
  assert len(recordings) >= 2
  first = recordings[0]["runs"]
  for other in recordings[1:]:
    assert golden.compare(first, other["runs"], exact=False) == []


def _old_workdir(name, tmp_path, data_dir):
  """A copy of the fixture workdir `name` and its run's config as the golden runs make it
  (the data at `data_dir`, starting runs at the copies)."""
  root = tmp_path / "old"
  for run in golden.WORKDIR_RUNS:
    if not (root / run).exists():
      shutil.copytree(os.path.join(golden.WORKDIRS, run), root / run)
  trainer, config, workdir = golden.configs(data_dir, str(root), 8)[name]
  return trainer, config, workdir


@pytest.mark.parametrize("name", golden.WORKDIR_RUNS)
def test_old_workdirs_evaluate_resume_and_export(name, small_data_dir, tmp_path):
  trainer, config, workdir = _old_workdir(name, tmp_path, small_data_dir)
  saved = max(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")))
  config.eval.num_examples = 8
  module = registry.module(trainer)
  summary = module.run_eval(config, workdir)
  assert summary["step"] == saved
  assert os.path.exists(os.path.join(workdir, "eval", "metrics.json"))
  config.train.num_steps = saved + 1
  module.train(config, workdir)
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [r["step"] for r in rows] == list(range(1, saved + 2))
  assert str(saved + 1) in os.listdir(os.path.join(workdir, "checkpoints"))
  to = "transformers" if name.startswith("planner") else "diffusers"
  out = tmp_path / "export"
  manifest = export.export(workdir, to, str(out))
  assert manifest["files"] and all((out / f).is_file() for f in manifest["files"]), manifest
