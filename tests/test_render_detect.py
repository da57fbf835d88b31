import itertools

import numpy as np
import pytest

from jaxedit.shapes import robustness
from jaxedit.shapes.detect import detect
from jaxedit.shapes.render import render, shape_masks
from jaxedit.shapes.world import SHAPES, Obj, Scene, World, random_scene


@pytest.mark.parametrize("cell_size", [8, 12, 16])
def test_shape_templates_are_far_apart(cell_size):
  masks = shape_masks(cell_size)
  for i, j in itertools.combinations(range(len(SHAPES)), 2):
    differing = (masks[i] != masks[j]).mean()
    assert differing >= 0.15, (SHAPES[i], SHAPES[j], differing)


def test_render_is_deterministic_and_draws_each_object_in_its_cell():
  world = World()
  scene = Scene(4, [Obj((1, 2), "triangle", "blue")])
  image = render(scene, world)
  assert image.dtype == np.uint8 and image.shape == (32, 32, 3)
  np.testing.assert_array_equal(image, render(scene, world))
  ys, xs = np.nonzero(image.any(-1))
  assert ys.min() >= 8 and ys.max() < 16 and xs.min() >= 16 and xs.max() < 24
  assert set(map(tuple, image[ys, xs])) == {(30, 90, 255)}


@pytest.mark.parametrize("world, num_scenes", [
    (World(), 2000),
    (World(image_size=64, grid_size=4), 300),
    (World(image_size=48, grid_size=6, max_objects=10), 300),
])
def test_detector_recovers_every_clean_render(world, num_scenes):
  rng = np.random.default_rng(0)
  scenes = [random_scene(rng, world) for _ in range(num_scenes)]
  detection = detect(np.stack([render(s, world) for s in scenes]), world)
  wrong = [(s, d) for s, d in zip(scenes, detection.scenes) if s != d]
  assert not wrong, wrong[:3]


def test_detector_under_perturbations():
  """Thresholds sit below what the report measured (see the issue note), above chance."""
  report = robustness.detector_report(World(), num_scenes=300, seed=1)
  assert report["clean"]["scene_accuracy"] == 1.0
  for name in ("noise_sigma25", "noise_sigma50", "blur_sigma0.5", "shift_1px",
               "noise25+blur0.5+shift1"):
    assert report[name]["scene_accuracy"] >= 0.98, (name, report[name])
  assert report["blur_sigma1.0"]["cell_accuracy"] >= 0.97
  assert report["noise_sigma50"]["mean_confidence"] < report["clean"]["mean_confidence"]


def test_detector_confidence_drops_on_an_ambiguous_cell():
  world = World()
  image = render(Scene(4, [Obj((0, 0), "square", "red")]), world).astype(np.float32)
  image[0:4, 0:8] = 0  # half a square: neither a square nor empty
  detection = detect(image, world)
  assert detection.confidence[0, 0, 0] < 0.9
  assert detection.confidence[0, 3, 3] > 0.99  # an untouched empty cell


def test_detector_rejects_images_of_the_wrong_shape():
  with pytest.raises(ValueError, match=r"expected images of shape .*\(32, 32, 3\).*got \(32, 32\)"):
    detect(np.zeros((32, 32)), World())
  with pytest.raises(ValueError, match="got"):
    detect(np.zeros((2, 64, 64, 3)), World())
