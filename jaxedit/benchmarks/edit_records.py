"""Benchmark: edit records, the data job's encoders and the SFT step on cached inputs against
the step that encodes its inputs itself, in one run.

    python -m jaxedit.benchmarks.edit_records --pipeline DIR --jsonl FILE [--bucket 512x512]
        [--rows 64] [--batch 8] [--encode_batch 8] [--max_sequence_length 512]
        [--repeats 5] [--set KEY=VALUE] [--out edit_records.json]

DIR is a diffusers FLUX.1(-Kontext) pipeline folder, FILE a JSONL of edits with source and
target images (any format `jaxedit data` reads). Its first `--rows` rows go into one bucket,
so every batch has one shape (one compile per program). In order:
  data job   records without encodings are written (decode, fit, PNG, ArrayRecord); then the
             pipeline's VAE and T5 / CLIP encoders (edit_cache.Encoders) run on the decoded
             rows, once to warm up (compiles) and `--repeats` times timed: images/s (source
             and target) and rows/s; then the records with cached encodings are written, warm;
  SFT step   the records trainer's step (editor_sft.make_records_step, the architecture and
             weights from DIR), one compiled program on either input: a batch read from the
             cached records, against one read from the plain records whose inputs the
             pipeline's encoders compute every step (RecordsSetup.model_inputs, as the
             trainer does): median seconds of each (reading, inputs, the step) after a
             warm-up step, and their ratio. The first losses of the two are compared: both
             compute the same thing.
Prints a table; writes JSON (common.write_json). Timings are not asserted anywhere.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import tempfile
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxedit import flops, flux_editing, schema, sharding
from jaxedit.benchmarks import common
from jaxedit.config import ConfigError, apply_overrides
from jaxedit.data import edit_cache, edit_job, edit_records
from jaxedit.trainers import editor_sft


def parse_bucket(text: str) -> tuple[int, int]:
  """'HxW' -> (H, W)."""
  try:
    height, width = (int(v) for v in text.lower().split("x"))
  except ValueError:
    raise SystemExit(f"--bucket must be HEIGHTxWIDTH (e.g. 512x512), got {text!r}") from None
  return height, width


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--pipeline", default="",
                 help="a diffusers FLUX.1(-Kontext) pipeline folder (vae/, text_encoder/, "
                      "text_encoder_2/, transformer/, ...)")
  p.add_argument("--jsonl", default="",
                 help="a JSONL file of edits with source and target images")
  p.add_argument("--bucket", default="512x512", help="HxW: every row is fitted to it")
  p.add_argument("--rows", type=int, default=64, help="the JSONL's first rows (0: all)")
  p.add_argument("--batch", type=int, default=8, help="SFT step batch (global)")
  p.add_argument("--encode_batch", type=int, default=8, help="the data job's encoder batch")
  p.add_argument("--max_sequence_length", type=int, default=512, help="T5 tokens")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="SFT config override, e.g. model.dtype=bfloat16 (repeatable)")
  p.add_argument("--cpu_devices", type=int, default=0,
                 help="JAX CPU devices to expose (0: JAX's default)")
  p.add_argument("--out", default="edit_records.json")


def check_inputs(pipeline: str, jsonl: str, prog: str = "edit_records") -> None:
  """A clear error, before any work, when the pipeline folder or the JSONL is missing."""
  if not pipeline or not jsonl:
    raise SystemExit(f"{prog}: needs --pipeline DIR (a diffusers FLUX.1(-Kontext) pipeline "
                     "folder; tests/tiny_flux.py writes a tiny one) and --jsonl FILE (edits "
                     "with source and target images)")
  if not os.path.isdir(os.path.join(pipeline, "vae")):
    raise SystemExit(f"{prog}: --pipeline {pipeline} is not a diffusers pipeline folder "
                     "(no vae/)")
  if not os.path.isfile(jsonl):
    raise SystemExit(f"{prog}: --jsonl {jsonl} does not exist")


# ------------------------------------------------------------------------------------------
# The data job
# ------------------------------------------------------------------------------------------
def data_config(pipeline: str, jsonl: str, bucket, encode_batch: int,
                max_sequence_length: int) -> ml_collections.ConfigDict:
  """`jaxedit data`'s config for these rows: one bucket, no test split of its own making."""
  c = schema.edit_dataset()
  c.data.train, c.data.buckets, c.data.test_holdout = jsonl, (tuple(bucket),), 0
  c.data.num_threads = os.cpu_count() or 1
  c.report.contact_sheet_examples = 0
  c.encode.pipeline, c.encode.batch_size = pipeline, encode_batch
  c.encode.max_sequence_length = max_sequence_length
  return c


