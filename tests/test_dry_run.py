"""`jaxedit train --dry_run` and the jaxpr FLOP counter behind it."""

import json
import math
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from conftest import tiny_editor_config, tiny_planner_grpo_config
from jaxedit import cli, dry_run, flops, model_report, registry
from jaxedit import config as config_lib
from jaxedit.models.flux import FluxConfig, FluxTransformer
from jaxedit.trainers import editor_sft


def test_flop_counter_matches_closed_forms():
  a = jax.ShapeDtypeStruct((4, 8, 16), jnp.float32)
  w = jax.ShapeDtypeStruct((16, 32), jnp.float32)
  assert flops.count(lambda a, w: a @ w, a, w) == 2 * 4 * 8 * 16 * 32

  def scanned(a, w):  # a loop body counts once per trip, not once
    body = lambda c, _: (c @ jnp.ones((16, 16)), None)
    return jax.lax.scan(body, a, None, length=5)[0]
  assert flops.count(scanned, a, w) == 5 * 2 * 4 * 8 * 16 * 16

  # grad w.r.t. `a` under remat: forward, its recomputation, and dA = g @ w.T
  loss = lambda a, w: jnp.sum(jax.checkpoint(lambda a: (a @ w) ** 2)(a))
  assert flops.count(jax.grad(loss), a, w) == 3 * 2 * 4 * 8 * 16 * 32
  x = jax.ShapeDtypeStruct((2, 9, 9, 3), jnp.float32)
  k = jax.ShapeDtypeStruct((3, 3, 3, 5), jnp.float32)
  conv = lambda x, k: jax.lax.conv_general_dilated(
      x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  assert flops.count(conv, x, k) == 2 * (2 * 9 * 9 * 5) * (3 * 3 * 3)


def test_dry_run_reports_without_training(small_data_dir, tmp_path, capsys):
  config = tiny_editor_config(small_data_dir)
  config.mesh.shape = (2, 4, 1)
  workdir = str(tmp_path / "run")
  out = dry_run.main(config, workdir)
  assert sorted(os.listdir(workdir)) == ["dry_run.json"]  # no tokenizer, no checkpoint
  assert json.load(open(os.path.join(workdir, "dry_run.json")))["parameters"] == \
      out["parameters"]
  setup = editor_sft.make_setup(config, str(tmp_path / "other"))
  n = sum(math.prod(x.shape) for x in jax.tree.leaves(setup.abstract_state.params))
  assert out["parameters"] == n and out["devices"] == 8
  # AdamW holds two moments per parameter: twice the parameters' bytes per device.
  b = out["bytes_per_device"]
  assert b["opt_state"] == pytest.approx(2 * b["params"], rel=0.01)
  (step,) = out["programs"]
  assert step["program"] == "train_step" and step["peak_estimate"] > 0
  (name, program, args), = dry_run.PROGRAMS["editor_sft"](setup, setup, "editor_sft")
  with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
    assert flops.count(program.jitted, *program.arguments(*args)) == step["flops"]
  printed = capsys.readouterr().out
  assert "matmul FLOPs" in printed and "bytes per device" in printed


def test_dry_run_from_the_command_line(small_data_dir, tmp_path, capsys):
  config = tiny_editor_config(small_data_dir)
  config.mesh.shape = (2, 4, 1)  # the program above: the compilation cache has it
  path = config_lib.write_file(config, str(tmp_path / "tiny.py"))
  assert cli.main(["train", "--config", path, "--workdir", str(tmp_path / "run"),
                   "--dry_run"]) == 0
  assert "train_step" in capsys.readouterr().out
  assert os.listdir(tmp_path / "run") == ["dry_run.json"]


@pytest.mark.parametrize("grad", [False, True])
def test_scanned_and_unrolled_flux_flops(grad):
  """The scan body counts once per layer; unrolled, the last single block skips the queries,
  MLP and output projection of the rows it discards (all but the 16 target tokens), exactly
  that many FLOPs fewer (3x with the backward: dX and dW of each dot)."""
  b, n, h, text, target = 8, 2, 16, 40, 16
  x = jnp.zeros((b, target, 192))
  args = (jnp.zeros((b,)), jnp.zeros((b, text, 32)), jnp.zeros((b, 32)), (4, 4))
  counts = {}
  for scan in (True, False):
    model = FluxTransformer(FluxConfig(
        in_channels=192, num_layers=1, num_single_layers=2, attention_head_dim=h,
        num_attention_heads=n, joint_attention_dim=32, pooled_projection_dim=32,
        axes_dims_rope=(4, 6, 6), scan_layers=scan))
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), x, *args, source_tokens=x))
    f = lambda p: model.apply(p, x, *args, source_tokens=x).sum()
    counts[scan] = flops.count(jax.grad(f) if grad else f, params)
  d, seq = n * h, text + 2 * target
  skipped = seq - target
  # to_q (D x D), proj_mlp (D x 4D) and proj_out (5D x D); q k^T and p v per head.
  per_pass = 2 * b * skipped * d * d * (1 + 4 + 5) + 2 * 2 * b * n * skipped * seq * h
  assert counts[True] - counts[False] == (3 if grad else 1) * per_pass


