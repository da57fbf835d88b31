import numpy as np
import pytest

from jaxedit.shapes.world import (COLOURS, PALETTE, SHAPES, Obj, Scene, SceneError, World,
                                  random_scene)


def test_two_objects_in_a_cell_is_rejected():
  with pytest.raises(SceneError, match=r"two objects in cell \(1, 2\)"):
    Scene(4, [Obj((1, 2), "circle", "red"), Obj((1, 2), "square", "blue")])


def test_unknown_colour_and_shape_are_rejected():
  with pytest.raises(SceneError, match="unknown colour 'pink'"):
    Obj((0, 0), "circle", "pink")
  with pytest.raises(SceneError, match="unknown shape 'star'"):
    Obj((0, 0), "star", "red")


def test_cell_outside_grid_is_rejected():
  with pytest.raises(SceneError, match="outside the 4x4 grid"):
    Scene(4, [Obj((4, 0), "circle", "red")])


@pytest.mark.parametrize("kwargs, message", [
    ({"image_size": 30}, "not divisible"),
    ({"image_size": 24, "grid_size": 4}, "too small"),
    ({"max_objects": 17}, "max_objects"),
    ({"min_objects": 3, "max_objects": 2}, "min_objects"),
])
def test_impossible_worlds_are_rejected(kwargs, message):
  with pytest.raises(SceneError, match=message):
    World(**kwargs)


def test_array_round_trip_and_bad_ids():
  rng = np.random.default_rng(0)
  for _ in range(200):
    scene = random_scene(rng, World())
    assert Scene.from_array(scene.to_array()) == scene
  arr = np.zeros((4, 4, 2), np.int32)
  arr[0, 0] = (1, len(COLOURS) + 1)
  with pytest.raises(SceneError, match="unknown colour id"):
    Scene.from_array(arr)
  arr[0, 0] = (len(SHAPES) + 1, 1)
  with pytest.raises(SceneError, match="unknown shape id"):
    Scene.from_array(arr)
  with pytest.raises(SceneError, match="shape"):
    Scene.from_array(np.zeros((4, 4, 3), np.int32))


def test_palette_is_well_separated():
  rgb = np.array(list(PALETTE.values()), float)
  d = np.linalg.norm(rgb[:, None] - rgb[None], axis=-1)
  assert d[~np.eye(len(rgb), dtype=bool)].min() >= 90


def test_references_disambiguate_twins_and_describe():
  scene = Scene(4, [Obj((0, 0), "circle", "red"), Obj((2, 3), "circle", "red"),
                    Obj((1, 1), "square", "orange")])
  assert scene.refer((1, 1)) == "the orange square"
  assert scene.refer((2, 3)) == "the red circle at row 3, column 4"
  assert scene.describe() == ("A 4x4 grid with 3 shapes: a red circle at row 1, column 1; "
                              "an orange square at row 2, column 2; "
                              "a red circle at row 3, column 4.")


def test_random_scenes_respect_world_limits():
  world = World(min_objects=2, max_objects=4)
  rng = np.random.default_rng(1)
  counts = {len(random_scene(rng, world)) for _ in range(300)}
  assert counts == {2, 3, 4}
