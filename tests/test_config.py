import copy
import glob
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from jaxedit import cli, schema
from jaxedit.config import ConfigError, apply_overrides, load, validate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE = schema.dataset()


def write_config(tmp_path, body):
  path = tmp_path / "cfg.py"
  path.write_text("from jaxedit import schema\n\n"
                  "def get_config(arg=None):\n"
                  "  config = schema.dataset()\n" + body + "  return config\n")
  return str(path)


def test_load_with_arg_and_overrides():
  config = load("configs/shapes_data.py:small",
                ["data.splits.train.atomic=7", "data.data_dir=/x", "world.image_size=64",
                 "report.seed=3"], reference=REFERENCE)
  assert config.data.splits.train.atomic == 7 and config.data.data_dir == "/x"
  assert config.world.image_size == 64 and config.report.seed == 3
  assert config.data.splits.test.abstract == 110  # from the ':small' arg


def test_override_parsing_by_type():
  config = ml_collections.ConfigDict({"f": 0.5, "b": False, "t": (1, 2), "s": "x", "n": None})
  apply_overrides(config, ["f=3", "b=true", "t=(4,5,6)", "s=hello world", "n=[1]"])
  assert config.f == 3.0 and isinstance(config.f, float)
  assert config.b is True and config.t == (4, 5, 6) and config.s == "hello world"
  assert config.n == [1]


@pytest.mark.parametrize("override, message", [
    ("data.splits.train.atomc=3", r"unknown config key 'data.splits.train.atomc' "
                                  r"\(did you mean 'data.splits.train.atomic'\?\)"),
    ("nope=1", "unknown config key 'nope'"),
    ("world.image_size=big", "'world.image_size' is a int"),
    ("world.image_size=3.5", "'world.image_size' must be of type int"),
    ("data.splits=3", "is a section"),
    ("world.image_size", "key=value"),
])
def test_bad_overrides_name_the_key(override, message):
  with pytest.raises(ConfigError, match=message):
    load("configs/shapes_data.py", [override], reference=REFERENCE)


def test_unknown_and_ill_typed_keys_in_a_config_file(tmp_path):
  with pytest.raises(ConfigError, match=r"unknown config key 'data.sed' \(did you mean 'data.seed'"):
    load(write_config(tmp_path, "  config.data.sed = 1\n"), reference=REFERENCE)
  with pytest.raises(ConfigError, match="get_config.*failed.*'grid_size'.*four"):
    load(write_config(tmp_path, "  config.world.grid_size = 'four'\n"), reference=REFERENCE)
  # A config built from scratch bypasses ConfigDict's type checks; validation still catches it.
  scratch = tmp_path / "scratch.py"
  scratch.write_text("from jaxedit import schema\n"
                     "def get_config():\n"
                     "  config = schema.dataset().to_dict()\n"
                     "  config['world']['grid_size'] = 'four'\n"
                     "  import ml_collections\n"
                     "  return ml_collections.ConfigDict(config)\n")
  with pytest.raises(ConfigError, match="'world.grid_size' must be of type int, got str"):
    load(str(scratch), reference=REFERENCE)
  with pytest.raises(ConfigError, match="does not exist"):
    load(str(tmp_path / "missing.py"))


def test_missing_keys_are_reported():
  partial = ml_collections.ConfigDict({"world": schema.world()})
  with pytest.raises(ConfigError, match="missing keys: data.data_dir"):
    validate(partial, REFERENCE)


def test_cli_reports_config_errors_cleanly(capsys, tmp_path):
  code = cli.main(["data", "--config", "configs/shapes_data.py", "--workdir", str(tmp_path),
                   "--config.world.grid_sise=4"])
  assert code == 2
  err = capsys.readouterr().err
  assert "unknown config key 'world.grid_sise'" in err and "Traceback" not in err
  code = cli.main(["data", "--config", "configs/shapes_data.py", "--workdir", str(tmp_path),
                   "--config.world.image_size=30"])
  assert code == 2
  assert "image_size 30 is not divisible by grid_size 4" in capsys.readouterr().err
  code = cli.main(["data", "--config", "configs/shapes_data.py", "--workdir", str(tmp_path),
                   "--config.data.splits.train.atomic=-1"])
  assert code == 2
  assert "'data.splits.train.atomic' must be >= 0" in capsys.readouterr().err


@pytest.mark.parametrize("spec", [
    "configs/shapes_editor_sft.py", "configs/shapes_editor_sft.py:demo",
    "configs/shapes_editor_sft.py:latent", "configs/shapes_vae.py",
    "configs/shapes_editor_grpo.py", "configs/shapes_editor_grpo.py:demo",
    "configs/shapes_editor_grpo.py:latent",
    "configs/shapes_editor_baseline.py",
    "configs/shapes_planner_sft.py", "configs/shapes_planner_sft.py:demo",
    "configs/shapes_planner_sft.py:scene_text",
    "configs/shapes_planner_grpo.py", "configs/shapes_planner_grpo.py:demo",
    "configs/shapes_planner_grpo.py:scene_text",
    "configs/shapes_planner_sft.py:smollm2", "configs/shapes_planner_sft.py:smollm2_scene_text",
    "configs/shapes_planner_grpo.py:smollm2", "configs/shapes_planner_grpo.py:smollm2_scene_text",
    "configs/flux_kontext_grpo.py", "configs/flux_kontext_grpo.py:tiny",
    "configs/flux_kontext_sft.py", "configs/flux_kontext_sft.py:tiny",
    "configs/flux_kontext_rft.py", "configs/flux_kontext_rft.py:tiny",
    "configs/flux_kontext_opd.py", "configs/flux_kontext_opd.py:tiny",
    "configs/qwen2_5_planner_grpo.py"])
