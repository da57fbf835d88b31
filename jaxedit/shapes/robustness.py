"""How well the detector reads clean and perturbed renders (noise, blur, shifts).

Generated images are never clean, and the detector is the reward model, so its accuracy
under perturbation is measured, not assumed. `detector_report` returns a table of exact
scene recovery, per-cell accuracy and mean confidence per perturbation.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from jaxedit.shapes.detect import detect
from jaxedit.shapes.render import render
from jaxedit.shapes.world import BACKGROUND, World, random_scene


def add_noise(rng, images, sigma: float):
  return np.clip(images + rng.normal(0.0, sigma, images.shape), 0, 255)


def blur(images, sigma: float):
  """Separable Gaussian blur, background outside the image."""
  radius = max(1, int(np.ceil(3 * sigma)))
  x = np.arange(-radius, radius + 1)
  k = np.exp(-x**2 / (2 * sigma**2))
  k /= k.sum()
  out = images.astype(np.float32) - np.array(BACKGROUND, np.float32)
  for axis in (1, 2):
    pad = [(0, 0)] * 4
    pad[axis] = (radius, radius)
    padded = np.pad(out, pad)
    n = out.shape[axis]
    out = sum(w * np.take(padded, np.arange(i, i + n), axis=axis) for i, w in enumerate(k))
  return out + np.array(BACKGROUND, np.float32)


def shift(rng, images, pixels: int):
  """Shifts each image by `pixels` along a random axis and sign, filling with background."""
  out = np.empty_like(images)
  out[...] = np.array(BACKGROUND, images.dtype)
  for i, img in enumerate(images):
    dy, dx = [(pixels, 0), (-pixels, 0), (0, pixels), (0, -pixels)][rng.integers(4)]
    h, w = img.shape[:2]
    out[i, max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        img[max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
  return out


PERTURBATIONS: dict[str, Callable] = {
    "clean": lambda rng, x: x,
    "noise_sigma10": lambda rng, x: add_noise(rng, x, 10),
    "noise_sigma25": lambda rng, x: add_noise(rng, x, 25),
    "noise_sigma50": lambda rng, x: add_noise(rng, x, 50),
    "blur_sigma0.5": lambda rng, x: blur(x, 0.5),
    "blur_sigma1.0": lambda rng, x: blur(x, 1.0),
    "shift_1px": lambda rng, x: shift(rng, x, 1),
    "shift_2px": lambda rng, x: shift(rng, x, 2),
    "noise25+blur0.5+shift1": lambda rng, x: add_noise(rng, blur(shift(rng, x, 1), 0.5), 25),
}


def detector_report(world: World, num_scenes: int, seed: int = 0) -> dict[str, dict[str, float]]:
  rng = np.random.default_rng(seed)
  scenes = [random_scene(rng, world) for _ in range(num_scenes)]
  clean = np.stack([render(s, world) for s in scenes]).astype(np.float32)
  truth = np.stack([s.to_array() for s in scenes])
  report = {}
  for name, perturb in PERTURBATIONS.items():
    detection = detect(perturb(rng, clean), world)
    found = np.stack([s.to_array() for s in detection.scenes])
    cell_ok = (found == truth).all(-1)
    report[name] = {
        "scene_accuracy": float(cell_ok.all((1, 2)).mean()),
        "cell_accuracy": float(cell_ok.mean()),
        "mean_confidence": float(detection.confidence.mean()),
        "num_scenes": num_scenes,
    }
  return report


def format_report(report: dict[str, dict[str, float]]) -> str:
  lines = [f"{'perturbation':26s} {'scene acc':>10s} {'cell acc':>10s} {'confidence':>11s}"]
  for name, r in report.items():
    lines.append(f"{name:26s} {r['scene_accuracy']:10.4f} {r['cell_accuracy']:10.4f} "
                 f"{r['mean_confidence']:11.4f}")
  return "\n".join(lines)
