"""`jaxedit bench` on a tiny editor and planner: each PyTorch reference computes what
jaxedit computes (first losses, ODE rollouts, greedy tokens), and the JSON holds one entry
per suite with the fields the table is made of, and every matmul peak reading (one before
the suites, one after each). The edit_records suite on a tiny FLUX.1-Kontext pipeline
(tests/tiny_flux.py). Timings are not asserted (docs/design.md 12)."""

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")

import tiny_flux  # noqa: E402
from jaxedit import bench  # noqa: E402
from jaxedit.benchmarks import edit_records  # noqa: E402
from jaxedit.config import ConfigError  # noqa: E402

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
    readings = r["peak_readings"]  # one before the suites, one after each; MFU on the best
    assert [x["after"] for x in readings] == ["start", *bench.SUITES]
    assert all(x["flops"] > 1e9 for x in readings)
    assert r["matmul_peak_flops"] == max(x["flops"] for x in readings)
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


def test_edit_records_suite_times_the_encoders_and_both_sft_steps(tmp_path):
  pipeline = tiny_flux.write_pipeline(str(tmp_path / "pipeline"))
  out = tmp_path / "bench.json"
  bench.main(["--suites", "edit_records", "--pipeline", pipeline,
              "--jsonl", tiny_flux.write_pairs(str(tmp_path)), "--bucket", "64x64",
              "--max_sequence_length", "16", "--batch", "8", "--repeats", "1",
              "--cpu_devices", "0", "--out", str(out)])  # the tests' 8 devices
  [r] = json.load(open(out))
  assert r["suite"] == "edit_records" and r["devices"] == 8
  assert (r["rows"], r["images"], r["batch"], r["bucket"]) == (6, 12, 8, [64, 64])
  for key in ("encode_s", "job_plain_s", "job_cached_s", "step_cached_s", "step_encoding_s",
              "inputs_cached_s", "inputs_encoding_s", "encode_images_per_s",
              "encode_rows_per_s"):
    assert r[key] > 0, key
  assert r["encode_images_per_s"] == pytest.approx(r["images"] / r["encode_s"])
  assert r["step_ratio"] == pytest.approx(r["step_encoding_s"] / r["step_cached_s"])
  assert len(r["step_cached_times_s"]) == len(r["step_encoding_times_s"]) == 1
  assert r["first_loss_rel_err"] < 1e-5  # cached and just-encoded inputs: the same step
  assert r["model_flops"] > 0 and r["mfu"] > 0
  assert [x["after"] for x in r["peak_readings"]] == ["start", "edit_records"]


def test_edit_records_needs_its_inputs_and_targets(tmp_path):
  with pytest.raises(SystemExit, match="suite edit_records: needs --pipeline DIR"):
    bench.main(["--suites", "edit_records", "--out", ""])
  with pytest.raises(SystemExit, match="needs --pipeline DIR .* and --jsonl FILE"):
    edit_records.main(["--jsonl", "x.jsonl", "--out", ""])
  pipeline = tmp_path / "pipeline"  # only what the plan reads: the encoders' configs
  for sub in ("vae", "text_encoder", "text_encoder_2"):
    (pipeline / sub).mkdir(parents=True)
    (pipeline / sub / "config.json").write_text("{}")
  rows = tiny_flux.write_edit_r1(str(tmp_path / "r1"))  # no target images
  with pytest.raises(ConfigError, match="4 of the 4 training rows have no target image"):
    edit_records.run(str(pipeline), rows, (64, 64), out="")
