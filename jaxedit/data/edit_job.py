"""The `jaxedit data` job for a lab's own edit dataset: JSONL rows -> checked, bucketed
ArrayRecord shards (`edit_records`).

Every process computes the same plan (rows -> split, bucket, shard) from the inputs and
writes the shards `index % process_count == process_index`. A shard is written to a
temporary file and renamed, then its own small manifest is written: a killed job resumes
without writing a finished shard again, and records written by 2 processes are those
written by 1. Process 0 writes `dataset.json`, `data_summary.json` and a contact sheet once
every shard is there. A plan that differs from the one a folder was started with (other
rows, buckets or settings) is refused, never mixed.
"""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import json
import logging
import os
import time
from typing import Sequence

import ml_collections
import numpy as np

from jaxedit import viz
from jaxedit.config import ConfigError, plain
from jaxedit.data import edit_cache, edit_records, edit_rows
from jaxedit.data.edit_rows import BadRow, DatasetError, EditRow

PLAN = "plan.json"
SUMMARY = "data_summary.json"
TRAIN_FILE, TEST_FILE = "train_metadata.jsonl", "test_metadata.jsonl"


def write_json(path: str, value) -> None:
  """Atomically: a reader sees the old file or the new one, never half of one."""
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(value, f, indent=1)
  os.replace(tmp, path)


def input_files(data: ml_collections.ConfigDict) -> dict[str, str]:
  """split -> JSONL file. `data.train` is a file or a folder with train_metadata.jsonl; the
  test split is `data.test`, or else the test_metadata.jsonl beside the training file. A
  test file alone makes an evaluation set (a benchmark such as GEdit-Bench)."""
  if not data.train and not data.test:
    raise ConfigError("config key 'data.train' is empty: point it at a JSONL file of edits "
                      "(or a folder holding train_metadata.jsonl), or data.test at a "
                      "benchmark's JSONL for an evaluation set")
  files, train = {}, ""
  if data.train:
    train = os.path.expanduser(data.train)
    if os.path.isdir(train):
      train = os.path.join(train, TRAIN_FILE)
    if not os.path.isfile(train):
      raise ConfigError(f"data.train: {train} does not exist")
    files["train"] = train
  test = os.path.expanduser(data.test) if data.test else ""
  if test and os.path.isdir(test):
    test = os.path.join(test, TEST_FILE)
  if test and not os.path.isfile(test):
    raise ConfigError(f"data.test: {test} does not exist")
  sibling = os.path.join(os.path.dirname(train), TEST_FILE)
  if not test and train and os.path.basename(train) == TRAIN_FILE and os.path.isfile(sibling):
    test = sibling
  if test:
    files["test"] = test
  return files


def holdout(rows: list[EditRow], count: int) -> tuple[list[EditRow], list[EditRow]]:
  """(kept, held out): `count` rows chosen by a hash of their ids, so the choice does not
  depend on the rows' order or the machine."""
  if count <= 0:
    return rows, []
  if count >= len(rows):
    raise ConfigError(f"data.test_holdout={count} would leave no training rows "
                      f"({len(rows)} good rows)")
  rank = sorted(rows, key=lambda r: hashlib.sha256(r.id.encode()).hexdigest())
  chosen = {r.id for r in rank[:count]}
  return [r for r in rows if r.id not in chosen], [r for r in rows if r.id in chosen]


