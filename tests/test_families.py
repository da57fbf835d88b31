import json
import re

import numpy as np
import pytest

from jaxedit.data.examples import atomic_task
from jaxedit.shapes import checklist as cl
from jaxedit.shapes.edits import EditError, edit_from_dict, edit_to_dict, run_plan
from jaxedit.shapes.families import FAMILIES, HELD_OUT_FAMILIES, TRAIN_FAMILIES, make_task
from jaxedit.shapes.world import Obj, Scene, World, random_scene


def tasks_of(family, n, seed=0, world=World()):
  rng = np.random.default_rng(seed)
  out = []
  while len(out) < n:
    scene = random_scene(rng, world)
    task = make_task(family, rng, scene, eval_phrasing=bool(rng.integers(2)))
    if task is not None:
      out.append((scene, task))
  return out


def test_family_inventory():
  assert len(FAMILIES) >= 8
  assert len(HELD_OUT_FAMILIES) >= 3
  for family in FAMILIES.values():
    assert len(family.phrasings) >= 3 and len(family.eval_phrasings) >= 2
    assert not set(family.phrasings) & set(family.eval_phrasings)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_plan_reaches_the_expected_scene_which_passes_its_checklist(name):
  for scene, task in tasks_of(FAMILIES[name], 150):
    final = run_plan(scene, task.plan)[-1]
    assert final == task.expected
    assert task.checklist.passes(task.expected), (scene, task)
    assert not task.checklist.passes(scene), "the instruction must change something"


@pytest.mark.parametrize("name", list(FAMILIES))
def test_wrong_scenes_fail_the_checklist(name):
  rng = np.random.default_rng(1)
  checked_drops = 0
  for scene, task in tasks_of(FAMILIES[name], 150, seed=2):
    # A plan with a step left out reaches a wrong scene (where the rest still applies).
    for k in range(len(task.plan)):
      try:
        partial = run_plan(scene, task.plan[:k] + task.plan[k + 1:])
      except EditError:
        continue
      final = partial[-1] if partial else scene
      assert not task.checklist.passes(final), (scene, task, k)
      checked_drops += 1
    # An extra object, or a missing one, is always wrong.
    expected = task.expected
    if expected.empty_cells():
      cell = expected.empty_cells()[rng.integers(len(expected.empty_cells()))]
      assert not task.checklist.passes(expected.replace(add=[Obj(cell, "square", "red")]))
    if expected.objects:
      victim = expected.objects[rng.integers(len(expected))]
      assert not task.checklist.passes(expected.replace([victim.cell]))
  assert checked_drops >= 150


def test_checklist_accepts_every_correct_outcome():
  """'Make cool shapes warm' accepts any warm colour, not just the canonical plan's."""
  scene = Scene(4, [Obj((0, 0), "circle", "blue"), Obj((3, 3), "square", "red")])
  task = make_task(FAMILIES["warm_up"], np.random.default_rng(0), scene, False)
  for colour in ("red", "orange", "yellow"):
    assert task.checklist.passes(scene.replace([(0, 0)], [Obj((0, 0), "circle", colour)]))
  assert not task.checklist.passes(scene.replace([(0, 0)], [Obj((0, 0), "circle", "green")]))
  assert task.checklist.score(scene) == pytest.approx(2 / 3)


def test_atomic_tasks():
  rng = np.random.default_rng(3)
  ops = set()
  for _ in range(300):
    scene = random_scene(rng, World())
    task = atomic_task(rng, scene, World())
    ops.add(task.plan[0].op)
    assert task.checklist.passes(task.expected) and not task.checklist.passes(scene)
    assert task.instruction == task.plan[0].text(scene)
  assert ops == {"recolor", "move", "add", "remove", "swap"}


def test_plans_and_checklists_round_trip_through_json():
  for name in FAMILIES:
    for _, task in tasks_of(FAMILIES[name], 20):
      plan = [edit_from_dict(d) for d in json.loads(json.dumps([edit_to_dict(e) for e in task.plan]))]
      assert tuple(plan) == task.plan
      assert cl.Checklist.from_json(task.checklist.to_json()) == task.checklist


@pytest.mark.parametrize("bad, message", [
    ({"cell": [0, 0]}, "'op' key"),
    ({"op": "paint", "cell": [0, 0]}, "unknown edit op 'paint'"),
    ({"op": "recolor", "cell": [0, 0]}, "needs keys"),
    ({"op": "recolor", "cell": [0], "colour": "red"}, "pair of ints"),
    ({"op": "recolor", "cell": [0, 0], "colour": "pink"}, "unknown colour 'pink'"),
    ({"op": "add", "cell": [0, 0], "shape": "star", "colour": "red"}, "unknown shape 'star'"),
])
def test_malformed_edits_get_clear_errors(bad, message):
  with pytest.raises(EditError, match=message):
    edit_from_dict(bad)


def test_inapplicable_plan_names_the_step():
  scene = Scene(4, [Obj((0, 0), "circle", "red")])
  plan = [edit_from_dict({"op": "move", "cell": [0, 0], "to": [0, 1]}),
          edit_from_dict({"op": "remove", "cell": [0, 0]})]
  with pytest.raises(EditError, match=r"step 2 \(remove\): no object at row 1, column 1"):
    run_plan(scene, plan)


def template_regex(template):
  parts = re.split(r"\{\w+\}", template)
  return re.compile("^" + ".+".join(map(re.escape, parts)) + "$")


def test_eval_phrasings_never_match_a_train_template():
  for name in TRAIN_FAMILIES:
    train = [template_regex(t) for t in FAMILIES[name].phrasings]
    for _, task in tasks_of(FAMILIES[name], 50):
      matches_train = any(r.match(task.instruction) for r in train)
      matches_eval = any(template_regex(t).match(task.instruction)
                         for t in FAMILIES[name].eval_phrasings)
      assert matches_train != matches_eval, task.instruction
