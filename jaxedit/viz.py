"""Image grids for people to look at: contact sheets of examples and sample grids."""

from __future__ import annotations

import textwrap
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

_PAD = 6
_LINE = 14


def upscale(image: np.ndarray, factor: int) -> np.ndarray:
  """Nearest-neighbour upscaling, so pixels of tiny renders stay crisp."""
  return np.repeat(np.repeat(np.asarray(image), factor, axis=0), factor, axis=1)


def image_grid(rows: Sequence[tuple[Sequence[np.ndarray], Sequence[str]]], *, scale: int = 4,
               header: Sequence[str] = (), text_width: int = 64) -> Image.Image:
  """Rows of equal-sized uint8 images, each row followed by wrapped caption lines."""
  font = ImageFont.load_default(size=12)
  images0 = rows[0][0]
  h, w = np.asarray(images0[0]).shape[:2]
  cell_w, cell_h = w * scale, h * scale
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
      sheet.paste(Image.fromarray(upscale(np.asarray(img, np.uint8), scale)),
                  (_PAD + j * (cell_w + _PAD), y))
    for k, line in enumerate(lines):
      draw.text((_PAD + ncols * (cell_w + _PAD), y + k * _LINE), line, fill=(0, 0, 0), font=font)
    y += rh
  return sheet
