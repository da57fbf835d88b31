import numpy as np

from jaxedit.data.examples import SPLITS, check_record, generate
from jaxedit.shapes.families import HELD_OUT_FAMILIES
from jaxedit.shapes.world import Scene, World

WORLD = World()


def records(split, seed=0, atomic=60, abstract=110):
  return list(generate(WORLD, split, atomic, abstract, seed))


def test_generation_is_reproducible_from_the_seed():
  a, b, c = records("train"), records("train"), records("train", seed=1)
  assert [r["id"] for r in a] == [r["id"] for r in b]
  for x, y in zip(a, b):
    assert x["instruction"] == y["instruction"] and x["plan"] == y["plan"]
    np.testing.assert_array_equal(x["source_image"], y["source_image"])
  assert [r["instruction"] for r in a] != [r["instruction"] for r in c]


def test_splits_are_disjoint_in_scenes_and_held_out_families_stay_out_of_train():
  by_split = {s: records(s) for s in SPLITS}
  keys = {s: {Scene.from_array(r["source_scene"]).key() for r in rs} for s, rs in by_split.items()}
  assert not keys["train"] & keys["validation"]
  assert not keys["train"] & keys["test"]
  assert not keys["validation"] & keys["test"]
  assert not {r["family"] for r in by_split["train"]} & set(HELD_OUT_FAMILIES)
  test_families = {r["family"] for r in by_split["test"]}
  assert set(HELD_OUT_FAMILIES) <= test_families
  assert all(r["held_out_family"] == (r["family"] in HELD_OUT_FAMILIES) for r in by_split["test"])


def test_records_are_consistent():
  for r in records("test", atomic=20, abstract=40):
    check_record(r, WORLD)
    assert r["num_steps"] == len(eval(r["plan_steps"]))  # a JSON list of strings
    assert r["kind"] in ("atomic", "abstract")
    assert r["task"] in ("colour", "geometry", "mixed")
