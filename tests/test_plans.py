"""The plan format: canonical plans parse back to their edits; malformed plans get errors
that name the step and the problem; the cognitive reward."""

import json

import pytest

from jaxedit import plans
from jaxedit.data.examples import generate
from jaxedit.shapes import checklist as cl
from jaxedit.shapes.edits import edit_from_dict
from jaxedit.shapes.world import Obj, Scene, World

SCENE = Scene(4, [Obj((0, 0), "triangle", "green"), Obj((0, 3), "triangle", "green"),
                  Obj((2, 1), "square", "red")])


@pytest.mark.parametrize("split", ["train", "test"])
def test_every_reference_plan_parses_to_its_edits(split):
  for record in generate(World(), split, 60, 200, seed=3):
    source = Scene.from_array(record["source_scene"])
    edits, scenes = plans.parse_plan(record["plan_steps"], source)
    assert edits == [edit_from_dict(d) for d in json.loads(record["plan"])]
    assert scenes[-1] == Scene.from_array(record["target_scene"])
    checklist = cl.Checklist.from_json(record["checklist"])
    assert plans.plan_score(record["plan_steps"], source, checklist, record["num_steps"]) == 1.0


def test_references_resolve_in_the_scene_each_step_sees():
  text = plans.format_plan(["make the green triangle at row 1, column 1 yellow",
                            "make the green triangle blue"])  # unique after step 1
  edits, scenes = plans.parse_plan(text, SCENE)
  assert scenes[-1].at((0, 3)).colour == "blue" and scenes[-1].at((0, 0)).colour == "yellow"


@pytest.mark.parametrize("text, message", [
    ('["remove the red square"', "not valid JSON"),
    ('{"steps": []}', "JSON list of strings"),
    ('["remove the red square", 3]', "JSON list of strings"),
    ('["paint everything"]', "step 1 ('paint everything'): 'paint everything' is not an atomic"),
    ('["remove the green triangle"]', "step 1 ('remove the green triangle'): 'the green "
                                      "triangle' is ambiguous: there are 2"),
    ('["remove the red square", "remove the red square"]', "step 2 ('remove the red square'): "
                                                           "there is no red square"),
    ('["add a red circle at row 5, column 1"]', "outside the 4x4 grid"),
    ('["add a red circle at row 3, column 2"]', "occupied"),
    ('["move the red square to row 1, column 1"]', "occupied"),
    ('["make the red square at row 1, column 1 blue"]', "no red square at row 1, column 1"),
])
def test_malformed_plans_name_the_problem(text, message):
  with pytest.raises(plans.PlanError, match=message.replace("(", r"\(").replace(")", r"\)")):
    plans.parse_plan(text, SCENE)


def test_plan_score_penalties():
  expected = SCENE.replace([(2, 1)])  # the reference plan: remove the red square
  checklist = cl.build(cl.pinned(expected) + [cl.IsEmpty((2, 1))], len(expected))
  score = lambda steps: plans.plan_score(plans.format_plan(steps), SCENE, checklist, 1)
  assert score(["remove the red square"]) == 1.0
  assert plans.plan_score("remove the red square", SCENE, checklist, 1) == 0.0  # not JSON
  items = len(checklist.items)
  assert score([]) == pytest.approx((items - 2) / items)  # red square kept: 2 items fail
  # a step that does not apply costs 0.25, and it is one step too many (0.1)
  assert score(["remove the red square", "remove the blue circle"]) == pytest.approx(0.65)
  # a correct extra step that changes nothing checked... still one step too many
  assert score(["remove the red square", "add a red square at row 3, column 2",
                "remove the red square"]) == pytest.approx(0.8)


def test_prompt_template():
  assert plans.prompt("remove all triangles") == "instruction: remove all triangles\nplan: "
  assert plans.prompt("x", "A 4x4 grid.").startswith("scene: A 4x4 grid.\ninstruction: x")
