"""Reading the shapes dataset with grain: per-process shards, batches, checkpointable state.

Reads ArrayRecord through TFDS's data source, which needs no TensorFlow. Every record is
checked as it is read, so a corrupt file or record fails with an error that names the
file, split and index instead of a stack trace from deep inside the reader or a silently
wrong batch.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Sequence

import grain

from jaxedit.data.examples import check_record
from jaxedit.errors import CorruptRecordError
from jaxedit.shapes.world import World

PREFETCH_BATCHES = 4  # batches read ahead, each by its own thread
TEXT_FIELDS = ("id", "kind", "family", "task", "instruction", "scene_text", "plan",
               "plan_steps", "checklist")


class ShapesSource(grain.sources.RandomAccessDataSource):
  """Random access to one split of a built shapes dataset, with decoded, checked records."""

  def __init__(self, dataset_dir: str, split: str, world: World):
    from tensorflow_datasets.core import read_only_builder  # no TensorFlow needed to read

    try:
      builder = read_only_builder.builder_from_directory(dataset_dir)
    except Exception as e:
      raise FileNotFoundError(f"no shapes dataset at {dataset_dir!r} ({e}); build it with "
                              "`jaxedit data`") from e
    if split not in builder.info.splits:
      raise ValueError(f"split {split!r} is not in {dataset_dir}; it has "
                       f"{sorted(builder.info.splits)}")
    shape = builder.info.features["source_image"].shape
    want = (world.image_size, world.image_size, 3)
    if tuple(shape) != want:
      raise ValueError(f"dataset at {dataset_dir} holds {tuple(shape)} images but the "
                       f"config's world wants {want}")
    self._source = builder.as_data_source(split)
    self._where = f"split {split!r} of {dataset_dir}"
    self._dir, self._split, self._index = dataset_dir, split, None
    self._world = world

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    try:
      record = self._source[index]
    except Exception as e:  # the reader raises RuntimeError on hash mismatches, etc.
      raise CorruptRecordError(f"record {index} of {self._where} cannot be read: {e}") from e
    try:
      record = {k: v.decode() if k in TEXT_FIELDS else v for k, v in record.items()}
      check_record(record, self._world)
    except Exception as e:
      raise CorruptRecordError(f"record {index} of {self._where} is corrupt: {e}") from e
    return record

  def record_index(self) -> list[tuple[str, str]]:
    """(kind, task) of every record, for selecting records without decoding them again:
    read once, then cached next to the dataset (where writable)."""
    if self._index is None:
      cache = os.path.join(self._dir, f"jaxedit_index_{self._split}.json")
      if os.path.exists(cache):
        self._index = [tuple(pair) for pair in json.load(open(cache))]
      else:
        self._index = [(self[i]["kind"], self[i]["task"]) for i in range(len(self))]
        try:
          tmp = f"{cache}.tmp{os.getpid()}"
          with open(tmp, "w") as f:
            json.dump(self._index, f)
          os.replace(tmp, cache)  # atomic: processes may race to write it
        except OSError:
          pass
    return self._index

  def __repr__(self) -> str:
    return f"ShapesSource({self._where})"


def make_dataset(source: grain.sources.RandomAccessDataSource, batch_size: int, *, seed: int,
                 shuffle: bool = True, num_epochs: int | None = None,
                 process_index: int | None = None, process_count: int | None = None,
                 drop_remainder: bool = True, fields: Sequence[str] | None = None,
                 kinds: Sequence[str] | None = None, tasks: Sequence[str] | None = None,
                 map_fn: Callable | None = None,
                 worker_count: int = 0) -> grain.IterDataset:
  """Batches of this process's rows of each global batch; `batch_size` is per process.

  The global stream (selected records, shuffled with a new order every epoch, repeated) does
  not depend on the number of processes: process p of P gets rows [p*B, (p+1)*B) of each
  global batch of P*B, and reads only those records. So a run on 2 hosts trains on the same
  global batches as on 1, and the iterator state (`get_state()`, the same on every process)
  resumes on any process count. The process index and count default to JAX's. `kinds`
  keeps only records of those kinds ('atomic', 'abstract') and `tasks` those of those task
  tags ('colour', 'geometry', 'mixed'), from the source's record index; `map_fn`
  transforms each record after `fields` are selected.
  """
  if process_index is None or process_count is None:
    import jax

    process_index, process_count = jax.process_index(), jax.process_count()
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} out of range for {process_count} processes")
  ds = grain.MapDataset.source(source)
  if kinds or tasks:
    ds = grain.MapDataset.source(_Subset(source, selected(source, kinds, tasks)))
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(num_epochs)
  if fields:
    fields = tuple(fields)
    ds = ds.map(lambda record: {k: record[k] for k in fields})
  if map_fn is not None:
    ds = ds.map(map_fn)
  ds = ds.batch(batch_size, drop_remainder=drop_remainder)[process_index::process_count]
  # Elements are whole batches here: grain's default read-ahead (500 elements, 16 threads)
  # would decode hundreds of batches ahead and starve the training step of CPU.
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=PREFETCH_BATCHES,
                                            prefetch_buffer_size=PREFETCH_BATCHES))
  if worker_count:
    ds = ds.mp_prefetch(grain.multiprocessing.MultiprocessingOptions(num_workers=worker_count))
  return ds


def fixed_batches(source: grain.sources.RandomAccessDataSource, batch_size: int,
                  num_examples: int, *, fields: Sequence[str], kinds: Sequence[str]):
  """The first `num_examples` (0: all) selected records of `source` in order, in batches of
  at most `batch_size`: evaluation data, read alike on every process."""
  ds = make_dataset(source, batch_size, seed=0, shuffle=False, num_epochs=1,
                    drop_remainder=False, fields=fields, kinds=kinds, process_index=0,
                    process_count=1)
  seen = 0
  for batch in ds:
    n = len(next(iter(batch.values())))
    if num_examples:
      n = min(n, num_examples - seen)
    if n <= 0:
      return
    yield {k: v[:n] for k, v in batch.items()}
    seen += n


def selected(source, kinds: Sequence[str] | None, tasks: Sequence[str] | None) -> list[int]:
  """Indices of the records of `kinds` and `tasks` (all when None), from the source's
  `record_index()` (kind and task of each record) or by reading every record."""
  index = (source.record_index() if hasattr(source, "record_index")
           else [(source[i]["kind"], source[i]["task"]) for i in range(len(source))])
  keep = [i for i, (kind, task) in enumerate(index)
          if (not kinds or kind in kinds) and (not tasks or task in tasks)]
  if not keep:
    raise ValueError(f"{source!r} has no records of kinds {kinds} and tasks {tasks}")
  return keep


class _Subset(grain.sources.RandomAccessDataSource):
  def __init__(self, source, indices: Sequence[int]):
    self._source, self._indices = source, list(indices)

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, index: int):
    return self._source[self._indices[index]]

  def __repr__(self) -> str:
    return f"{self._source!r}[{len(self._indices)} selected]"