def make_plan(config: ml_collections.ConfigDict) -> tuple[dict, list[BadRow]]:
  """The plan every process agrees on, and the rows left out (checked against the policy)."""
  data = config.data
  files = input_files(data)
  buckets = edit_rows.check_buckets(data.buckets, data.size_multiple)
  if data.records_per_shard < 1:
    raise ConfigError("config key 'data.records_per_shard' must be >= 1")
  fields = {k: v for k, v in plain(data.fields).items() if v}
  rows, bad = {}, []
  for split, path in files.items():
    rows[split], bad_here = edit_rows.read_rows(path, data.format, fields)
    bad += bad_here
  if data.test_holdout and "train" not in rows:
    raise ConfigError("data.test_holdout holds rows out of data.train, which is empty")
  if data.test_holdout and "test" in rows:
    raise ConfigError("data.test_holdout holds rows out of data.train for a test split, but "
                      f"there is one already ({files['test']}): set one or the other")
  if data.test_holdout:
    rows["train"], rows["test"] = holdout(rows["train"], data.test_holdout)
  duplicates = edit_rows.check_unique([r for split in rows for r in rows[split]])
  bad += duplicates
  dup = {(b.file, b.line) for b in duplicates}
  rows = {split: [r for r in rs if (r.file, r.line) not in dup] for split, rs in rows.items()}
  edit_rows.apply_policy(bad, data.on_bad_row, sum(map(len, rows.values())) + len(bad))
  for split in rows:
    if not rows[split] and (split == "train" or "train" not in rows):
      raise DatasetError(f"no usable {split} rows in {files[split]}")

  shards = []
  for split, split_rows in rows.items():
    by_bucket = collections.defaultdict(list)
    for row in split_rows:
      by_bucket[edit_rows.nearest_bucket(row.source_size, buckets)].append(row)
    for b in sorted(by_bucket):
      members = by_bucket[b]
      for k in range(0, len(members), data.records_per_shard):
        shards.append({"split": split, "bucket": list(buckets[b]),
                       "index": k // data.records_per_shard,
                       "rows": [_row_dict(r) for r in members[k:k + data.records_per_shard]]})
  plan = {"format_version": edit_records.FORMAT_VERSION, "inputs": files,
          "buckets": [list(b) for b in buckets], "settings": _settings(config),
          "shards": shards}
  plan["fingerprint"] = hashlib.sha256(json.dumps(
      {**plan, "inputs": _input_stamps(files, rows)}, sort_keys=True).encode()).hexdigest()[:16]
  return plan, bad


def _row_dict(row: EditRow) -> dict:
  out = {"id": row.id, "instruction": row.instruction, "requirement": row.requirement,
         "source_image": row.source_image, "target_image": row.target_image,
         "file": row.file, "line": row.line}
  if row.task_type:  # only where a row has one: plans and records of others are unchanged
    out["task_type"] = row.task_type
  return out


def _settings(config: ml_collections.ConfigDict) -> dict:
  """What changes the records' content besides the rows and their images."""
  return {"resample": "lanczos-cover-centre-crop", "on_bad_row": config.data.on_bad_row,
          "encode": edit_cache.settings(config.encode)}


def _input_stamps(files: dict[str, str], rows: dict[str, list[EditRow]]) -> dict:
  """The JSONL files' contents and the images' sizes: what a resumed job must find unchanged
  (not modification times, which differ between copies of the data on different hosts)."""
  stamps = {}
  for split, path in files.items():
    with open(path, "rb") as f:
      stamps[split] = hashlib.sha256(f.read()).hexdigest()
  stamps["images"] = [os.path.getsize(p) for split in rows for r in rows[split]
                      for p in (r.source_image, r.target_image) if p]
  return stamps


def _shard_done(root: str, shard: dict, fingerprint: str) -> dict | None:
  path = edit_records.shard_path(root, shard["split"], shard["bucket"], shard["index"])
  try:
    with open(path + ".json") as f:
      manifest = json.load(f)
  except (OSError, ValueError):
    return None
  if manifest.get("fingerprint") == fingerprint and os.path.exists(path):
    return manifest
  return None


def _record(row: dict, bucket: tuple[int, int]) -> dict:
  source = edit_rows.fit_to_bucket(edit_rows.load_image(row["source_image"]), bucket)
  target = (edit_rows.fit_to_bucket(edit_rows.load_image(row["target_image"]), bucket)
            if row["target_image"] else np.zeros((0, 0, 3), np.uint8))
  out = {"id": row["id"], "instruction": row["instruction"],
         "requirement": row["requirement"], "file": row["file"], "line": row["line"],
         "source_image": source, "target_image": target}
  if row.get("task_type"):
    out["task_type"] = row["task_type"]
  return out


