"""`jaxedit bench` on a tiny editor and planner: each PyTorch reference computes what
jaxedit computes (first losses, ODE rollouts, greedy tokens), and the JSON holds one entry
per suite with the fields the table is made of. Timings are not asserted (docs/design.md 12)."""

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")

from jaxedit import bench  # noqa: E402

TINY = ("model.num_layers=1", "model.num_single_layers=1", "model.num_heads=2",
        "model.head_dim=16", "model.axes_dims_rope=(4,6,6)", "model.text_width=32",
        "model.patch_size=8")


def test_every_suite_runs_against_its_reference_and_writes_json(tmp_path):
  out = tmp_path / "bench.json"
  sets = [a for s in TINY for a in ("--set", s)]
  bench.main(["--suites", ",".join(bench.SUITES), "--batch", "2", "--repeats", "1",
              "--rollout_steps", "2", "--planner_config", "configs/shapes_planner_sft.py",
              "--cpu_devices", "0", *sets, "--out", str(out)])  # the tests' 8 devices
  results = {r["suite"]: r for r in json.load(open(out))}
  assert list(results) == list(bench.SUITES)
  for name in ("grpo_rollout", "planner_decode"):
    assert results[name]["devices"] == 2, name  # the batch of 2, split
  for r in results.values():
    assert r["jaxedit_s"] > 0 and r["reference_s"] > 0
    assert r["speedup"] == pytest.approx(r["reference_s"] / r["jaxedit_s"])
    assert r["matmul_peak_flops"] > 1e9
  for name in ("editor_sft_step", "grpo_update", "opd_step"):
    r = results[name]
    assert r["first_loss_reference"] > 0, name  # OPD's teacher differs from the student
    assert r["first_loss_rel_err"] < 1e-5, name
    assert 0 < r["mfu"] < 1 and r["model_flops"] > 0, name
  # GRPO and OPD run a second (frozen) forward: more FLOPs than the SFT step.
  assert results["grpo_update"]["model_flops"] > results["editor_sft_step"]["model_flops"]
  assert results["grpo_rollout"]["ode_rollout_rel_err"] < 1e-4
  assert results["planner_decode"]["greedy_token_agreement"] >= 0.9
  assert "mfu" not in results["planner_decode"]


def test_an_unknown_suite_is_named():
  with pytest.raises(SystemExit, match="unknown suite.*'editor_step'"):
    bench.main(["--suites", "editor_step", "--out", ""])
