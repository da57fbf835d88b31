"""Dataset examples of the shapes world, and reproducible train/validation/test splits.

Two kinds of example share one record layout:
- `atomic`: one random atomic edit with its canonical text (what the editor is trained on);
- `abstract`: an instruction of an abstract family with its ground-truth plan.

Splits are disjoint in scenes (a source scene's hash decides which split may use it) and in
instruction templates (validation and test use each family's held-out phrasings); held-out
families appear only in validation and test, tagged `held_out_family`.
"""

from __future__ import annotations

import json
from typing import Any, Iterator

import numpy as np

from jaxedit.shapes import checklist as cl
from jaxedit.shapes.edits import edit_from_dict, edit_to_dict, plan_texts, random_edit, run_plan
from jaxedit.shapes.families import FAMILIES, TRAIN_FAMILIES, Family, Task, make_task
from jaxedit.shapes.render import render
from jaxedit.shapes.world import Scene, World, random_scene

SPLITS = ("train", "validation", "test")
ABSTRACT_MIN_OBJECTS = 3  # abstract instructions come with distractors and longer plans
_SCENE_BUCKETS = 10  # hash % 10: 0 -> test, 1 -> validation, else train


def scene_split(scene: Scene) -> str:
  bucket = scene.stable_hash() % _SCENE_BUCKETS
  return "test" if bucket == 0 else "validation" if bucket == 1 else "train"


def split_families(split: str) -> list[Family]:
  names = TRAIN_FAMILIES if split == "train" else tuple(FAMILIES)
  return [FAMILIES[n] for n in names]


def _record(world: World, uid: str, kind: str, source: Scene, task: Task) -> dict[str, Any]:
  return {
      "id": uid,
      "kind": kind,
      "family": task.family,
      "task": task.task,
      "held_out_family": task.held_out_family,
      "instruction": task.instruction,
      "scene_text": source.describe(),
      "plan": json.dumps([edit_to_dict(e) for e in task.plan]),
      "plan_steps": json.dumps(plan_texts(source, task.plan)),
      "checklist": task.checklist.to_json(),
      "num_steps": len(task.plan),
      "num_objects": len(source),
      "source_image": render(source, world),
      "target_image": render(task.expected, world),
      "source_scene": source.to_array(),
      "target_scene": task.expected.to_array(),
  }


def _scene_in_split(rng, world: World, split: str, min_objects: int | None = None) -> Scene:
  low = max(world.min_objects, min(min_objects or 0, world.max_objects))
  while True:
    scene = random_scene(rng, world, int(rng.integers(low, world.max_objects + 1)))
    if scene_split(scene) == split:
      return scene


def atomic_task(rng, scene: Scene, world: World) -> Task:
  edit = random_edit(rng, scene, world.max_objects)
  expected = edit.apply(scene)
  checklist = cl.build(cl.pinned(expected), len(expected))
  return Task(f"atomic_{edit.op}", False, edit.text(scene), (edit,), checklist, expected)


def generate(world: World, split: str, num_atomic: int, num_abstract: int,
             seed: int) -> Iterator[dict[str, Any]]:
  """Yields the records of one split, deterministically from (world, split, sizes, seed)."""
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; splits are {SPLITS}")
  rng = np.random.default_rng([seed, SPLITS.index(split)])
  for i in range(num_atomic):
    scene = _scene_in_split(rng, world, split)
    yield _record(world, f"{split}-atomic-{i:07d}", "atomic", scene,
                  atomic_task(rng, scene, world))
  families = split_families(split)
  for i in range(num_abstract):
    family = families[i % len(families)]
    for _ in range(10_000):
      scene = _scene_in_split(rng, world, split, ABSTRACT_MIN_OBJECTS)
      task = make_task(family, rng, scene, eval_phrasing=split != "train" and not family.held_out)
      if task is not None:
        break
    else:
      raise RuntimeError(f"family {family.name!r} found no applicable scene in 10000 tries")
    yield _record(world, f"{split}-abstract-{i:07d}", "abstract", scene, task)


def check_record(record: dict[str, Any], world: World) -> None:
  """Raises ValueError naming the first field of a decoded record that is malformed."""
  img_shape = (world.image_size, world.image_size, 3)
  scene_shape = (world.grid_size, world.grid_size, 2)
  for key, shape in [("source_image", img_shape), ("target_image", img_shape),
                     ("source_scene", scene_shape), ("target_scene", scene_shape)]:
    value = np.asarray(record.get(key))
    if value.shape != shape:
      raise ValueError(f"field {key!r} has shape {value.shape}, expected {shape}")
  source = Scene.from_array(record["source_scene"])
  target = Scene.from_array(record["target_scene"])
  plan = [edit_from_dict(d) for d in json.loads(record["plan"])]
  if run_plan(source, plan)[-1] != target:
    raise ValueError("the plan does not turn source_scene into target_scene")
  if not cl.Checklist.from_json(record["checklist"]).passes(target):
    raise ValueError("target_scene fails its own checklist")