def write_shard(root: str, shard: dict, fingerprint: str, policy: str,
                pool: concurrent.futures.Executor,
                encoders: edit_cache.Encoders | None = None) -> dict:
  """Decodes and fits the shard's images (in `pool`), caches their encodings (`encoders`),
  and writes its records; returns its manifest. An image that fails to decode is a bad
  row, under the job's policy."""
  from array_record.python.array_record_module import ArrayRecordWriter

  bucket = tuple(shard["bucket"])
  path = edit_records.shard_path(root, shard["split"], bucket, shard["index"])
  os.makedirs(os.path.dirname(path), exist_ok=True)
  futures = [pool.submit(_record, row, bucket) for row in shard["rows"]]
  records, skipped = [], []
  for row, future in zip(shard["rows"], futures):
    try:
      records.append(future.result())
    except (OSError, ValueError, SyntaxError) as e:
      bad = BadRow(row["file"], row["line"], f"an image cannot be decoded: {e}")
      if policy == "error":
        raise DatasetError(f"{bad.where}: {bad.reason}; set data.on_bad_row=skip to leave "
                           "it out") from None
      skipped.append(bad.as_dict())
  if encoders is not None:
    records = encoders(records)
  tmp = f"{path}.tmp{os.getpid()}"
  writer = ArrayRecordWriter(tmp, "group_size:1")
  try:
    for record in records:
      writer.write(edit_records.encode_record(record))
  finally:
    writer.close()
  os.replace(tmp, path)
  ids = [r["id"] for r in records]
  manifest = {"fingerprint": fingerprint, "records": len(ids), "ids": ids,
              "with_target": sum(bool(np.size(r["target_image"])) for r in records),
              "skipped": skipped}
  write_json(path + ".json", manifest)
  return manifest


def _check_plan(root: str, plan: dict) -> None:
  path = os.path.join(root, PLAN)
  if not os.path.exists(path):
    return
  with open(path) as f:
    old = json.load(f)
  if old.get("fingerprint") != plan["fingerprint"]:
    raise ConfigError(f"{root} holds records built from other inputs or settings (plan "
                      f"{old.get('fingerprint')}, now {plan['fingerprint']}); use a new workdir "
                      "or delete it")


def _sync(name: str) -> None:
  import jax

  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def write_shards(root: str, plan: dict, process_index: int, process_count: int, policy: str,
                 num_threads: int, encoders: edit_cache.Encoders | None = None) -> int:
  """Writes the shards of process `process_index` of `process_count` not written yet;
  returns how many rows it wrote."""
  mine = [s for i, s in enumerate(plan["shards"]) if i % process_count == process_index]
  todo = [s for s in mine if not _shard_done(root, s, plan["fingerprint"])]
  total = sum(len(s["rows"]) for s in todo)
  logging.info("%d rows in %d shards (%d for this process, %d to write: %d rows)",
               sum(len(s["rows"]) for s in plan["shards"]), len(plan["shards"]), len(mine),
               len(todo), total)
  start = last = time.time()
  done = 0
  with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
    for shard in todo:
      write_shard(root, shard, plan["fingerprint"], policy, pool, encoders)
      done += len(shard["rows"])
      if time.time() - last > 10 or done == total:
        rate = done / max(time.time() - start, 1e-9)
        logging.info("records: %d/%d rows (%.1f rows/s, ETA %.0fs)", done, total, rate,
                     (total - done) / max(rate, 1e-9))
        last = time.time()
  return done


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  import jax

  start = time.time()
  plan, bad = make_plan(config)
  os.makedirs(workdir, exist_ok=True)
  _check_plan(workdir, plan)
  if jax.process_index() == 0:
    write_json(os.path.join(workdir, PLAN), plan)
  encoders = (edit_cache.Encoders(config.encode, config.mesh) if config.encode.pipeline
              else None)
  write_shards(workdir, plan, jax.process_index(), jax.process_count(), config.data.on_bad_row,
               config.data.num_threads, encoders)
  _sync("jaxedit_data_shards")
  summary = {}
  if jax.process_index() == 0:
    summary = finish(workdir, plan, bad, config, time.time() - start)
  _sync("jaxedit_data_done")
  return summary