def first_rows(plan: dict, rows: int) -> dict:
  """The plan cut to its first `rows` rows (0: all), training shards first."""
  if not rows:
    return plan
  shards, left = [], rows
  for shard in plan["shards"]:
    if left <= 0:
      break
    shards.append({**shard, "rows": shard["rows"][:left]})
    left -= len(shards[-1]["rows"])
  return {**plan, "shards": shards}


def check_targets(plan: dict) -> int:
  """The training rows (all with target images: the SFT step learns from them)."""
  train = [r for s in plan["shards"] if s["split"] == "train" for r in s["rows"]]
  missing = [r for r in train if not r["target_image"]]
  if missing:
    raise ConfigError(f"{len(missing)} of the {len(train)} training rows have no target image "
                      f"(e.g. {missing[0]['file']}:{missing[0]['line']}); the SFT step learns "
                      "from targets: give a JSONL of edit pairs (source and target images)")
  return len(train)


def write_records(root: str, plan: dict, config, encoders=None) -> float:
  """Writes the plan's records (with encodings when `encoders` is given); returns seconds."""
  start = time.perf_counter()
  edit_job.write_shards(root, plan, 0, 1, config.data.on_bad_row, config.data.num_threads,
                        encoders)
  seconds = time.perf_counter() - start
  with contextlib.redirect_stdout(io.StringIO()):  # the job's summary: not this table's
    edit_job.finish(root, plan, [], config, seconds)
  return seconds


def decoded_rows(root: str) -> list[list[dict]]:
  """Every record of a plain records folder, decoded and fitted as the job's encoders get
  them (a row without a target has an empty one), one list per (split, bucket)."""
  records = edit_records.EditRecords(root)
  groups = []
  for split in records.splits:
    for source in records.buckets(split):
      rows = [source[i] for i in range(len(source))]
      for r in rows:
        if not r["has_target"]:
          r["target_image"] = np.zeros((0, 0, 3), np.uint8)
      groups.append(rows)
  return groups


def time_encoders(encoders: edit_cache.Encoders, groups: list[list[dict]],
                  repeats: int) -> dict:
  """Warm-up pass (compiles), then `repeats` timed passes over every row."""
  start = time.perf_counter()
  for rows in groups:
    encoders(rows)
  warmup = time.perf_counter() - start

  def one_pass():
    for rows in groups:
      encoders(rows)  # host arrays out: blocks until the encoders are done
  times = common.timed(one_pass, repeats)
  return {"warmup_s": warmup, "times": times}


# ------------------------------------------------------------------------------------------
# The SFT step
# ------------------------------------------------------------------------------------------
def sft_config(pipeline: str, records: str, batch: int, max_sequence_length: int,
               overrides) -> ml_collections.ConfigDict:
  """Editor SFT on records, the architecture and weights from the pipeline folder."""
  c = schema.on_edit_records(schema.editor_sft())
  c.init_from, c.data.records = pipeline, records
  c.model.text_max_len = max_sequence_length
  c.train.batch_size = batch
  apply_overrides(c, list(overrides))
  return c


