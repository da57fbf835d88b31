"""Shared fixtures. Tests run on 8 fake CPU devices (DESIGN.md section 8)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

from jaxedit.data import job  # noqa: E402
from jaxedit.shapes.world import World  # noqa: E402

SMALL_SPLITS = {"train": (120, 160), "validation": (20, 33), "test": (30, 44)}


def small_data_config(data_dir):
  config = job.data_config()
  config.data_dir = str(data_dir)
  for split, (atomic, abstract) in SMALL_SPLITS.items():
    config.splits[split].atomic = atomic
    config.splits[split].abstract = abstract
  return config


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory):
  """(dataset directory, world) of a small built shapes dataset, shared by the session."""
  world = World()
  path = job.dataset_dir(world, small_data_config(tmp_path_factory.mktemp("tfds")))
  return path, world
