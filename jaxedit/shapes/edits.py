"""Atomic edits: the steps a plan is made of, each with a canonical text for the editor.

Edits address objects by cell (unique in a scene); their text refers to objects by the
shortest unambiguous description in the scene the edit applies to.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from jaxedit.shapes.world import (PALETTE, SHAPES, Cell, Obj, Scene, SceneError, cell_text,
                                  with_article)


class EditError(ValueError):
  """An edit that cannot apply to a scene, or a malformed edit."""


def _need(scene: Scene, cell: Cell) -> Obj:
  obj = scene.at(cell)
  if obj is None:
    raise EditError(f"no object at {cell_text(cell)}")
  return obj


@dataclasses.dataclass(frozen=True)
class Recolor:
  cell: Cell
  colour: str
  op = "recolor"
  task = "colour"

  def apply(self, scene: Scene) -> Scene:
    obj = _need(scene, self.cell)
    if obj.colour == self.colour:
      raise EditError(f"the {obj.name} is already {self.colour}")
    return scene.replace([obj.cell], [Obj(obj.cell, obj.shape, self.colour)])

  def text(self, scene: Scene) -> str:
    return f"make {scene.refer(self.cell)} {self.colour}"


@dataclasses.dataclass(frozen=True)
class Move:
  cell: Cell
  to: Cell

  op = "move"
  task = "geometry"

  def apply(self, scene: Scene) -> Scene:
    obj = _need(scene, self.cell)
    if scene.at(self.to) is not None:
      raise EditError(f"cannot move the {obj.name} to {cell_text(self.to)}: it is occupied")
    return scene.replace([obj.cell], [Obj(self.to, obj.shape, obj.colour)])

  def text(self, scene: Scene) -> str:
    return f"move {scene.refer(self.cell)} to {cell_text(self.to)}"


@dataclasses.dataclass(frozen=True)
class Add:
  cell: Cell
  shape: str
  colour: str

  op = "add"
  task = "geometry"

  def apply(self, scene: Scene) -> Scene:
    if scene.at(self.cell) is not None:
      raise EditError(f"cannot add {with_article(self.colour)} {self.shape} at {cell_text(self.cell)}: "
                      "it is occupied")
    return scene.replace(add=[Obj(self.cell, self.shape, self.colour)])

  def text(self, scene: Scene) -> str:
    return f"add {with_article(self.colour)} {self.shape} at {cell_text(self.cell)}"


@dataclasses.dataclass(frozen=True)
class Remove:
  cell: Cell

  op = "remove"
  task = "geometry"

  def apply(self, scene: Scene) -> Scene:
    return scene.replace([_need(scene, self.cell).cell])

  def text(self, scene: Scene) -> str:
    return f"remove {scene.refer(self.cell)}"


@dataclasses.dataclass(frozen=True)
class Swap:
  cell: Cell
  other: Cell

  op = "swap"
  task = "geometry"

  def apply(self, scene: Scene) -> Scene:
    a, b = _need(scene, self.cell), _need(scene, self.other)
    if a.cell == b.cell:
      raise EditError("cannot swap an object with itself")
    return scene.replace([a.cell, b.cell],
                         [Obj(b.cell, a.shape, a.colour), Obj(a.cell, b.shape, b.colour)])

  def text(self, scene: Scene) -> str:
    return f"swap {scene.refer(self.cell)} and {scene.refer(self.other)}"


Edit = Recolor | Move | Add | Remove | Swap
EDIT_TYPES = {t.op: t for t in (Recolor, Move, Add, Remove, Swap)}


def edit_to_dict(edit: Edit) -> dict[str, Any]:
  d = {"op": edit.op}
  for f in dataclasses.fields(edit):
    v = getattr(edit, f.name)
    d[f.name] = list(v) if isinstance(v, tuple) else v
  return d


def edit_from_dict(d: dict[str, Any]) -> Edit:
  """Parses the dict form of an edit, with an error naming what is wrong."""
  if not isinstance(d, dict) or "op" not in d:
    raise EditError(f"an edit is a dict with an 'op' key, got {d!r}")
  cls = EDIT_TYPES.get(d["op"])
  if cls is None:
    raise EditError(f"unknown edit op {d['op']!r}; known ops: {', '.join(EDIT_TYPES)}")
  names = [f.name for f in dataclasses.fields(cls)]
  if set(d) - {"op"} != set(names):
    raise EditError(f"a {cls.op} edit needs keys {names}, got {sorted(set(d) - {'op'})}")
  kwargs = {}
  for name in names:
    v = d[name]
    if name in ("cell", "to", "other"):
      if not (isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(i, int) for i in v)):
        raise EditError(f"{cls.op}.{name} must be a [row, column] pair of ints, got {v!r}")
      v = tuple(v)
    elif name == "colour" and v not in PALETTE:
      raise EditError(f"{cls.op}: unknown colour {v!r}")
    elif name == "shape" and v not in SHAPES:
      raise EditError(f"{cls.op}: unknown shape {v!r}")
    kwargs[name] = v
  return cls(**kwargs)


def run_plan(scene: Scene, plan: Sequence[Edit]) -> list[Scene]:
  """Applies the steps in order; returns the scene after each step."""
  scenes = []
  for i, edit in enumerate(plan):
    try:
      scene = edit.apply(scene)
    except (EditError, SceneError) as e:
      raise EditError(f"step {i + 1} ({edit.op}): {e}") from e
    scenes.append(scene)
  return scenes


def plan_texts(scene: Scene, plan: Sequence[Edit]) -> list[str]:
  """Canonical text of each step, referring to objects in the scene that step sees."""
  before = [scene] + run_plan(scene, plan)[:-1]
  return [edit.text(s) for edit, s in zip(plan, before)]


TASKS = ("colour", "geometry", "mixed")


def plan_task(plan: Sequence[Edit]) -> str:
  """Task tag of a plan: 'colour', 'geometry' or 'mixed' (TASKS)."""
  tasks = {edit.task for edit in plan}
  return tasks.pop() if len(tasks) == 1 else "mixed"


def random_edit(rng, scene: Scene, max_objects: int) -> Edit:
  """A uniformly chosen applicable atomic edit with random arguments."""
  objects, empty = scene.objects, scene.empty_cells()
  pick = lambda seq: seq[int(rng.integers(len(seq)))]
  options = []
  if objects:
    options += ["recolor", "remove"]
  if objects and empty:
    options.append("move")
  if empty and len(objects) < max_objects:
    options.append("add")
  if len({(o.shape, o.colour) for o in objects}) >= 2:
    options.append("swap")
  op = pick(options)
  if op == "recolor":
    obj = pick(objects)
    return Recolor(obj.cell, pick([c for c in PALETTE if c != obj.colour]))
  if op == "remove":
    return Remove(pick(objects).cell)
  if op == "move":
    return Move(pick(objects).cell, pick(empty))
  if op == "add":
    return Add(pick(empty), pick(SHAPES), pick(list(PALETTE)))
  a = pick(objects)
  b = pick([o for o in objects if (o.shape, o.colour) != (a.shape, a.colour)])
  return Swap(a.cell, b.cell)