def test_grpo_dry_run_compiles_overlapped_rollouts_on_their_own_devices(small_data_dir,
                                                                        tmp_path):
  from test_editor_grpo_trainer import grpo_config

  sft_dir = str(tmp_path / "sft")
  editor_sft.train(tiny_editor_config(small_data_dir, num_steps=1, eval_every=-1,
                                      sample_every=-1), sft_dir)  # the tokenizer
  config = grpo_config(small_data_dir, sft_dir, **{"rollout.rollout_devices": 4})
  config.mesh.shape = (2, 2, 1)
  out = dry_run.report(config, str(tmp_path / "run"))
  assert out["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1} and out["devices"] == 4
  assert out["rollout_mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
  rollout, update = out["programs"]
  assert (rollout["program"], rollout["devices"]) == ("rollout", 4)
  assert (update["program"], update["devices"]) == ("update", 4)
  assert rollout["flops"] > 0 and update["flops"] > rollout["flops"]


def test_every_trainer_has_a_dry_run():
  assert set(dry_run.PROGRAMS) == set(registry.BY_NAME)


@pytest.mark.parametrize("trainer", ["editor_opd", "editor_rft", "planner_grpo",
                                     "planner_opd"])
def test_rl_dry_runs_compile_their_update(trainer, small_data_dir, tiny_editor_dir,
                                          tiny_planner_dir, tmp_path):
  """Teachers are named, never loaded: the OPD update compiles on their abstract params."""
  from test_opd import opd_config as editor_opd_config
  from test_planner_opd import opd_config as planner_opd_config

  if trainer == "editor_opd":
    config = editor_opd_config(small_data_dir, tiny_editor_dir,
                               {"colour": "/nowhere/teacher", "geometry": "/nowhere/teacher"})
    config.model.lora_rank = 0
  elif trainer == "editor_rft":
    from test_editor_rft import rft_config

    config = rft_config(small_data_dir, tiny_editor_dir)
  elif trainer == "planner_grpo":
    config = tiny_planner_grpo_config(small_data_dir, tiny_planner_dir)
  else:
    config = planner_opd_config(small_data_dir, tiny_planner_dir,
                                {"colour": "/nowhere/teacher"}, routing="round_robin")
  workdir = str(tmp_path / "run")
  out = dry_run.main(config, workdir)
  assert os.listdir(workdir) == ["dry_run.json"] and out["trainer"] == trainer
  names = [p["program"] for p in out["programs"]]
  assert names == (["rollout", "update"] if trainer.startswith("editor") else ["update"])
  assert all(p["flops"] > 0 and p["peak_estimate"] > 0 for p in out["programs"])


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POD = {"data": 2, "fsdp": 64, "tensor": 1}  # the GRPO config's: 2 slices x 64 chips


@pytest.mark.parametrize("name,mesh,compiled,programs", [
    ("flux_kontext_grpo", POD, {"data": 2, "fsdp": 4, "tensor": 1}, ["rollout", "update"]),
    ("flux_kontext_sft", {"data": 1, "fsdp": 64, "tensor": 1},
     {"data": 1, "fsdp": 8, "tensor": 1}, ["train_step"])])
def test_flux_kontext_dry_run_compiles_the_12b_steps_sized_for_the_pod(name, mesh, compiled,
                                                                       programs, tmp_path):
  """The real-size FLUX.1-Kontext configs need neither records nor the pipeline folder: the
  steps compile on the 8 fake CPU devices on a reduced mesh (abstract 11.9B-parameter state,
  nothing allocated), and the bytes per device are the pod's, as the model report sizes
  them. SFT's mesh fills the devices there are (-1): sized here for 64 chips."""
  flags = [] if mesh is POD else [f"--config.mesh.shape={tuple(mesh.values())}"]
  workdir = tmp_path / "run"
  out = subprocess.run(
      [sys.executable, "-m", "jaxedit", "train", "--config", f"configs/{name}.py",
       "--workdir", str(workdir), "--dry_run", "--config.data.records=/nowhere/records",
       *flags], cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "compiled on a reduced mesh" in out.stdout
  assert os.listdir(workdir) == ["dry_run.json"]
  report = json.loads((workdir / "dry_run.json").read_text())
  assert (report["mesh"], report["devices"]) == (mesh, math.prod(mesh.values()))
  assert report["compiled_mesh"] == compiled and report["bucket"] == [512, 512]
  config = config_lib.load_file(f"{ROOT}/configs/{name}.py")
  config.mesh.shape = (1, mesh["fsdp"], 1)
  sizes = model_report.report(config)
  assert report["model_parameters"] == sizes["params"]
  assert report["model_parameters"] == pytest.approx(11.9e9, rel=0.01)
  assert report["parameters"] == sizes["trained_params"]
  assert report["bytes_per_device"] == {k: v for k, v in sizes["bytes_per_device"].items()
                                        if not k.startswith("vae")}
  # fp32 weights split 64 ways: the frozen base (GRPO, LoRA) or the trained weights (SFT)
  weights = report["bytes_per_device"].get("base", report["bytes_per_device"]["params"])
  assert weights == pytest.approx(4 * 11.9e9 / 64, rel=0.03)
  assert [p["program"] for p in report["programs"]] == programs
  for p in report["programs"]:
    assert p["devices"] == math.prod(compiled.values())
    assert p["flops"] > 1e15 and p["peak_estimate"] > 0