def time_step(setup: flux_editing.RecordsSetup, step, state, batch: int,
              repeats: int) -> dict:
  """The trainer's step with its inputs: a batch read, its model inputs (cached, or encoded
  by the pipeline's encoders), the step. One warm-up step (compiles; loads the encoders
  where they run), then `repeats` timed."""
  data = iter(edit_records.train_batches(setup.records, "train", batch, seed=0,
                                         process_index=0, process_count=1))
  box, inputs_times = [state], []

  def run():
    start = time.perf_counter()
    inputs = sharding.global_batch(setup.model_inputs(next(data)), setup.batch_sharding)
    inputs_times.append(time.perf_counter() - start)
    box[0], metrics = step(box[0], inputs)
    return float(metrics["loss"]), inputs

  start = time.perf_counter()
  first_loss, inputs = run()
  warmup = time.perf_counter() - start
  with jax.set_mesh(step.mesh), nn.logical_axis_rules(step.rules):
    model_flops = flops.count(step.jitted, *step.arguments(box[0], inputs))
  inputs_times.clear()
  times = common.timed(run, repeats)
  return {"times": times, "inputs_times": list(inputs_times), "first_loss": first_loss,
          "warmup_s": warmup, "model_flops": model_flops}


# ------------------------------------------------------------------------------------------
def run(pipeline: str, jsonl: str, bucket=(512, 512), rows: int = 64, batch: int = 8,
        encode_batch: int = 8, max_sequence_length: int = 512, repeats: int = 5,
        overrides=(), out: str = "", workdir: str | None = None) -> dict:
  """The whole benchmark (records in `workdir`, or a temporary folder); returns the JSON."""
  check_inputs(pipeline, jsonl)
  bucket = tuple(bucket)
  config = data_config(pipeline, jsonl, bucket, encode_batch, max_sequence_length)
  plain_config = ml_collections.ConfigDict(config.to_dict())
  plain_config.encode.pipeline = ""
  plan = first_rows(edit_job.make_plan(config)[0], rows)
  plain_plan = first_rows(edit_job.make_plan(plain_config)[0], rows)
  train_rows = check_targets(plan)
  if train_rows < batch:
    print(f"note: {train_rows} training rows for a batch of {batch}: batches repeat rows")
  with contextlib.ExitStack() as stack:
    root = workdir or stack.enter_context(tempfile.TemporaryDirectory(prefix="edit_bench_"))
    plain_dir, cached_dir = os.path.join(root, "plain"), os.path.join(root, "cached")

    # ---- the data job ----
    job_plain_s = write_records(plain_dir, plain_plan, plain_config)
    groups = decoded_rows(plain_dir)
    n_rows = sum(map(len, groups))
    n_images = sum(1 + bool(r["target_image"].size) for g in groups for r in g)
    start = time.perf_counter()
    encoders = edit_cache.Encoders(config.encode, config.mesh)
    load_s = time.perf_counter() - start
    enc = time_encoders(encoders, groups, repeats)
    job_cached_s = write_records(cached_dir, plan, config, encoders)
    encode_batch = encoders.batch_size  # rounded up to the devices' batch axes
    del encoders

    # ---- the SFT step: cached inputs against inputs encoded each step ----
    # Both setups build the same model, shardings and step: one compiled step, one initial
    # state (from the pipeline's transformer), copied, run on either's inputs.
    setups = {}
    for name, folder in (("cached", cached_dir), ("encoding", plain_dir)):
      config = sft_config(pipeline, folder, batch, max_sequence_length, overrides)
      setups[name] = flux_editing.make_setup(config, "")
    if not setups["cached"].cached or setups["encoding"].cached:
      raise RuntimeError(f"the records in {root} are not what the steps expect")
    setup = setups["cached"]
    step = editor_sft.make_records_step(setup)
    state = editor_sft.start_state(setup)
    steps = {name: time_step(s, step, jax.tree.map(jnp.copy, state), batch, repeats)
             for name, s in setups.items()}
    devices = setup.mesh.size
    params = sum(x.size for x in jax.tree.leaves(setup.abstract_state.params))
    dtype = setup.config.model.dtype

  encode_s = common.median(enc["times"])
  cached_s, encoding_s = (common.median(steps[k]["times"]) for k in ("cached", "encoding"))
  losses = [steps[k]["first_loss"] for k in ("cached", "encoding")]
  result = {
      "suite": "edit_records", "pipeline": pipeline, "jsonl": jsonl,
      "machine": common.machine(), "device": jax.devices()[0].device_kind,
      "devices": devices, "bucket": list(bucket), "rows": n_rows, "images": n_images,
      "train_rows": train_rows, "batch": batch, "encode_batch": encode_batch,
      "max_sequence_length": max_sequence_length, "params": params, "dtype": dtype,
      "repeats": repeats,
      # the data job
      "encoders_load_s": load_s, "encode_warmup_s": enc["warmup_s"], "encode_s": encode_s,
      "encode_times_s": enc["times"], "encode_images_per_s": n_images / encode_s,
      "encode_rows_per_s": n_rows / encode_s,
      "job_plain_s": job_plain_s, "job_plain_rows_per_s": n_rows / job_plain_s,
      "job_cached_s": job_cached_s, "job_cached_rows_per_s": n_rows / job_cached_s,
      "job_cached_images_per_s": n_images / job_cached_s,
      # the SFT step
      "step_cached_s": cached_s, "step_encoding_s": encoding_s,
      "step_ratio": encoding_s / cached_s,
      "inputs_cached_s": common.median(steps["cached"]["inputs_times"]),
      "inputs_encoding_s": common.median(steps["encoding"]["inputs_times"]),
      "step_cached_times_s": steps["cached"]["times"],
      "step_encoding_times_s": steps["encoding"]["times"],
      "step_cached_warmup_s": steps["cached"]["warmup_s"],
      "step_encoding_warmup_s": steps["encoding"]["warmup_s"],
      "model_flops": steps["cached"]["model_flops"],
      "first_loss_cached": losses[0], "first_loss_encoding": losses[1],
      "first_loss_rel_err": abs(losses[0] - losses[1]) / max(abs(losses[1]), 1e-30),
  }
  print(table(result))
  common.write_json(result, out)
  return result


