"""The shapes world: vocabulary, world geometry and scenes (docs/design.md section 2).

A scene is a set of objects on a coarse grid, at most one object per cell. Scenes are
immutable and validated on construction, so an impossible scene never exists.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Iterable, Mapping

import numpy as np

SHAPES = ("circle", "square", "triangle", "diamond")

# Well separated in RGB (pairwise L2 distance >= 90); split into warm and cool halves so
# colour-theme instructions have a meaning.
PALETTE = {
    "red": (230, 30, 30),
    "orange": (255, 140, 0),
    "yellow": (240, 230, 20),
    "green": (30, 190, 50),
    "blue": (30, 90, 255),
    "purple": (160, 50, 220),
}
COLOURS = tuple(PALETTE)
WARM = ("red", "orange", "yellow")
COOL = ("green", "blue", "purple")
BACKGROUND = (0, 0, 0)

Cell = tuple[int, int]


class SceneError(ValueError):
  """An impossible scene or object: bad cell, unknown shape or colour, two objects in a cell."""


@dataclasses.dataclass(frozen=True)
class World:
  """Geometry of the canvas. Cells are square; objects are drawn inside their cell."""

  image_size: int = 32
  grid_size: int = 4
  min_objects: int = 1
  max_objects: int = 5

  def __post_init__(self):
    if self.grid_size < 2:
      raise SceneError(f"grid_size must be >= 2, got {self.grid_size}")
    if self.image_size % self.grid_size:
      raise SceneError(
          f"image_size {self.image_size} is not divisible by grid_size {self.grid_size}")
    if self.cell_size < 8:
      raise SceneError(
          f"cells of {self.cell_size}px are too small to tell shapes apart; need >= 8 "
          f"(image_size {self.image_size} / grid_size {self.grid_size})")
    if not 1 <= self.min_objects <= self.max_objects <= self.num_cells:
      raise SceneError(
          f"need 1 <= min_objects <= max_objects <= {self.num_cells} cells, got "
          f"min_objects={self.min_objects}, max_objects={self.max_objects}")

  @property
  def cell_size(self) -> int:
    return self.image_size // self.grid_size

  @property
  def num_cells(self) -> int:
    return self.grid_size * self.grid_size

  @classmethod
  def from_config(cls, config: Mapping) -> "World":
    return cls(**{f.name: config[f.name] for f in dataclasses.fields(cls)})


@dataclasses.dataclass(frozen=True, order=True)
class Obj:
  """One object; ordered by cell so scenes have a canonical (reading) order."""

  cell: Cell
  shape: str
  colour: str

  def __post_init__(self):
    if self.shape not in SHAPES:
      raise SceneError(f"unknown shape {self.shape!r}; known shapes: {', '.join(SHAPES)}")
    if self.colour not in PALETTE:
      raise SceneError(f"unknown colour {self.colour!r}; known colours: {', '.join(COLOURS)}")
    object.__setattr__(self, "cell", tuple(int(i) for i in self.cell))
    if len(self.cell) != 2:
      raise SceneError(f"a cell is (row, column), got {self.cell!r}")

  @property
  def name(self) -> str:
    return f"{self.colour} {self.shape}"


def with_article(noun: str) -> str:
  return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


def cell_text(cell: Cell) -> str:
  return f"row {cell[0] + 1}, column {cell[1] + 1}"


@dataclasses.dataclass(frozen=True)
class Scene:
  """Objects on a grid_size x grid_size grid; at most one object per cell."""

  grid_size: int
  objects: tuple[Obj, ...]

  def __init__(self, grid_size: int, objects: Iterable[Obj] = ()):
    objects = tuple(sorted(objects))
    by_cell: dict[Cell, Obj] = {}
    for obj in objects:
      r, c = obj.cell
      if not (0 <= r < grid_size and 0 <= c < grid_size):
        raise SceneError(f"{obj.name} is in cell {obj.cell}, outside the {grid_size}x{grid_size} grid")
      if obj.cell in by_cell:
        raise SceneError(
            f"two objects in cell {obj.cell}: {by_cell[obj.cell].name} and {obj.name}")
      by_cell[obj.cell] = obj
    object.__setattr__(self, "grid_size", grid_size)
    object.__setattr__(self, "objects", objects)

  def __len__(self) -> int:
    return len(self.objects)

  def at(self, cell: Cell) -> Obj | None:
    for obj in self.objects:
      if obj.cell == tuple(cell):
        return obj
    return None

  @property
  def cells(self) -> list[Cell]:
    return [(r, c) for r in range(self.grid_size) for c in range(self.grid_size)]

  def empty_cells(self) -> list[Cell]:
    occupied = {o.cell for o in self.objects}
    return [cell for cell in self.cells if cell not in occupied]

  def replace(self, remove: Iterable[Cell] = (), add: Iterable[Obj] = ()) -> "Scene":
    remove = {tuple(c) for c in remove}
    kept = [o for o in self.objects if o.cell not in remove]
    return Scene(self.grid_size, kept + list(add))

  def key(self) -> str:
    """A canonical string; equal scenes have equal keys."""
    return f"{self.grid_size}|" + ";".join(f"{o.cell[0]},{o.cell[1]},{o.shape},{o.colour}"
                                           for o in self.objects)

  def stable_hash(self) -> int:
    return int.from_bytes(hashlib.blake2b(self.key().encode(), digest_size=8).digest(), "big")

  def refer(self, cell: Cell) -> str:
    """The shortest unambiguous noun phrase for the object at `cell`."""
    obj = self.at(cell)
    if obj is None:
      raise SceneError(f"no object at {cell_text(cell)}")
    twins = [o for o in self.objects if (o.shape, o.colour) == (obj.shape, obj.colour)]
    if len(twins) == 1:
      return f"the {obj.name}"
    return f"the {obj.name} at {cell_text(obj.cell)}"

  def describe(self) -> str:
    """A text description of the scene, in reading order."""
    if not self.objects:
      return f"An empty {self.grid_size}x{self.grid_size} grid."
    n = len(self.objects)
    items = "; ".join(f"{with_article(o.name)} at {cell_text(o.cell)}" for o in self.objects)
    return f"A {self.grid_size}x{self.grid_size} grid with {n} shape{'s' * (n > 1)}: {items}."

  def to_array(self) -> np.ndarray:
    """(grid, grid, 2) int32: [shape id, colour id], 1-based, 0 for an empty cell."""
    arr = np.zeros((self.grid_size, self.grid_size, 2), np.int32)
    for o in self.objects:
      arr[o.cell] = (SHAPES.index(o.shape) + 1, COLOURS.index(o.colour) + 1)
    return arr

  @classmethod
  def from_array(cls, arr: np.ndarray) -> "Scene":
    arr = np.asarray(arr)
    if arr.ndim != 3 or arr.shape[0] != arr.shape[1] or arr.shape[2] != 2:
      raise SceneError(f"scene array must have shape (grid, grid, 2), got {arr.shape}")
    objects = []
    for r, c in zip(*np.nonzero(arr[..., 0] | arr[..., 1])):
      s, k = (int(v) for v in arr[r, c])
      if not 1 <= s <= len(SHAPES):
        raise SceneError(f"unknown shape id {s} at cell ({r}, {c})")
      if not 1 <= k <= len(COLOURS):
        raise SceneError(f"unknown colour id {k} at cell ({r}, {c})")
      objects.append(Obj((r, c), SHAPES[s - 1], COLOURS[k - 1]))
    return cls(arr.shape[0], objects)


def random_scene(rng: np.random.Generator, world: World, num_objects: int | None = None) -> Scene:
  n = num_objects if num_objects is not None else int(
      rng.integers(world.min_objects, world.max_objects + 1))
  cells = rng.choice(world.num_cells, size=n, replace=False)
  objects = [
      Obj((int(i) // world.grid_size, int(i) % world.grid_size),
          SHAPES[rng.integers(len(SHAPES))], COLOURS[rng.integers(len(COLOURS))])
      for i in cells
  ]
  return Scene(world.grid_size, objects)
