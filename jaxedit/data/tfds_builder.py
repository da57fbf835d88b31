"""TFDS builder for the shapes world, writing ArrayRecord so reading needs no TensorFlow.

Building imports TensorFlow (through TFDS's writer); reading goes through
`jaxedit.data.pipeline`, which does not. One builder config per set of generation
parameters: its name carries a digest of them, so different worlds, sizes or seeds never
share a directory and an existing build is reused as is.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from jaxedit.data import examples
from jaxedit.shapes.world import World

DATASET_NAME = "shapes_edit"
VERSION = "1.0.0"


@dataclasses.dataclass(eq=False)
class ShapesEditConfig(tfds.core.BuilderConfig):
  world: World = World()
  sizes: tuple[tuple[str, int, int], ...] = ()  # (split, num_atomic, num_abstract)
  seed: int = 0


def builder_config(world: World, data_config: ml_collections.ConfigDict) -> ShapesEditConfig:
  sizes = tuple((s, int(data_config.splits[s].atomic), int(data_config.splits[s].abstract))
                for s in examples.SPLITS)
  params = {"world": dataclasses.asdict(world), "sizes": sizes, "seed": data_config.seed,
            "version": VERSION}
  digest = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
  return ShapesEditConfig(name=f"{world.image_size}px_g{world.grid_size}_{digest}",
                          version=VERSION, world=world, sizes=sizes, seed=data_config.seed,
                          description=json.dumps(params, sort_keys=True))


class ShapesEdit(tfds.core.GeneratorBasedBuilder):
  """Instruction-based edits in the shapes world (docs/design.md section 2)."""

  VERSION = tfds.core.Version(VERSION)

  def _info(self) -> tfds.core.DatasetInfo:
    w = self.builder_config.world
    text = tfds.features.Text()
    image = tfds.features.Tensor(shape=(w.image_size, w.image_size, 3), dtype=np.uint8)
    scene = tfds.features.Tensor(shape=(w.grid_size, w.grid_size, 2), dtype=np.int32)
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "id": text, "kind": text, "family": text, "task": text,
            "held_out_family": tfds.features.Scalar(dtype=np.bool_),
            "instruction": text, "scene_text": text,
            "plan": text, "plan_steps": text, "checklist": text,  # JSON
            "num_steps": tfds.features.Scalar(dtype=np.int32),
            "num_objects": tfds.features.Scalar(dtype=np.int32),
            "source_image": image, "target_image": image,
            "source_scene": scene, "target_scene": scene,
        }),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # everything is generated
    return {split: self._generate_examples(split, n_atomic, n_abstract)
            for split, n_atomic, n_abstract in self.builder_config.sizes
            if n_atomic + n_abstract}

  def _generate_examples(self, split, num_atomic, num_abstract):
    cfg = self.builder_config
    for record in examples.generate(cfg.world, split, num_atomic, num_abstract, cfg.seed):
      yield record["id"], record


def build(world: World, data_config: ml_collections.ConfigDict, data_dir: str) -> str:
  """Builds the dataset if it is not there yet; returns its directory."""
  builder = ShapesEdit(config=builder_config(world, data_config), data_dir=data_dir,
                       file_format="array_record")
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(download_mode=tfds.GenerateMode.REUSE_DATASET_IF_EXISTS))
  return os.fspath(builder.data_path)
