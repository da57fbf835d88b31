"""Edit records on disk and read back with grain: ArrayRecord shards per split and bucket.

A records folder (what `jaxedit data` writes for a lab's own data) holds `dataset.json` (the
splits, their buckets and shards, and every row left out) and
`{split}/{height}x{width}/{k:05d}.array_record` shards. A record is msgpack (never pickle):
id, instruction, requirement, task type (benchmarks), provenance, the source (and target) image as PNG fitted to the
bucket, and, where the job cached them, latents and text embeddings as arrays. Every batch
comes from one bucket, so each has a fixed shape; which bucket a batch comes from, and the
rows in it, do not depend on the number of processes reading (as `pipeline.make_dataset`).
"""

from __future__ import annotations

import io
import json
import os
from typing import Any, Iterator, Sequence

import grain
import numpy as np
from flax import serialization
from PIL import Image

from jaxedit.data.pipeline import PREFETCH_BATCHES
from jaxedit.errors import CorruptRecordError

MANIFEST = "dataset.json"
FORMAT_VERSION = 1
TEXT_FIELDS = ("id", "instruction", "requirement", "task_type", "file")
IMAGE_FIELDS = ("source_image", "target_image")


def png_bytes(image: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(np.asarray(image, np.uint8)).save(buf, format="PNG")
  return buf.getvalue()


def encode_record(record: dict[str, Any]) -> bytes:
  """msgpack of a record whose images are uint8 arrays (stored as PNG)."""
  out = dict(record)
  for key in IMAGE_FIELDS:
    if key in out:
      out[key] = png_bytes(out[key]) if np.size(out[key]) else b""
  return serialization.msgpack_serialize(out)


def decode_record(data: bytes) -> dict[str, Any]:
  """The record with its images decoded. A row without a target image gets zeros of the
  source's shape (and zero target latents where latents are cached), `has_target` False,
  so that every record of a bucket stacks into one batch."""
  record = serialization.msgpack_restore(data)
  record.setdefault("task_type", "")  # written only where a row has one
  source = np.asarray(Image.open(io.BytesIO(record["source_image"])).convert("RGB"), np.uint8)
  record["source_image"] = source
  record["has_target"] = bool(record.get("target_image"))
  record["target_image"] = (np.asarray(Image.open(io.BytesIO(record["target_image"]))
                                       .convert("RGB"), np.uint8)
                            if record["has_target"] else np.zeros_like(source))
  if "source_latents" in record and "target_latents" not in record:
    record["target_latents"] = np.zeros_like(record["source_latents"])
  return record


def shard_path(root: str, split: str, bucket: Sequence[int], index: int) -> str:
  return os.path.join(root, split, f"{bucket[0]}x{bucket[1]}", f"{index:05d}.array_record")


def read_manifest(root: str) -> dict:
  path = os.path.join(root, MANIFEST)
  if not os.path.exists(path):
    raise FileNotFoundError(f"no edit records at {root} (no {MANIFEST}); build them with "
                            "`jaxedit data --config configs/edit_data.py`")
  try:
    with open(path) as f:
      manifest = json.load(f)
  except (OSError, ValueError) as e:
    raise CorruptRecordError(f"{path} cannot be read: {e}") from None
  if manifest.get("format_version") != FORMAT_VERSION:
    raise CorruptRecordError(f"{path} has format_version {manifest.get('format_version')!r}; "
                             f"this jaxedit reads {FORMAT_VERSION}: rebuild the records")
  return manifest


class BucketSource(grain.sources.RandomAccessDataSource):
  """The decoded, checked records of one split's bucket (all its shards, in order)."""

  def __init__(self, root: str, split: str, bucket: Sequence[int], shards: Sequence[dict]):
    self.bucket = tuple(bucket)
    self._paths = [shard_path(root, split, bucket, s["index"]) for s in shards]
    missing = [p for p in self._paths if not os.path.exists(p)]
    if missing:
      raise CorruptRecordError(f"{len(missing)} shard(s) of split {split!r} are missing, "
                               f"e.g. {missing[0]}: rebuild or copy the records folder whole")
    self._counts = np.cumsum([0] + [s["records"] for s in shards])
    self._source = grain.sources.ArrayRecordDataSource(self._paths)
    if len(self._source) != self._counts[-1]:
      raise CorruptRecordError(f"split {split!r} bucket {self.bucket}: {MANIFEST} lists "
                               f"{self._counts[-1]} records but its shards hold "
                               f"{len(self._source)}")

  def __len__(self) -> int:
    return int(self._counts[-1])

  def where(self, index: int) -> str:
    shard = int(np.searchsorted(self._counts, index, side="right")) - 1
    return f"record {index - self._counts[shard]} of {self._paths[shard]}"

  def __getitem__(self, index: int) -> dict[str, Any]:
    try:
      record = decode_record(self._source[index])
    except Exception as e:
      raise CorruptRecordError(f"{self.where(index)} is corrupt: {e}") from e
    image = record.get("source_image")
    if image is None or image.shape != (*self.bucket, 3):
      raise CorruptRecordError(f"{self.where(index)} holds a source image of "
                               f"{getattr(image, 'shape', None)}, not {self.bucket}")
    return record

  def __repr__(self) -> str:
    return f"BucketSource({self.bucket}, {len(self._paths)} shards)"


class EditRecords:
  """A records folder: its manifest and one source per (split, bucket)."""

  def __init__(self, root: str):
    self.root = root
    self.manifest = read_manifest(root)

  @property
  def splits(self) -> list[str]:
    return sorted(self.manifest["splits"])

  def buckets(self, split: str) -> list[BucketSource]:
    if split not in self.manifest["splits"]:
      raise ValueError(f"split {split!r} is not in {self.root}; it has {self.splits}")
    return [BucketSource(self.root, split, b["bucket"], b["shards"])
            for b in self.manifest["splits"][split]["buckets"] if b["records"]]

  def __len__(self) -> int:
    return sum(s["records"] for s in self.manifest["splits"].values())


def _stack(records: list[dict], fields: Sequence[str] | None) -> dict[str, np.ndarray]:
  keys = fields or records[0].keys()
  return {k: np.stack([np.asarray(r[k]) for r in records]) for k in keys}


def train_batches(records: EditRecords, split: str, batch_size: int, *, seed: int,
                  process_index: int | None = None, process_count: int | None = None,
                  fields: Sequence[str] | None = None, num_epochs: int | None = None,
                  chunks: int = 1) -> grain.IterDataset:
  """Batches of this process's `batch_size` rows of each global batch, every global batch
  from one bucket. Per bucket, the record order is shuffled anew each epoch and cut into
  global batches; buckets take turns in proportion to their size (`grain.MapDataset.mix`).
  Only indices are mixed, so each process decodes just its own rows; the iterator's state
  (`get_state()`) is the same on every process and resumes on any process count. With
  `chunks` > 1 a global batch is that many consecutive chunks and a process holds its rows
  of each, chunk after chunk (RL iterations roll out chunk by chunk)."""
  if process_index is None or process_count is None:
    import jax

    process_index, process_count = jax.process_index(), jax.process_count()
  global_batch = batch_size * process_count
  sources = records.buckets(split)
  by_bucket = [
      grain.MapDataset.range(len(src)).shuffle(seed=seed + b).repeat(num_epochs)
      .batch(global_batch, drop_remainder=True).map(lambda idx, b=b: (b, idx))
      for b, src in enumerate(sources)]
  ds = grain.MapDataset.mix(by_bucket, [len(src) for src in sources]) if len(
      by_bucket) > 1 else by_bucket[0]
  if batch_size % chunks:
    raise ValueError(f"{batch_size} rows per process do not split into {chunks} chunks")
  per_chunk = batch_size // chunks
  rows = np.concatenate([c * per_chunk * process_count + process_index * per_chunk
                         + np.arange(per_chunk) for c in range(chunks)])

  def read(item):
    b, idx = item
    return _stack([sources[b][int(i)] for i in idx[rows]], fields)

  return ds.map(read).to_iter_dataset(grain.ReadOptions(
      num_threads=PREFETCH_BATCHES, prefetch_buffer_size=PREFETCH_BATCHES))


def fixed_batches(records: EditRecords, split: str, batch_size: int, num_examples: int = 0,
                  fields: Sequence[str] | None = None) -> Iterator[dict[str, np.ndarray]]:
  """The first `num_examples` (0: all) records of `split`, bucket after bucket, in batches of
  at most `batch_size` from one bucket each: evaluation data, read alike on every process."""
  seen = 0
  for source in records.buckets(split):
    for start in range(0, len(source), batch_size):
      n = min(batch_size, len(source) - start)
      if num_examples:
        n = min(n, num_examples - seen)
      if n <= 0:
        return
      yield _stack([source[start + i] for i in range(n)], fields)
      seen += n
