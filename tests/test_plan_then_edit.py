"""Plan then edit: plans run step by step, the e2e and single-step-baseline figures of planner
eval, and `jaxedit edit`."""

import json
import os
import types

import jax
import numpy as np
import pytest
from PIL import Image

from conftest import tiny_planner_config
from jaxedit import checkpoint, cli, plan_then_edit, plans, workdirs
from jaxedit.data.pipeline import ShapesSource
from jaxedit.shapes import checklist as cl
from jaxedit.shapes.detect import detect
from jaxedit.shapes.render import render
from jaxedit.trainers import editor_sft, planner_sft
from jaxedit.rl import planner_policy


@pytest.fixture(scope="module")
def planner_dir(small_data_dir, tiny_planner_dir, tiny_editor_dir):
  """(workdir, config) of the tiny planner, with the tiny editor as editor and baseline."""
  config = tiny_planner_config(small_data_dir)
  config.editor = config.eval.baseline_editor = tiny_editor_dir
  return tiny_planner_dir, config


@pytest.fixture(scope="module")
def editor_dir(tiny_editor_dir):
  return tiny_editor_dir


class OracleEditor:
  """Edits by the rules of the world: detect, apply the parsed step, render."""

  def __init__(self, world):
    self.world = world
    self.calls = []
    self.setup = types.SimpleNamespace(world=world, text_len=64)
    self.batch_size = 4

  def fits(self, instruction):
    return True

  def __call__(self, images, instructions, seed):
    self.calls.append(len(instructions))
    out = []
    for image, text in zip(images, instructions):
      scene = detect(image, self.world).scenes[0]
      out.append(render(plans.parse_step(text, scene).apply(scene), self.world))
    return np.stack(out)


def test_reference_plans_run_by_a_perfect_editor_meet_every_checklist(small_dataset):
  path, world = small_dataset
  source = ShapesSource(path, "test", world)
  records = [r for r in (source[i] for i in range(len(source))) if r["kind"] == "abstract"][:12]
  images = np.stack([r["source_image"] for r in records])
  steps = [json.loads(r["plan_steps"]) for r in records]
  checklists = [r["checklist"] for r in records]
  editor = OracleEditor(world)
  trails = plan_then_edit.run_plans(editor, images, steps, seed=0)
  assert [len(t) for t in trails] == [len(s) + 1 for s in steps]
  # the k-th steps of all plans go in one batch
  assert editor.calls == [sum(len(s) > k for s in steps) for k in range(max(map(len, steps)))]
  finals = np.stack([t[-1] for t in trails])
  np.testing.assert_array_equal(plan_then_edit.strict_success(finals, checklists, world), 1.0)
  # the same plans cut short after their first step fail wherever they had more steps
  short = plan_then_edit.run_plans(editor, images, [s[:1] for s in steps], seed=0)
  success = plan_then_edit.strict_success(np.stack([t[-1] for t in short]), checklists, world)
  np.testing.assert_array_equal(success, [len(s) == 1 for s in steps])
  assert not all(len(s) == 1 for s in steps)


def test_visual_reward_is_the_checklist_fraction_of_the_executed_plan(small_dataset):
  path, world = small_dataset
  source = ShapesSource(path, "test", world)
  records = [r for r in (source[i] for i in range(len(source)))
             if r["kind"] == "abstract" and r["num_steps"] >= 2][:6]
  batch = {"source_image": np.stack([r["source_image"] for r in records]),
           "checklist": [r["checklist"] for r in records]}
  full = [str(r["plan_steps"]) for r in records]
  first = [json.dumps(json.loads(t)[:1]) for t in full]
  editor = OracleEditor(world)
  np.testing.assert_array_equal(planner_policy.visual_rewards(editor, full, batch, 8, 0), 1.0)
  partial = planner_policy.visual_rewards(editor, first, batch, 8, 0)
  for r, text, got in zip(records, first, partial):
    scene = detect(r["source_image"], world).scenes[0]
    scene = plans.parse_step(json.loads(text)[0], scene).apply(scene)
    assert got == pytest.approx(cl.Checklist.from_json(r["checklist"]).score(scene))
  assert (partial < 1).all()
  bad = planner_policy.visual_rewards(editor, ["not json"] * 6, batch, 8, 0)
  np.testing.assert_array_equal(bad, 0.0)