def finish(root: str, plan: dict, bad: Sequence[BadRow], config, seconds: float) -> dict:
  """dataset.json (what readers need), data_summary.json (what people read) and a contact
  sheet, from the shards' manifests."""
  splits, skipped = {}, [b.as_dict() for b in bad]
  for shard in plan["shards"]:
    manifest = _shard_done(root, shard, plan["fingerprint"])
    if manifest is None:
      raise DatasetError(f"shard {shard['split']} {shard['bucket']} {shard['index']} of "
                         f"{root} was not written")
    skipped += manifest["skipped"]
    split = splits.setdefault(shard["split"], {"records": 0, "with_target": 0,
                                               "buckets": []})
    split["with_target"] += manifest["with_target"]
    buckets = {tuple(b["bucket"]): b for b in split["buckets"]}
    entry = buckets.get(tuple(shard["bucket"]))
    if entry is None:
      entry = {"bucket": shard["bucket"], "records": 0, "shards": []}
      split["buckets"].append(entry)
    entry["shards"].append({"index": shard["index"], "records": manifest["records"]})
    entry["records"] += manifest["records"]
    split["records"] += manifest["records"]
  manifest = {"format_version": edit_records.FORMAT_VERSION, "fingerprint": plan["fingerprint"],
              "inputs": plan["inputs"], "buckets": plan["buckets"], "splits": splits,
              "fields": ["id", "instruction", "requirement", "file", "line", "source_image",
                         "target_image"] + cached_fields(config.encode),
              "skipped": skipped}
  write_json(os.path.join(root, edit_records.MANIFEST), manifest)
  summary = {"records_dir": root, "seconds": round(seconds, 1), "splits": {
      split: {"records": s["records"], "with_target": s["with_target"],
              "buckets": {f"{b['bucket'][0]}x{b['bucket'][1]}": b["records"]
                          for b in s["buckets"]}} for split, s in splits.items()},
             "skipped_rows": len(skipped), "skipped": skipped}
  write_json(os.path.join(root, SUMMARY), summary)
  if config.report.contact_sheet_examples:
    contact_sheet(root, config.report.contact_sheet_examples).save(
        os.path.join(root, "contact_sheet_train.png"))
  print(format_summary(summary), flush=True)
  return summary


def cached_fields(encode: ml_collections.ConfigDict) -> list[str]:
  if not encode.pipeline:
    return []
  return (list(edit_cache.LATENT_FIELDS.values()) * encode.vae
          + list(edit_cache.TEXT_FIELDS) * encode.text)


def format_summary(summary: dict) -> str:
  lines = [f"edit records in {summary['records_dir']} ({summary['seconds']}s)"]
  for split, s in summary["splits"].items():
    buckets = ", ".join(f"{b}: {n}" for b, n in s["buckets"].items())
    lines.append(f"== {split}: {s['records']} records, {s['with_target']} with target "
                 f"images ({buckets})")
  if summary["skipped"]:
    lines.append(f"skipped {summary['skipped_rows']} bad rows (data.on_bad_row=skip):")
    lines += [f"  {b['file']}:{b['line']}: {b['reason']}" for b in summary["skipped"][:20]]
    if len(summary["skipped"]) > 20:
      lines.append(f"  ... and {len(summary['skipped']) - 20} more, all in "
                   f"{SUMMARY}")
  return "\n".join(lines)


def contact_sheet(root: str, num_examples: int):
  """Source | target (where the data has one) with the instruction, first records of each
  training bucket, shown at one height."""
  records = edit_records.EditRecords(root)
  sources = records.buckets("train" if "train" in records.splits else "test")
  rows = []
  for source in sources:
    for i in range(min(len(source), max(1, num_examples // len(sources)))):
      r = source[i]
      images = [r["source_image"]] + ([r["target_image"]] if r["has_target"] else [])
      images = [_thumbnail(im, 128) for im in images]
      rows.append((images, [f"[{source.bucket[0]}x{source.bucket[1]}] {r['instruction']}"]))
  width = max(sum(im.shape[1] for im in imgs) for imgs, _ in rows)
  rows = [([np.concatenate(imgs + [np.full((128, width - sum(im.shape[1] for im in imgs), 3),
                                           255, np.uint8)], axis=1)], text)
          for imgs, text in rows]
  return viz.image_grid(rows[:num_examples], scale=1, header=["source | target"])


def _thumbnail(image: np.ndarray, height: int) -> np.ndarray:
  from PIL import Image

  w = max(1, round(image.shape[1] * height / image.shape[0]))
  return np.asarray(Image.fromarray(image).resize((w, height), Image.Resampling.LANCZOS))
