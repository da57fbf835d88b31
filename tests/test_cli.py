import json
import os
import subprocess
import sys

from PIL import Image


def test_jaxedit_data_builds_reports_and_draws(tmp_path):
  workdir = tmp_path / "work"
  out = subprocess.run(
      [sys.executable, "-m", "jaxedit", "data", "--config", "configs/shapes_data.py:small",
       "--workdir", str(workdir), f"--config.data.data_dir={tmp_path / 'tfds'}",
       "--config.data.splits.train.atomic=50", "--config.data.splits.train.abstract=80",
       "--config.report.detector_check_scenes=100"],
      capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "families:" in out.stdout and "objects per scene" in out.stdout
  assert "clean" in out.stdout  # the detector table
  summary = json.loads((workdir / "data_summary.json").read_text())
  train = summary["statistics"]["train"]
  assert train["num_examples"] == 130 and train["kinds"] == {"atomic": 50, "abstract": 80}
  assert sum(train["abstract_plan_lengths"].values()) == 80
  assert summary["detector"]["clean"]["scene_accuracy"] == 1.0
  for split in ("train", "validation", "test"):
    sheet = Image.open(workdir / f"contact_sheet_{split}.png")
    assert sheet.size[0] > 200 and sheet.size[1] > 200
  # A second run reuses the build.
  again = subprocess.run(out.args, capture_output=True, text=True, timeout=600)
  assert again.returncode == 0 and "Generating" not in again.stderr
  assert os.path.isdir(summary["dataset_dir"])


def test_unknown_command_arguments_are_rejected():
  out = subprocess.run([sys.executable, "-m", "jaxedit", "data", "--config", "x.py",
                        "--workdir", "w", "--bogus"], capture_output=True, text=True)
  assert out.returncode == 2 and "unrecognized arguments: --bogus" in out.stderr
