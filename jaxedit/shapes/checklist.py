"""Checklists: verifiable atomic facts about the expected final scene.

Rewards are the fraction of items a scene satisfies; strict success is all of them. Items
may accept a set of colours ("a warm colour"), so a checklist can accept every correct
outcome rather than one canonical scene.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Iterable, Sequence

from jaxedit.shapes.world import Cell, Scene, cell_text


@dataclasses.dataclass(frozen=True)
class HasObject:
  """The cell holds a `shape` whose colour is one of `colours`."""

  cell: Cell
  shape: str
  colours: tuple[str, ...]
  kind = "has_object"

  def check(self, scene: Scene) -> bool:
    obj = scene.at(self.cell)
    return obj is not None and obj.shape == self.shape and obj.colour in self.colours

  def text(self) -> str:
    colour = self.colours[0] if len(self.colours) == 1 else "one of " + "/".join(self.colours)
    return f"{cell_text(self.cell)} holds a {self.shape} coloured {colour}"


@dataclasses.dataclass(frozen=True)
class IsEmpty:
  cell: Cell
  kind = "is_empty"

  def check(self, scene: Scene) -> bool:
    return scene.at(self.cell) is None

  def text(self) -> str:
    return f"{cell_text(self.cell)} is empty"


@dataclasses.dataclass(frozen=True)
class CountIs:
  """Exactly `n` objects match (shape and colour None match anything)."""

  n: int
  shape: str | None = None
  colour: str | None = None
  kind = "count_is"

  def check(self, scene: Scene) -> bool:
    return sum((self.shape in (None, o.shape)) and (self.colour in (None, o.colour))
               for o in scene.objects) == self.n

  def text(self) -> str:
    what = " ".join(w for w in (self.colour, self.shape or "shape") if w)
    return f"there {'is' if self.n == 1 else 'are'} exactly {self.n} {what}{'s' * (self.n != 1)}"


Item = HasObject | IsEmpty | CountIs
_ITEM_TYPES = {t.kind: t for t in (HasObject, IsEmpty, CountIs)}


@dataclasses.dataclass(frozen=True)
class Checklist:
  items: tuple[Item, ...]

  def results(self, scene: Scene) -> list[bool]:
    return [item.check(scene) for item in self.items]

  def score(self, scene: Scene) -> float:
    """Fraction of items satisfied."""
    return sum(self.results(scene)) / len(self.items)

  def passes(self, scene: Scene) -> bool:
    """Strict success: every item satisfied."""
    return all(self.results(scene))

  def texts(self) -> list[str]:
    return [item.text() for item in self.items]

  def to_json(self) -> str:
    return json.dumps([_item_to_dict(i) for i in self.items])

  @classmethod
  def from_json(cls, text: str | bytes) -> "Checklist":
    return cls(tuple(_item_from_dict(d) for d in json.loads(text)))


def _item_to_dict(item: Item) -> dict[str, Any]:
  d = {"kind": item.kind}
  for f in dataclasses.fields(item):
    v = getattr(item, f.name)
    d[f.name] = list(v) if isinstance(v, tuple) else v
  return d


def _item_from_dict(d: dict[str, Any]) -> Item:
  cls = _ITEM_TYPES.get(d.get("kind"))
  if cls is None:
    raise ValueError(f"unknown checklist item {d!r}")
  kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k != "kind"}
  return cls(**kwargs)


def pinned(scene: Scene, cells: Iterable[Cell] | None = None) -> list[Item]:
  """Items stating that the objects of `scene` in `cells` (default all) are exactly as is."""
  cells = None if cells is None else {tuple(c) for c in cells}
  return [HasObject(o.cell, o.shape, (o.colour,)) for o in scene.objects
          if cells is None or o.cell in cells]


def build(items: Sequence[Item], total: int) -> Checklist:
  """A checklist of `items` plus the total object count, so nothing extra may appear."""
  return Checklist(tuple(items) + (CountIs(total),))
