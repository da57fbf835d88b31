"""Spread of eval metrics over runs (seeds)."""

import json

import pytest

from jaxedit import evaluation


def test_across_seeds_and_cli(tmp_path, capsys):
  runs = [{"edit_success": s, "split": "test", "before": {"edit_success": 0.2},
           "change": {"edit_success": s - 0.2}, "held": True,
           "edit_success_by_task": {"colour": 2 * s, "geometry": 0.25}} for s in (0.3, 0.4, 0.5)]
  for i, run in enumerate(runs):
    (tmp_path / str(i) / "eval").mkdir(parents=True)
    (tmp_path / str(i) / "eval" / "metrics.json").write_text(json.dumps(run))
  out = tmp_path / "seeds.json"
  evaluation.main([str(tmp_path / str(i)) for i in range(3)] + ["--out", str(out)])
  summary = json.load(open(out))
  assert summary["num_runs"] == 3 and "split" not in summary and "held" not in summary
  assert summary["edit_success"] == pytest.approx({"mean": 0.4, "std": 0.1, "min": 0.3,
                                                   "max": 0.5})
  assert summary["before"]["edit_success"]["std"] == pytest.approx(0.0, abs=1e-12)
  printed = capsys.readouterr().out
  assert "edit_success: 0.4000 +- 0.1000" in printed
  assert "change +0.2000 +- 0.1000" in printed
  assert "edit_success_by_task.colour: 0.8000 +- 0.2000 (min 0.6000, max 1.0000)" in printed
  assert "edit_success_by_task.geometry: 0.2500 +- 0.0000" in printed
  with pytest.raises(SystemExit, match="run `jaxedit eval`"):
    evaluation.main([str(tmp_path / "missing"), "--out", str(out)])
