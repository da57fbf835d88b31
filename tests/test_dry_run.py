"""`jaxedit train --dry_run` and the jaxpr FLOP counter behind it."""

import json
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from conftest import tiny_editor_config
from jaxedit import cli, dry_run, flops
from jaxedit import config as config_lib
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
  # The same FLOPs with the layers scanned or unrolled: the scan body counts per layer.
  config.model.scan_layers = not config.model.scan_layers
  other = editor_sft.make_setup(config, str(tmp_path / "other"))
  (name, jitted, args), = dry_run.PROGRAMS["editor_sft"](other)
  with jax.set_mesh(other.mesh), nn.logical_axis_rules(other.rules):
    assert flops.count(jitted, *args) == step["flops"]
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
