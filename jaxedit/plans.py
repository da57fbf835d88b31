"""The planner's output format: a JSON list of atomic edit steps in their canonical text.

    ["make the green triangle at row 1, column 1 yellow", "remove the yellow square"]

The texts are exactly what the editor was trained on, so a plan runs step by step through
the editor. `parse_plan` turns a plan into edits against the source scene, resolving each
step's object references in the scene that step sees, and raises PlanError naming the step
and the problem. The prompt template lives here too, so training and inference agree.
"""

from __future__ import annotations

import json
import re
from typing import Sequence

from jaxedit.shapes import checklist as cl
from jaxedit.shapes.edits import Add, Edit, EditError, Move, Recolor, Remove, Swap
from jaxedit.shapes.world import COLOURS, SHAPES, Cell, Scene, SceneError

_COLOUR = "|".join(COLOURS)
_SHAPE = "|".join(SHAPES)
_CELL = r"row (\d+), column (\d+)"
_REF = rf"the ({_COLOUR}) ({_SHAPE})(?: at {_CELL})?"
_STEPS = {
    "recolor": re.compile(rf"make {_REF} ({_COLOUR})"),
    "move": re.compile(rf"move {_REF} to {_CELL}"),
    "add": re.compile(rf"add an? ({_COLOUR}) ({_SHAPE}) at {_CELL}"),
    "remove": re.compile(rf"remove {_REF}"),
    "swap": re.compile(rf"swap {_REF} and {_REF}"),
}


class PlanError(ValueError):
  """A plan that is not a JSON list of atomic steps, or a step that does not apply."""


def format_plan(steps: Sequence[str]) -> str:
  return json.dumps(list(steps))


def prompt(instruction: str, scene_text: str | None = None) -> str:
  """The planner's prompt; the completion is `format_plan(steps)` then the EOS token."""
  scene = f"scene: {scene_text}\n" if scene_text is not None else ""
  return f"{scene}instruction: {instruction}\nplan: "


def _cell(row: str, column: str, grid: int) -> Cell:
  cell = (int(row) - 1, int(column) - 1)
  if not all(0 <= i < grid for i in cell):
    raise PlanError(f"row {row}, column {column} is outside the {grid}x{grid} grid")
  return cell


def _resolve(scene: Scene, colour: str, shape: str, row: str | None, column: str | None) -> Cell:
  """The cell of the object 'the {colour} {shape}[ at row R, column C]' in `scene`."""
  if row is not None:
    cell = _cell(row, column, scene.grid_size)
    obj = scene.at(cell)
    if obj is None or (obj.colour, obj.shape) != (colour, shape):
      raise PlanError(f"there is no {colour} {shape} at row {row}, column {column}")
    return cell
  cells = [o.cell for o in scene.objects if (o.colour, o.shape) == (colour, shape)]
  if not cells:
    raise PlanError(f"there is no {colour} {shape}")
  if len(cells) > 1:
    raise PlanError(f"'the {colour} {shape}' is ambiguous: there are {len(cells)}")
  return cells[0]


def parse_step(text: str, scene: Scene) -> Edit:
  """One step's text -> the edit it names in `scene`; PlanError if it names none."""
  for op, pattern in _STEPS.items():
    m = pattern.fullmatch(text.strip())
    if m is None:
      continue
    g = m.groups()
    if op == "recolor":
      return Recolor(_resolve(scene, *g[:4]), g[4])
    if op == "move":
      return Move(_resolve(scene, *g[:4]), _cell(g[4], g[5], scene.grid_size))
    if op == "add":
      return Add(_cell(g[2], g[3], scene.grid_size), g[1], g[0])
    if op == "remove":
      return Remove(_resolve(scene, *g))
    return Swap(_resolve(scene, *g[:4]), _resolve(scene, *g[4:]))
  raise PlanError(f"{text!r} is not an atomic edit (make/move/add/remove/swap)")


def parse_json(text: str) -> list[str]:
  """The list of step texts in a plan; PlanError unless it is a JSON list of strings."""
  try:
    steps = json.loads(text)
  except json.JSONDecodeError as e:
    raise PlanError(f"the plan is not valid JSON: {e}") from None
  if not isinstance(steps, list) or not all(isinstance(s, str) for s in steps):
    raise PlanError(f"the plan must be a JSON list of strings, got {text[:80]!r}")
  return steps


def parse_plan(text: str, scene: Scene) -> tuple[list[Edit], list[Scene]]:
  """(edits, scene after each step) of a plan applied to `scene`; PlanError names the first
  step that does not parse or does not apply."""
  edits, scenes = [], []
  for i, step in enumerate(parse_json(text)):
    try:
      edit = parse_step(step, scene)
      scene = edit.apply(scene)
    except (PlanError, EditError, SceneError) as e:
      raise PlanError(f"step {i + 1} ({step!r}): {e}") from None
    edits.append(edit)
    scenes.append(scene)
  return edits, scenes


def plan_score(text: str, scene: Scene, checklist: cl.Checklist, num_steps: int,
               step_penalty: float = 0.1, error_penalty: float = 0.25) -> float:
  """The cognitive reward (docs/design.md section 6): the checklist fraction of the scene the plan
  produces, 0 for output that is not a JSON list of strings; steps that do not parse or
  apply (contradictory) are skipped and cost `error_penalty`, each step beyond the reference
  plan's `num_steps` costs `step_penalty`. Clipped to [0, 1]."""
  try:
    steps = parse_json(text)
  except PlanError:
    return 0.0
  errors = 0
  for step in steps:
    try:
      scene = parse_step(step, scene).apply(scene)
    except (PlanError, EditError, SceneError):
      errors += 1
  score = (checklist.score(scene) - error_penalty * errors
           - step_penalty * max(0, len(steps) - num_steps))
  return min(1.0, max(0.0, score))