def table(r: dict) -> str:
  bucket = "x".join(map(str, r["bucket"]))
  lines = [
      f"edit_records: {r['rows']} rows ({r['images']} images) in bucket {bucket}, "
      f"{r['params'] / 1e6:.2f}M-parameter editor ({r['dtype']}), SFT batch {r['batch']}, "
      f"{common.devices_label(r['devices'])}, {r['machine']}",
      f"{'data job':<34}{'s':>9}{'images/s':>11}{'rows/s':>9}",
      f"{'  encoders (VAE, T5 + CLIP), warm':<34}{r['encode_s']:>9.3f}"
      f"{r['encode_images_per_s']:>11.1f}{r['encode_rows_per_s']:>9.1f}",
      f"{'  job with encoders (warm)':<34}{r['job_cached_s']:>9.3f}"
      f"{r['job_cached_images_per_s']:>11.1f}{r['job_cached_rows_per_s']:>9.1f}",
      f"{'  job without encoders':<34}{r['job_plain_s']:>9.3f}{'':>11}"
      f"{r['job_plain_rows_per_s']:>9.1f}",
      f"{'SFT step (read, inputs, step)':<34}{'s':>9}{'inputs s':>11}",
      f"{'  cached inputs':<34}{r['step_cached_s']:>9.4f}{r['inputs_cached_s']:>11.4f}",
      f"{'  encoded each step':<34}{r['step_encoding_s']:>9.4f}"
      f"{r['inputs_encoding_s']:>11.4f}",
      f"encoded each step / cached: {r['step_ratio']:.2f}x; first losses agree to "
      f"{r['first_loss_rel_err']:.1e}; {r['model_flops'] / 1e9:.2f} GFLOP per step"]
  if "mfu" in r:
    lines[-1] += f", cached step {r['mfu']:.1%} MFU"
  return "\n".join(lines)


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  add_arguments(p)
  args = p.parse_args(argv)
  check_inputs(args.pipeline, args.jsonl)
  common.expose_cpu_devices(args.cpu_devices)  # before any JAX operation
  return run(args.pipeline, args.jsonl, parse_bucket(args.bucket), args.rows, args.batch,
             args.encode_batch, args.max_sequence_length, args.repeats, args.set, args.out)


if __name__ == "__main__":
  main()