def test_shipped_trainer_configs_match_their_reference(spec):
  """Every shipped config (and arg) has exactly its trainer's keys, with compatible types."""
  config = cli.load_file(spec)
  validate(config, schema.reference_config(config.trainer))


def test_latent_configs_fit_the_shapes_vae():
  """The :latent editors' VAE is the architecture configs/shapes_vae.py trains."""
  vae = cli.load_file("configs/shapes_vae.py").model
  for spec in ("configs/shapes_editor_sft.py:latent", "configs/shapes_editor_grpo.py:latent"):
    editor = cli.load_file(spec).model.vae
    assert editor.enabled
    for key in ("latent_channels", "block_out_channels", "layers_per_block", "norm_num_groups"):
      assert tuple(np.atleast_1d(editor[key])) == tuple(np.atleast_1d(vae[key])), (spec, key)


def test_planner_grpo_configs_build_the_model_of_their_sft_configs():
  for arg in ("", ":scene_text"):
    sft = cli.load_file(f"configs/shapes_planner_sft.py{arg}")
    grpo = cli.load_file(f"configs/shapes_planner_grpo.py{arg}")
    assert grpo.model.to_dict() == sft.model.to_dict()
    assert grpo.prompt.to_dict() == sft.prompt.to_dict()
  for arg in (":smollm2", ":smollm2_scene_text"):  # the architecture read from the SFT run
    sft = cli.load_file(f"configs/shapes_planner_sft.py{arg}")
    grpo = cli.load_file(f"configs/shapes_planner_grpo.py{arg}")
    assert grpo.prompt.to_dict() == sft.prompt.to_dict()
    assert all(grpo.model[k] is None and sft.model[k] is None for k in schema.LM_ARCHITECTURE)


def test_config_files_and_the_cli_parser_load_without_jax():
  """Config files are schemas: loading every file in configs/ (and its sweep), or building
  the CLI's parser (`jaxedit --help`), imports no JAX."""
  files = sorted(glob.glob(os.path.join(REPO, "configs", "*.py")))
  code = ("import sys; from jaxedit.config import load_file, load_module\n"
          f"for f in {files!r}:\n"
          "  load_file(f)\n"
          "  module = load_module(f)\n"
          "  if hasattr(module, 'get_sweep'): module.get_sweep()\n"
          "from jaxedit import cli; cli.parser()\n"
          "heavy = sorted(m for m in ('jax', 'jaxlib', 'flax', 'optax', 'tensorflow') "
          "if m in sys.modules)\n"
          "assert not heavy, heavy\n"
          "print(len(" + repr(files) + "))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-2000:]
  assert int(out.stdout.strip()) == len(files) >= 11


@pytest.mark.parametrize("trainer", ["editor_grpo", "editor_opd", "planner_grpo", "planner_opd"])
def test_migrate_upgrades_configs_saved_by_older_runs(trainer):
  now = schema.reference_config(trainer).to_dict()
  algorithm = "grpo" if "grpo" in now else "opd"
  now["rollout"]["prompts_per_step"] = 3  # a saved value, not the reference's, must move
  old = copy.deepcopy(now)
  old[algorithm].update(old.pop("rollout"))  # as runs saved them before the rollout section
  del old["train"]["tasks"], old["mesh"]["dcn_shape"]  # keys added since
  assert schema.migrate(old) == now
  old["mesh"] = {"axes": ("data", "fsdp"), "shape": (-1, 1)}  # a 2-axis mesh: 2-axis DCN
  assert schema.migrate(old)["mesh"]["dcn_shape"] == (1, 1)
  assert schema.migrate(now) == now


def test_migrate_leaves_todays_configs_and_unknown_trainers_alone():
  sft = schema.editor_sft().to_dict()
  assert schema.migrate(sft) == sft
  assert schema.migrate({"trainer": "someone_elses", "x": 1}) == {"trainer": "someone_elses", "x": 1}


def test_opd_teachers_are_named_by_the_user():
  """opd.teachers maps the user's names (task tags, task types) to workdirs: a config file
  or an override may name any teacher, each a string; other keys stay checked."""
  ref = schema.editor_opd()
  config = load("configs/flux_kontext_opd.py:tiny",
                ["opd.teachers.first=/a", "opd.teachers.color_alter=/b"], reference=ref)
  assert config.opd.teachers.to_dict() == {"first": "/a", "second": "", "color_alter": "/b"}
  config = copy.deepcopy(config)
  with config.unlocked():
    config.opd.teachers.count = 3
  with pytest.raises(ConfigError, match="'opd.teachers.count' must be of type str"):
    validate(config, ref)
  with pytest.raises(ConfigError, match="unknown config key 'opd.routin'"):
    load("configs/flux_kontext_opd.py:tiny", ["opd.routin=task"], reference=ref)
