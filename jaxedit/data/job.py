"""The `jaxedit data` job: build the shapes dataset, report its statistics, draw examples,
and measure the detector on clean and perturbed renders."""

from __future__ import annotations

import collections
import json
import logging
import os
import time

import ml_collections
import numpy as np

from jaxedit import viz
from jaxedit.config import ConfigError
from jaxedit.data import tfds_builder
from jaxedit.data.examples import SPLITS
from jaxedit.data.pipeline import ShapesSource
from jaxedit.shapes import robustness
from jaxedit.shapes.families import FAMILIES
from jaxedit.shapes.world import SceneError, World


def world_from(config: ml_collections.ConfigDict) -> World:
  try:
    return World.from_config(config.world)
  except SceneError as e:
    raise ConfigError(f"config world: {e}") from None


def check_data_config(config: ml_collections.ConfigDict) -> None:
  for split in SPLITS:
    for kind in ("atomic", "abstract"):
      if config.splits[split][kind] < 0:
        raise ConfigError(f"config key 'data.splits.{split}.{kind}' must be >= 0")
  if config.splits.train.atomic + config.splits.train.abstract == 0:
    raise ConfigError("the train split is empty: set data.splits.train.atomic or .abstract")


def dataset_dir(world: World, config: ml_collections.ConfigDict) -> str:
  """Builds the dataset if needed (TFDS + TensorFlow) and returns its directory."""
  check_data_config(config)
  return tfds_builder.build(world, config, os.path.expanduser(config.data_dir))


def split_statistics(source: ShapesSource) -> dict:
  families, kinds, tasks = collections.Counter(), collections.Counter(), collections.Counter()
  plan_lengths, objects = collections.Counter(), collections.Counter()
  for i in range(len(source)):
    r = source[i]
    kinds[r["kind"]] += 1
    families[r["family"]] += 1
    tasks[r["task"]] += 1
    objects[int(r["num_objects"])] += 1
    if r["kind"] == "abstract":
      plan_lengths[int(r["num_steps"])] += 1
  return {"num_examples": len(source), "kinds": dict(kinds), "families": dict(sorted(families.items())),
          "tasks": dict(tasks), "abstract_plan_lengths": dict(sorted(plan_lengths.items())),
          "objects_per_scene": dict(sorted(objects.items()))}


def format_statistics(stats: dict) -> str:
  lines = []
  for split, s in stats.items():
    lines.append(f"== {split}: {s['num_examples']} examples {s['kinds']}")
    lines.append("   families: " + ", ".join(
        f"{f}{'*' if FAMILIES.get(f) and FAMILIES[f].held_out else ''}={n}"
        for f, n in s["families"].items()))
    lines.append("   tasks: " + ", ".join(f"{t}={n}" for t, n in s["tasks"].items()))
    lines.append("   abstract plan lengths: " + ", ".join(
        f"{k} steps={n}" for k, n in s["abstract_plan_lengths"].items()))
    lines.append("   objects per scene: " + ", ".join(
        f"{k}={n}" for k, n in s["objects_per_scene"].items()))
  lines.append("   (* = held-out family, never in train)")
  return "\n".join(lines)


def contact_sheet(source: ShapesSource, num_examples: int, seed: int):
  """Source | target with instruction and plan, spread over the split's families."""
  rng = np.random.default_rng(seed)
  by_family = collections.defaultdict(list)
  for i in rng.permutation(len(source))[:20 * num_examples]:
    by_family[source[int(i)]["family"]].append(int(i))
  picked, lists = [], [v for _, v in sorted(by_family.items())]
  while len(picked) < num_examples and any(lists):
    for lst in lists:
      if lst and len(picked) < num_examples:
        picked.append(lst.pop())
  rows = []
  for i in picked:
    r = source[i]
    steps = json.loads(r["plan_steps"])
    lines = [f"[{r['family']}] {r['instruction']}"]
    if r["kind"] == "abstract":
      lines += [f"  {k + 1}. {s}" for k, s in enumerate(steps)]
    rows.append(([r["source_image"], r["target_image"]], lines))
  return viz.image_grid(rows, header=["source", "target"])


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  world = world_from(config)
  check_data_config(config.data)
  os.makedirs(workdir, exist_ok=True)
  start = time.time()
  path = dataset_dir(world, config.data)
  logging.info("dataset ready at %s (%.1fs)", path, time.time() - start)

  stats = {}
  for split in SPLITS:
    try:
      source = ShapesSource(path, split, world)
    except ValueError:  # an empty split is not written
      continue
    stats[split] = split_statistics(source)
    if config.report.contact_sheet_examples:
      sheet = contact_sheet(source, config.report.contact_sheet_examples, config.report.seed)
      sheet.save(os.path.join(workdir, f"contact_sheet_{split}.png"))
  print(format_statistics(stats), flush=True)

  detector = {}
  if config.report.detector_check_scenes:
    detector = robustness.detector_report(world, config.report.detector_check_scenes,
                                          config.report.seed)
    print("\nDetector on renders of random scenes:\n" + robustness.format_report(detector))

  summary = {"dataset_dir": path, "statistics": stats, "detector": detector}
  with open(os.path.join(workdir, "data_summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  print(f"\nwrote {workdir}/data_summary.json and contact sheets "
        f"({time.time() - start:.1f}s)", flush=True)
  return summary