def test_loaded_editor_is_the_checkpoint_ema(editor_dir):
  editor = workdirs.load_editor(editor_dir, batch_size=8)
  setup = editor_sft.make_setup(editor.setup.config, editor_dir)
  mngr, step = checkpoint.latest_step(editor_dir, "an editor")
  state = checkpoint.restore(mngr, step, setup.abstract_state)
  for a, b in zip(*map(jax.tree.leaves, (editor.params, state.ema_params))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  images = np.zeros((3, 32, 32, 3), np.uint8)
  out = editor(images, ["remove the red circle"] * 3, seed=0)
  assert out.shape == (3, 32, 32, 3) and out.dtype == np.uint8
  assert not editor.fits("make the red circle blue " * 20)
  with pytest.raises(plans.PlanError, match="longer than the editor's text length"):
    plan_then_edit.executable_steps(json.dumps(["make the red circle blue " * 20]), editor, 8)
  with pytest.raises(plans.PlanError, match="at most 2"):
    plan_then_edit.executable_steps(json.dumps(["remove the red circle"] * 3), editor, 2)


def test_planner_eval_reports_e2e_and_baseline(planner_dir):
  workdir, config = planner_dir
  config.eval.e2e_reference_plans = True
  summary = planner_sft.run_eval(config, workdir)
  for scores in (summary, summary["held_out_families"]):
    for key in ("e2e_success", "e2e_runs", "single_step_baseline_success",
                "e2e_success_reference_plans"):
      assert 0.0 <= scores[key] <= 1.0, key
    assert scores["e2e_success"] <= scores["e2e_runs"]
  assert summary["editor"] == config.editor
  for name in ("e2e.png", "e2e_reference_plans.png", "single_step_baseline.png"):
    assert os.path.getsize(os.path.join(workdir, "eval", name)) > 0


def test_edit_command(planner_dir, editor_dir, small_dataset, tmp_path, monkeypatch, capsys):
  workdir, _ = planner_dir
  path, world = small_dataset
  record = next(r for r in (ShapesSource(path, "test", world)[i] for i in range(40))
                if r["kind"] == "abstract" and r["num_steps"] >= 2)
  image_path = str(tmp_path / "in.png")
  Image.fromarray(record["source_image"]).save(image_path)
  args = ["edit", "--workdir", workdir, "--image", image_path,
          "--instruction", str(record["instruction"]), "--out", str(tmp_path / "out.png")]

  # The 2-step planner writes no runnable plan: a clear error, nothing written.
  monkeypatch.setattr(workdirs.LoadedPlanner, "__call__", lambda self, *a: ["[\"paint it"])
  assert cli.main(args) == 2
  assert "the planner's plan cannot be run" in capsys.readouterr().err
  assert not os.path.exists(tmp_path / "out.png")

  reference = str(record["plan_steps"])
  monkeypatch.setattr(workdirs.LoadedPlanner, "__call__", lambda self, *a: [reference])
  assert cli.main(args) == 0  # the editor comes from the planner's config key 'editor'
  saved = json.load(open(tmp_path / "out.plan.json"))
  steps = json.loads(reference)
  assert saved["plan"] == steps and saved["editor"] == os.path.abspath(editor_dir)
  assert saved["plan_problem"] is None  # the reference plan applies to the source scene
  assert len(saved["images"]) == len(steps)
  final = np.asarray(Image.open(tmp_path / "out.png"))
  np.testing.assert_array_equal(final, np.asarray(Image.open(saved["images"][-1])))

  Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(image_path)
  assert cli.main(args) == 2
  assert "16x16; the planner and editor work on 32x32" in capsys.readouterr().err


def test_scene_as_text_prompts_come_from_the_detector(small_data_dir, small_dataset, tmp_path):
  """At inference the scene description is read off the image: on clean renders it is the
  description the planner was trained with."""
  path, world = small_dataset
  config = tiny_planner_config(small_data_dir)
  config.prompt.scene_as_text = True
  config.prompt.max_prompt_len = 200  # the tiny tokenizer's pieces are short
  setup = planner_sft.make_setup(config, str(tmp_path))
  records = [ShapesSource(path, "test", world)[i] for i in range(6)]
  planner = workdirs.LoadedPlanner(setup, None, None, 8, str(tmp_path), config)
  got = planner.prompts(np.stack([r["source_image"] for r in records]),
                        [str(r["instruction"]) for r in records])
  want = setup.prompt_ids([str(r["instruction"]) for r in records],
                          [str(r["scene_text"]) for r in records])
  np.testing.assert_array_equal(got["prompt"], want[0])
  np.testing.assert_array_equal(got["prompt_valid"], want[1])
