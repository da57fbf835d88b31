"""Detector (the verifier of the shapes world): image -> scene, with per-cell confidences.

Per pixel, a soft assignment to the background and the palette colours gives a foreground
probability `f` and colour probabilities. Per cell, each shape template is matched against
`f` at every offset within `shift_tolerance` pixels (sum of squared differences), next to
the "empty" hypothesis; the best hypothesis wins and the colour is the one carrying most
probability mass under the chosen template. On clean renders the correct hypothesis has
zero error, so recovery is exact; on noisy, blurred or shifted images the least-squares
match degrades gracefully, and the softmax over hypotheses gives a confidence.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxedit.shapes.render import shape_masks
from jaxedit.shapes.world import BACKGROUND, COLOURS, PALETTE, SHAPES, Obj, Scene, World


@dataclasses.dataclass(frozen=True)
class Detection:
  scenes: list[Scene]
  shape_probs: np.ndarray  # (B, G, G, 1 + num_shapes); index 0 is "empty"
  colour_probs: np.ndarray  # (B, G, G, num_colours); meaningful where a shape was found
  confidence: np.ndarray  # (B, G, G): probability of the decided (empty | shape, colour)


def _softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
  z = logits - logits.max(axis=axis, keepdims=True)
  e = np.exp(z)
  return e / e.sum(axis=axis, keepdims=True)


def check_images(images: np.ndarray, world: World) -> np.ndarray:
  """Returns float32 (B, H, W, 3) in [0, 255]; raises on a shape that is not the world's."""
  images = np.asarray(images)
  if images.ndim == 3:
    images = images[None]
  want = (world.image_size, world.image_size, 3)
  if images.ndim != 4 or images.shape[1:] != want:
    raise ValueError(f"expected images of shape (batch,) + {want} for this world, "
                     f"got {images.shape}")
  return images.astype(np.float32)


def detect(images: np.ndarray, world: World, *, shift_tolerance: int = 1,
           colour_temperature: float = 40.0, shape_temperature: float = 1.0,
           chunk: int = 256) -> Detection:
  """Detects scenes in (B, H, W, 3) or (H, W, 3) images with values in [0, 255]."""
  images = check_images(images, world)
  parts = [_detect_chunk(images[i:i + chunk], world, shift_tolerance, colour_temperature,
                         shape_temperature) for i in range(0, len(images), chunk)]
  return Detection(
      scenes=[s for p in parts for s in p.scenes],
      shape_probs=np.concatenate([p.shape_probs for p in parts]),
      colour_probs=np.concatenate([p.colour_probs for p in parts]),
      confidence=np.concatenate([p.confidence for p in parts]),
  )


def _detect_chunk(x, world, s, colour_temperature, shape_temperature) -> Detection:
  refs = np.array([BACKGROUND] + [PALETTE[c] for c in COLOURS], np.float32)
  d2 = ((x[..., None, :] - refs) ** 2).sum(-1)  # (B, H, W, 1 + C)
  p = _softmax(-d2 / (2 * colour_temperature**2))
  fg = 1.0 - p[..., 0]  # (B, H, W)
  colour = p[..., 1:]  # (B, H, W, C); sums to fg

  # Windows of each cell, extended by s pixels on every side (outside the image = background).
  g, cs = world.grid_size, world.cell_size
  w = cs + 2 * s
  idx = (np.arange(g) * cs)[:, None] + np.arange(w)[None]  # (G, w) in padded coordinates
  pad = ((0, 0), (s, s), (s, s))
  fg_win = np.pad(fg, pad)[:, idx[:, None, :, None], idx[None, :, None, :]]  # (B,G,G,w,w)
  col_win = np.pad(colour, pad + ((0, 0),))[:, idx[:, None, :, None], idx[None, :, None, :]]

  masks = shape_masks(cs).astype(np.float32)  # (S, m, m)
  m = masks.shape[-1]
  energy = (fg_win**2).sum((-1, -2))  # SSE of the empty hypothesis
  best_sse, best_colour_mass = None, None
  for dy in range(-s, s + 1):
    for dx in range(-s, s + 1):
      sub = fg_win[..., s + dy:s + dy + m, s + dx:s + dx + m]
      sse = energy[..., None] - 2 * np.einsum("bghij,kij->bghk", sub, masks) + masks.sum((1, 2))
      mass = np.einsum("bghijc,kij->bghkc", col_win[..., s + dy:s + dy + m, s + dx:s + dx + m, :],
                       masks)
      if best_sse is None:
        best_sse, best_colour_mass = sse, mass
      else:
        better = sse < best_sse
        best_sse = np.where(better, sse, best_sse)
        best_colour_mass = np.where(better[..., None], mass, best_colour_mass)

  all_sse = np.concatenate([energy[..., None], best_sse], -1)  # (B, G, G, 1 + S)
  shape_probs = _softmax(-all_sse / (2 * shape_temperature**2))
  decision = shape_probs.argmax(-1)
  chosen_mass = np.take_along_axis(
      best_colour_mass, np.maximum(decision - 1, 0)[..., None, None], axis=-2)[..., 0, :]
  colour_probs = chosen_mass / np.maximum(chosen_mass.sum(-1, keepdims=True), 1e-12)
  colour_ids = colour_probs.argmax(-1)
  confidence = np.take_along_axis(shape_probs, decision[..., None], -1)[..., 0]
  confidence = np.where(decision > 0, confidence * colour_probs.max(-1), confidence)

  scenes = []
  for b in range(len(x)):
    objects = [Obj((r, c), SHAPES[decision[b, r, c] - 1], COLOURS[colour_ids[b, r, c]])
               for r in range(g) for c in range(g) if decision[b, r, c] > 0]
    scenes.append(Scene(g, objects))
  return Detection(scenes, shape_probs, colour_probs, confidence)
