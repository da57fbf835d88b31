import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import SMALL_SPLITS
from jaxedit.data.examples import check_record
from jaxedit.data.pipeline import ShapesSource, make_dataset
from jaxedit.errors import CorruptRecordError
from jaxedit.shapes.world import World


def test_reading_needs_no_tensorflow(small_dataset):
  path, _ = small_dataset
  script = textwrap.dedent(f"""
      import importlib.machinery, sys
      find = importlib.machinery.PathFinder.find_spec.__func__
      def hide_tf(cls, name, path=None, target=None):
          if name == "tensorflow" or name.startswith("tensorflow."):
              return None
          return find(cls, name, path, target)
      importlib.machinery.PathFinder.find_spec = classmethod(hide_tf)
      from jaxedit.data.pipeline import ShapesSource, make_dataset
      from jaxedit.shapes.world import World
      source = ShapesSource({path!r}, "train", World())
      batch = next(iter(make_dataset(source, 4, seed=0, process_index=0, process_count=1)))
      assert batch["source_image"].shape == (4, 32, 32, 3)
      assert not [m for m in sys.modules if m.split(".")[0] == "tensorflow"]
      print("OK", len(source))
  """)
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.split() == ["OK", str(sum(SMALL_SPLITS["train"]))]


def test_split_sizes_and_records(small_dataset):
  path, world = small_dataset
  for split, (atomic, abstract) in SMALL_SPLITS.items():
    source = ShapesSource(path, split, world)
    assert len(source) == atomic + abstract
    kinds = [source[i]["kind"] for i in range(len(source))]
    assert kinds.count("atomic") == atomic


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def test_restored_iterator_continues_with_the_same_batches(small_dataset):
  path, world = small_dataset
  source = ShapesSource(path, "train", world)
  loader = lambda: make_dataset(source, 8, seed=3, process_index=0, process_count=1,
                               fields=["id", "source_image"])
  it = iter(loader())
  take(it, 5)
  state = it.get_state()
  expected = take(it, 40)  # crosses an epoch boundary (280 records / 8)
  restored = iter(loader())
  restored.set_state(state)
  got = take(restored, 40)
  for a, b in zip(expected, got):
    np.testing.assert_array_equal(a["id"], b["id"])
    np.testing.assert_array_equal(a["source_image"], b["source_image"])
  assert len({tuple(b["id"]) for b in expected}) > 1


@pytest.mark.parametrize("process_count", [1, 2, 3])
def test_process_shards_are_disjoint_and_cover_the_split(small_dataset, process_count):
  path, world = small_dataset
  source = ShapesSource(path, "test", world)
  shards = []
  for index in range(process_count):
    loader = make_dataset(source, 5, seed=0, num_epochs=1, process_index=index,
                         process_count=process_count, drop_remainder=False, fields=["id"])
    shards.append([str(i) for batch in loader for i in batch["id"]])
  ids = [i for shard in shards for i in shard]
  assert len(ids) == len(set(ids)) == len(source)
  assert set(ids) == {source[i]["id"] for i in range(len(source))}


def corrupt_copy(path, tmp_path):
  copy = tmp_path / "copy"
  shutil.copytree(path, copy)
  (record_file,) = [f for f in os.listdir(copy) if "-train.array_record" in f]
  data = bytearray((copy / record_file).read_bytes())
  for i in range(len(data) // 3, len(data) // 3 + 4096):
    data[i] ^= 0x5A
  (copy / record_file).write_bytes(bytes(data))
  return str(copy)


def test_corrupt_file_gives_an_error_naming_the_record_and_file(small_dataset, tmp_path):
  path, world = small_dataset
  source = ShapesSource(corrupt_copy(path, tmp_path), "train", world)
  with pytest.raises(CorruptRecordError, match=r"record \d+ of split 'train' of .*copy"):
    for i in range(len(source)):
      source[i]


def test_inconsistent_record_content_is_caught(small_dataset):
  path, world = small_dataset
  record = dict(ShapesSource(path, "train", world)[0])
  check_record(record, world)
  bad_plan = dict(record, plan=json.dumps([{"op": "remove", "cell": [9, 9]}]))
  with pytest.raises(ValueError):
    check_record(bad_plan, world)
  bad_scene = dict(record, target_scene=np.full((4, 4, 2), 7, np.int32))
  with pytest.raises(ValueError, match="unknown shape id 7"):
    check_record(bad_scene, world)
  with pytest.raises(ValueError, match="source_image"):
    check_record(dict(record, source_image=np.zeros((16, 16, 3), np.uint8)), world)


def test_world_mismatch_and_missing_dataset(small_dataset, tmp_path):
  path, _ = small_dataset
  with pytest.raises(ValueError, match="wants"):
    ShapesSource(path, "train", World(image_size=64))
  with pytest.raises(FileNotFoundError, match="jaxedit data"):
    ShapesSource(str(tmp_path / "nothing"), "train", World())
  with pytest.raises(ValueError, match="split 'dev'"):
    ShapesSource(path, "dev", World())
