"""Image grids for people to look at: contact sheets of examples and sample grids."""

from __future__ import annotations

import textwrap
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

_PAD = 6
_LINE = 14
MAX_CELL = 384  # pixels: real photographs are shown shrunk, tiny renders upscaled


def upscale(image: np.ndarray, factor: int) -> np.ndarray:
  """Nearest-neighbour upscaling, so pixels of tiny renders stay crisp."""
  return np.repeat(np.repeat(np.asarray(image), factor, axis=0), factor, axis=1)


def _cell(image: np.ndarray, scale: int, cell_w: int, cell_h: int) -> Image.Image:
  """`image` upscaled `scale` times, or fitted into the cell (aspect kept) where that does not
  give the cell's size."""
  if (image.shape[1] * scale, image.shape[0] * scale) == (cell_w, cell_h):
    return Image.fromarray(upscale(image, scale))
  out = Image.fromarray(image)
  out.thumbnail((cell_w, cell_h), Image.Resampling.LANCZOS)
  if out.width < cell_w and out.height < cell_h:  # thumbnail never enlarges
    factor = min(cell_w / out.width, cell_h / out.height)
    out = out.resize((max(1, int(out.width * factor)), max(1, int(out.height * factor))),
                     Image.Resampling.NEAREST)
  return out


def image_grid(rows: Sequence[tuple[Sequence[np.ndarray], Sequence[str]]], *, scale: int = 4,
               header: Sequence[str] = (), text_width: int = 64) -> Image.Image:
  """Rows of uint8 images, each row followed by wrapped caption lines. Cells take the first
  image's shape, `scale` times (nearest neighbour), at most MAX_CELL pixels a side; images
  of other shapes (other aspect-ratio buckets) are fitted into the cell."""
  font = ImageFont.load_default(size=12)
  images0 = rows[0][0]
  h, w = np.asarray(images0[0]).shape[:2]
  scale = max(1, min(scale, MAX_CELL // max(h, w)))
  shrink = min(1.0, MAX_CELL / max(h, w))
  cell_w, cell_h = max(1, round(w * scale * shrink)), max(1, round(h * scale * shrink))
  ncols = max(len(imgs) for imgs, _ in rows)
  captions = [[wrapped for line in lines for wrapped in textwrap.wrap(line, text_width) or [""]]
              for _, lines in rows]
  text_px = text_width * 7
  row_h = [max(cell_h, _LINE * len(c)) + _PAD for c in captions]
  top = _LINE + _PAD if header else 0
  sheet = Image.new("RGB", (ncols * (cell_w + _PAD) + text_px + _PAD, top + sum(row_h) + _PAD),
                    (255, 255, 255))
  draw = ImageDraw.Draw(sheet)
  for j, name in enumerate(header):
    draw.text((_PAD + j * (cell_w + _PAD), _PAD // 2), name, fill=(0, 0, 0), font=font)
  y = top + _PAD
  for (imgs, _), lines, rh in zip(rows, captions, row_h):
    for j, img in enumerate(imgs):
      sheet.paste(_cell(np.asarray(img, np.uint8), scale, cell_w, cell_h),
                  (_PAD + j * (cell_w + _PAD), y))
    for k, line in enumerate(lines):
      draw.text((_PAD + ncols * (cell_w + _PAD), y + k * _LINE), line, fill=(0, 0, 0), font=font)
    y += rh
  return sheet
