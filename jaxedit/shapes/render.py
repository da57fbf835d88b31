"""Deterministic renderer: scene -> uint8 RGB image, without antialiasing."""

from __future__ import annotations

import functools

import numpy as np

from jaxedit.shapes.world import BACKGROUND, PALETTE, SHAPES, Scene, World


def glyph_size(cell_size: int) -> int:
  """Side of the square a shape is drawn in: odd (so shapes have a centre pixel), leaving
  at least one background pixel between neighbouring cells."""
  return cell_size - 1 if (cell_size - 1) % 2 else cell_size - 2


@functools.lru_cache(maxsize=None)
def shape_masks(cell_size: int) -> np.ndarray:
  """(num_shapes, m, m) bool masks, m = glyph_size(cell_size), in SHAPES order."""
  m = glyph_size(cell_size)
  h = (m - 1) / 2
  v, u = (np.mgrid[0:m, 0:m] - h) / h  # v: rows (down), u: columns, both in [-1, 1]
  eps = 1e-6
  masks = {
      "circle": u**2 + v**2 <= 1.2,
      "square": np.ones((m, m), bool),
      "triangle": np.abs(u) <= (v + 1) / 2 + eps,  # apex up
      "diamond": np.abs(u) + np.abs(v) <= 1 + eps,
  }
  out = np.stack([masks[s] for s in SHAPES])
  out.setflags(write=False)
  return out


def glyph_origin(world: World, cell) -> tuple[int, int]:
  """Top-left pixel of the glyph drawn in `cell`."""
  return cell[0] * world.cell_size, cell[1] * world.cell_size


def render(scene: Scene, world: World) -> np.ndarray:
  if scene.grid_size != world.grid_size:
    raise ValueError(f"scene grid {scene.grid_size} does not match world grid {world.grid_size}")
  image = np.empty((world.image_size, world.image_size, 3), np.uint8)
  image[...] = BACKGROUND
  masks = shape_masks(world.cell_size)
  m = masks.shape[-1]
  for obj in scene.objects:
    y, x = glyph_origin(world, obj.cell)
    patch = image[y:y + m, x:x + m]
    patch[masks[SHAPES.index(obj.shape)]] = PALETTE[obj.colour]
  return image
