"""A lab's own edit data: JSONL formats, row checks, aspect-ratio buckets, ArrayRecord shards
read back per process, and a job that resumes without rewriting finished shards."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from configs import edit_data
from jaxedit import cli
from jaxedit.config import ConfigError
from jaxedit.data import edit_job, edit_records, edit_rows
from jaxedit.errors import DatasetError

BUCKETS = ((64, 64), (48, 80), (80, 48))
SIZES = [(100, 100), (80, 120), (120, 80), (60, 140), (90, 90), (100, 150), (70, 70),
         (50, 90)]


def write_png(path, size, seed):
  rng = np.random.default_rng(seed)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(path)


def write_jsonl(path, rows):
  with open(path, "w") as f:
    for row in rows:
      f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")


@pytest.fixture
def edit_r1(tmp_path):
  """An Edit-R1 folder: train_metadata.jsonl and test_metadata.jsonl, images beside them."""
  for i, size in enumerate(SIZES):
    write_png(str(tmp_path / "images" / f"{i}.png"), size, i)
  rows = [{"prompt": f"turn object {i} blue", "image": f"images/{i}.png",
           "requirement": f"object {i} is blue"} for i in range(len(SIZES))]
  write_jsonl(tmp_path / "train_metadata.jsonl", rows[:6])
  write_jsonl(tmp_path / "test_metadata.jsonl", rows[6:])
  return tmp_path


def config(train, **data):
  c = edit_data.get_config().unlock()
  c.data.train = str(train)
  c.data.buckets = BUCKETS
  c.data.records_per_shard = 2
  c.report.contact_sheet_examples = 0
  for k, v in data.items():
    setattr(c.data, k, v)
  return c


def build(cfg, root):
  plan, bad = edit_job.make_plan(cfg)
  edit_job.write_shards(str(root), plan, 0, 1, cfg.data.on_bad_row, 2)
  return edit_job.finish(str(root), plan, bad, cfg, 0.0)


def all_records(root, split):
  records = edit_records.EditRecords(str(root))
  return [src[i] for src in records.buckets(split) for i in range(len(src))]


def test_edit_r1_folder_round_trips(edit_r1, tmp_path):
  summary = build(config(edit_r1 / "train_metadata.jsonl"), tmp_path / "out")
  assert summary["splits"]["train"]["records"] == 6
  assert summary["splits"]["test"]["records"] == 2  # test_metadata.jsonl beside the file
  assert summary["skipped_rows"] == 0
  records = {r["id"]: r for r in all_records(tmp_path / "out", "train")}
  assert sorted(records) == [f"train_metadata.jsonl:{i}" for i in range(1, 7)]
  for i in range(6):
    r = records[f"train_metadata.jsonl:{i + 1}"]
    assert r["instruction"] == f"turn object {i} blue"
    assert r["requirement"] == f"object {i} is blue"
    bucket = BUCKETS[edit_rows.nearest_bucket(SIZES[i], BUCKETS)]
    image = edit_rows.load_image(str(edit_r1 / "images" / f"{i}.png"))
    np.testing.assert_array_equal(r["source_image"], edit_rows.fit_to_bucket(image, bucket))
    assert not r["has_target"] and not r["target_image"].any()
  # a folder names the same files
  assert build(config(edit_r1), tmp_path / "out2")["splits"] == summary["splits"]


def test_dancegrpo_editscore_and_field_map(tmp_path):
  for name in ("a", "b", "c"):
    write_png(str(tmp_path / f"{name}.png"), (64, 96), ord(name))
  write_jsonl(tmp_path / "dance.jsonl", [
      {"instruction": "add a hat", "source_image": "a.png", "target_image": "b.png"},
      {"instruction": "remove it", "source_image": "b.png"}])
  write_jsonl(tmp_path / "editscore.jsonl", [
      {"instruction": "make it night", "input_images": ["c.png"], "key": "k1"}])
  write_jsonl(tmp_path / "mine.jsonl", [{"uid": 7, "text": "sharpen", "src": "a.png"}])
  summary = build(config(tmp_path / "dance.jsonl"), tmp_path / "d")
  assert summary["splits"]["train"]["records"] == 2
  with_target = [r for r in all_records(tmp_path / "d", "train") if r["has_target"]]
  assert len(with_target) == 1 and with_target[0]["target_image"].shape == (48, 80, 3)
  assert summary["splits"]["train"]["with_target"] == 1
  build(config(tmp_path / "editscore.jsonl"), tmp_path / "e")
  assert [r["id"] for r in all_records(tmp_path / "e", "train")] == ["k1"]
  cfg = config(tmp_path / "mine.jsonl", format="fields")
  cfg.data.fields.instruction, cfg.data.fields.source_image = "text", "src"
  cfg.data.fields.id = "uid"
  build(cfg, tmp_path / "f")
  (record,) = all_records(tmp_path / "f", "train")
  assert (record["id"], record["instruction"]) == ("7", "sharpen")
  with pytest.raises(DatasetError, match=r"mine.jsonl:1: cannot tell the format.*'src', "
                     r"'text', 'uid'.*data.format='fields'"):
    edit_job.make_plan(config(tmp_path / "mine.jsonl"))


def bad_dataset(tmp_path):
  write_png(str(tmp_path / "ok.png"), (64, 64), 0)
  write_png(str(tmp_path / "ok2.png"), (64, 64), 1)
  write_png(str(tmp_path / "wide.png"), (64, 128), 2)
  (tmp_path / "garbage.png").write_bytes(b"not a png at all")
  good = Image.open(tmp_path / "ok2.png")
  good.save(tmp_path / "truncated.png")
  data = (tmp_path / "truncated.png").read_bytes()
  (tmp_path / "truncated.png").write_bytes(data[:len(data) // 2])  # header fine, pixels cut
  write_jsonl(tmp_path / "rows.jsonl", [
      {"instruction": "fine", "source_image": "ok.png"},
      {"instruction": "   ", "source_image": "ok.png"},
      {"instruction": "missing", "source_image": "nowhere.png"},
      {"instruction": "garbage", "source_image": "garbage.png"},
      "{not json",
      {"instruction": "two", "input_images": ["ok.png"], "source_image": ["ok.png", "ok2.png"]},
      {"instruction": "frame", "source_image": "ok.png", "target_image": "wide.png"},
      {"instruction": "fine", "source_image": "ok.png"},
      {"instruction": "cut", "source_image": "truncated.png"},
      {"instruction": "also fine", "source_image": "ok2.png"},
  ])
  return tmp_path / "rows.jsonl"


EXPECTED_BAD = {
    2: "instruction .* is empty",
    3: "nowhere.png does not exist",
    4: "garbage.png is not a readable image",
    5: "not valid JSON",
    6: "lists 2 images; jaxedit edits one source image",
    7: "target image is 128x64 but the source is 64x64",
    8: "the same source image and instruction as another row \\(first at .*rows.jsonl:1\\)",
    9: "cannot be decoded",
}


def test_bad_rows_are_named_or_skipped_and_listed(tmp_path):
  path = bad_dataset(tmp_path)
  with pytest.raises(DatasetError, match=r"rows.jsonl:2: .*empty.*\(and 6 more bad rows\).*"
                     "on_bad_row=skip"):
    edit_job.make_plan(config(path))
  # the decoding failure is found while writing; with error it names the row
  cfg = config(path, on_bad_row="skip")
  plan, bad = edit_job.make_plan(cfg)
  with pytest.raises(DatasetError, match=r"rows.jsonl:9: an image cannot be decoded"):
    edit_job.write_shards(str(tmp_path / "x"), plan, 0, 1, "error", 1)
  summary = build(cfg, tmp_path / "out")
  reasons = {b["line"]: b["reason"] for b in summary["skipped"]}
  assert sorted(reasons) == sorted(EXPECTED_BAD)
  for line, pattern in EXPECTED_BAD.items():
    assert __import__("re").search(pattern, reasons[line]), (line, reasons[line])
  assert summary["skipped_rows"] == 8 and summary["splits"]["train"]["records"] == 2
  manifest = edit_records.read_manifest(str(tmp_path / "out"))
  assert len(manifest["skipped"]) == 8
  assert "skipped 8 bad rows" in edit_job.format_summary(summary)


def test_duplicate_ids_across_splits_and_config_errors(tmp_path):
  write_png(str(tmp_path / "a.png"), (64, 64), 0)
  write_png(str(tmp_path / "b.png"), (64, 64), 1)
  write_jsonl(tmp_path / "train.jsonl", [{"id": "x", "prompt": "p", "image": "a.png"}])
  write_jsonl(tmp_path / "test.jsonl", [{"id": "x", "prompt": "q", "image": "b.png"}])
  with pytest.raises(DatasetError, match=r"test.jsonl:1: duplicate id 'x' \(first at "
                     r".*train.jsonl:1\)"):
    edit_job.make_plan(config(tmp_path / "train.jsonl", test=str(tmp_path / "test.jsonl")))
  with pytest.raises(ConfigError, match="data.train: .*nope.jsonl does not exist"):
    edit_job.make_plan(config(tmp_path / "nope.jsonl"))
  with pytest.raises(DatasetError, match=r"data.buckets: \(60, 64\) must be .*multiples of 16"):
    edit_job.make_plan(config(tmp_path / "train.jsonl", buckets=((60, 64),)))
  with pytest.raises(DatasetError, match="data.on_bad_row must be one of"):
    edit_job.make_plan(config(tmp_path / "train.jsonl", on_bad_row="ignore"))
  with pytest.raises(DatasetError, match="data.fields has unknown roles"):
    edit_job.make_plan(config(tmp_path / "train.jsonl", fields={"instructions": "p"}))


def test_nearest_bucket_is_log_symmetric():
  buckets = [(64, 64), (32, 64), (64, 32)]
  assert edit_rows.nearest_bucket((100, 100), buckets) == 0
  assert edit_rows.nearest_bucket((50, 200), buckets) == 1
  assert edit_rows.nearest_bucket((200, 50), buckets) == 2
  # sqrt(2):1 is as far from 1:1 as from 2:1 on a log scale: the earlier bucket wins
  assert edit_rows.nearest_bucket((1000, 1414), buckets) == 0
  assert edit_rows.nearest_bucket((1000, 1415), buckets) == 1


def test_batches_come_from_one_bucket_and_split_over_processes(edit_r1, tmp_path):
  build(config(edit_r1 / "train_metadata.jsonl"), tmp_path / "out")
  records = edit_records.EditRecords(str(tmp_path / "out"))
  fields = ("id", "source_image")
  one = iter(edit_records.train_batches(records, "train", 2, seed=3, process_index=0,
                                        process_count=1, fields=fields))
  two = [iter(edit_records.train_batches(records, "train", 1, seed=3, process_index=p,
                                         process_count=2, fields=fields)) for p in range(2)]
  buckets = set()
  for _ in range(12):
    whole = next(one)
    halves = [next(it) for it in two]
    assert whole["source_image"].shape[0] == 2
    buckets.add(whole["source_image"].shape[1:3])
    np.testing.assert_array_equal(np.concatenate([h["id"] for h in halves]), whole["id"])
    np.testing.assert_array_equal(
        np.concatenate([h["source_image"] for h in halves]), whole["source_image"])
  assert len(buckets) == 3  # every bucket gets turns
  # resumable: the state after 5 batches continues the same stream
  it = iter(edit_records.train_batches(records, "train", 2, seed=3, process_index=0,
                                       process_count=1, fields=fields))
  for _ in range(5):
    next(it)
  state = it.get_state()
  expected = [next(it)["id"] for _ in range(3)]
  resumed = iter(edit_records.train_batches(records, "train", 2, seed=3, process_index=0,
                                            process_count=1, fields=fields))
  resumed.set_state(state)
  for want in expected:
    np.testing.assert_array_equal(next(resumed)["id"], want)
  # evaluation: every test record once, in order, batches from one bucket each
  ids = [i for b in edit_records.fixed_batches(records, "test", 8, fields=("id",))
         for i in b["id"]]
  assert sorted(ids) == ["test_metadata.jsonl:1", "test_metadata.jsonl:2"]


def test_resume_rewrites_only_unfinished_shards_and_refuses_other_inputs(edit_r1, tmp_path):
  root = str(tmp_path / "out")
  cfg = config(edit_r1 / "train_metadata.jsonl")
  build(cfg, root)
  plan, _ = edit_job.make_plan(cfg)
  paths = [edit_records.shard_path(root, s["split"], s["bucket"], s["index"])
           for s in plan["shards"]]
  stamps = {p: os.stat(p).st_mtime_ns for p in paths}
  content = {p: open(p, "rb").read() for p in paths}
  os.remove(paths[1] + ".json")  # as if killed after the shard, before its manifest
  os.remove(paths[2])
  written = edit_job.write_shards(root, plan, 0, 1, "error", 2)
  assert written == len(plan["shards"][1]["rows"]) + len(plan["shards"][2]["rows"])
  for i, p in enumerate(paths):
    assert open(p, "rb").read() == content[p]
    assert (os.stat(p).st_mtime_ns == stamps[p]) == (i not in (1, 2))
  # shards written as process 0 and 1 of 2 are those written by one process
  root2 = str(tmp_path / "two")
  for p in range(2):
    edit_job.write_shards(root2, plan, p, 2, "error", 2)
  for path in paths:
    assert open(path.replace(root, root2), "rb").read() == content[path]
  # a changed input is refused, not mixed in
  edit_job.write_json(os.path.join(root, edit_job.PLAN), plan)
  with open(edit_r1 / "train_metadata.jsonl", "a") as f:
    f.write(json.dumps({"prompt": "one more", "image": "images/0.png"}) + "\n")
  new_plan, _ = edit_job.make_plan(cfg)
  with pytest.raises(ConfigError, match="holds records built from other inputs"):
    edit_job._check_plan(root, new_plan)


def test_corrupt_records_are_named(edit_r1, tmp_path):
  root = tmp_path / "out"
  build(config(edit_r1 / "train_metadata.jsonl"), root)
  records = edit_records.EditRecords(str(root))
  source = records.buckets("train")[0]
  path = edit_records.shard_path(str(root), "train", source.bucket, 0)
  os.remove(path)
  with pytest.raises(edit_records.CorruptRecordError, match="missing.*00000.array_record"):
    records.buckets("train")
  with pytest.raises(FileNotFoundError, match="no edit records at"):
    edit_records.EditRecords(str(tmp_path / "nothing"))


def test_cli_builds_records(edit_r1, tmp_path, capsys):
  out = tmp_path / "cli"
  rc = cli.main(["data", "--config", "configs/edit_data.py", "--workdir", str(out),
                 f"--config.data.train={edit_r1 / 'train_metadata.jsonl'}",
                 "--config.data.buckets=((64, 64), (48, 80))"])
  assert rc == 0
  assert "== train: 6 records, 0 with target images" in capsys.readouterr().out
  assert os.path.exists(out / "contact_sheet_train.png")
  rc = cli.main(["data", "--config", "configs/edit_data.py", "--workdir", str(tmp_path / "no"),
                 f"--config.data.train={tmp_path / 'missing.jsonl'}"])
  assert rc == 2
  assert "data.train" in capsys.readouterr().err


def test_images_as_displayed_rotated_and_transparent(tmp_path):
  """A phone JPEG with EXIF orientation 6 is shown rotated (its bucket is the portrait one);
  a transparent PNG is laid over white."""
  pixels = np.zeros((48, 80, 3), np.uint8)
  pixels[:, :40] = (255, 0, 0)
  exif = Image.Exif()
  exif[0x0112] = 6  # rotate 90 degrees clockwise to display
  Image.fromarray(pixels).save(tmp_path / "phone.jpg", exif=exif, quality=95)
  assert edit_rows.image_size(str(tmp_path / "phone.jpg"), "source image") == (80, 48)
  shown = np.asarray(edit_rows.load_image(str(tmp_path / "phone.jpg")))
  assert shown.shape == (80, 48, 3)
  assert shown[:20, :, 0].mean() > 200 and shown[-20:, :, 0].mean() < 50  # red went up
  rgba = np.zeros((16, 16, 4), np.uint8)
  rgba[:8] = (0, 0, 255, 255)
  Image.fromarray(rgba).save(tmp_path / "clear.png")
  image = np.asarray(edit_rows.load_image(str(tmp_path / "clear.png")))
  np.testing.assert_array_equal(image[12, 3], (255, 255, 255))
  np.testing.assert_array_equal(image[3, 3], (0, 0, 255))


def test_cached_latents_equal_diffusers_vae(edit_r1, tmp_path):
  """With a pipeline folder the records hold the VAE's normalised posterior means, computed
  on this process's 8 devices in padded batches, equal to diffusers' on the same images."""
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  from jaxedit.models.vae import VAEConfig, diffusers_config

  shift, scale = 0.2, 1.7
  cfg = VAEConfig(latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
                  norm_num_groups=4, shift_factor=shift, scaling_factor=scale)
  torch.manual_seed(0)
  vae = diffusers.AutoencoderKL(**diffusers_config(cfg)).eval()
  with torch.no_grad():
    for p in vae.parameters():
      p.copy_(torch.randn_like(p) * 0.2)
  vae.save_pretrained(str(tmp_path / "pipeline" / "vae"), safe_serialization=True)
  c = config(edit_r1 / "train_metadata.jsonl")
  c.encode.pipeline, c.encode.text, c.encode.batch_size = str(tmp_path / "pipeline"), False, 3
  plan, bad = edit_job.make_plan(c)
  from jaxedit.data import edit_cache

  encoders = edit_cache.Encoders(c.encode, c.mesh)
  assert encoders.batch_size == 8  # rounded up to the 8 devices' batch axes
  edit_job.write_shards(str(tmp_path / "out"), plan, 0, 1, "error", 2, encoders)
  manifest = edit_job.finish(str(tmp_path / "out"), plan, bad, c, 0.0)
  assert manifest["splits"]["train"]["records"] == 6
  assert "source_latents" in edit_records.read_manifest(str(tmp_path / "out"))["fields"]
  for r in all_records(tmp_path / "out", "train"):
    x = torch.from_numpy(r["source_image"].astype(np.float32) / 127.5 - 1).permute(2, 0, 1)
    with torch.no_grad():
      mean = vae.encode(x[None]).latent_dist.mean[0].permute(1, 2, 0).numpy()
    h, w = r["source_image"].shape[:2]
    assert r["source_latents"].shape == (h // 2, w // 2, 4)
    np.testing.assert_allclose(r["source_latents"], (mean - shift) * scale, rtol=1e-4,
                               atol=1e-5)
  # the encoders' settings are part of the plan: other settings are other records
  c.encode.dtype = "bfloat16"
  assert edit_job.make_plan(c)[0]["fingerprint"] != plan["fingerprint"]


def test_two_processes_write_the_records_one_writes(tmp_path):
  """`jaxedit data` on 2 processes joined by jax.distributed (2 CPU devices each; process 0
  writes 2 of the 3 shards, process 1 one, each encoding on its own devices) writes the
  same bytes as 1 process of 2 devices: shards, their manifests, plan and dataset.json."""
  pytest.importorskip("torch")
  pytest.importorskip("diffusers")
  import tiny_flux
  from launch import local

  pipeline = tiny_flux.write_pipeline(str(tmp_path / "pipeline"))
  rows = tiny_flux.write_edit_r1(str(tmp_path / "r1"))  # 4 training rows, 2 test rows
  roots, logs = {}, {}
  for n in (2, 1):
    roots[n], logdir = tmp_path / f"records_{n}", tmp_path / f"logs_{n}"
    code = local.run(["data", "--config", "configs/edit_data.py:tiny", "--workdir",
                      str(roots[n]), f"--config.data.train={rows}",
                      "--config.data.records_per_shard=2",
                      f"--config.encode.pipeline={pipeline}",
                      "--config.encode.max_sequence_length=16",
                      "--config.report.contact_sheet_examples=0"],
                     num_processes=n, devices_per_process=2, logdir=str(logdir), timeout=300,
                     echo=False)
    logs[n] = [(logdir / f"process_{i}.log").read_text() for i in range(n)]
    assert code == 0, logs[n][0][-3000:]
  for i, log in enumerate(logs[2]):  # joined, each writing its own shards
    assert f"process {i} of 2 joined (2 local devices, 4 in all)" in log
    assert f"6 rows in 3 shards ({2 - i} for this process" in log
  files = sorted(str(p.relative_to(roots[1])) for p in roots[1].rglob("*") if p.is_file())
  assert sorted(str(p.relative_to(roots[2])) for p in roots[2].rglob("*")
                if p.is_file()) == files
  shards = [f for f in files if f.endswith(".array_record")]
  assert len(shards) == 3 and edit_records.read_manifest(str(roots[2]))["fields"][-4:] == [
      "source_latents", "target_latents", "context", "pooled"]
  for f in files:
    if f != edit_job.SUMMARY:  # it holds the job's seconds and folder
      assert (roots[2] / f).read_bytes() == (roots[1] / f).read_bytes(), f
  summaries = [json.loads((roots[n] / edit_job.SUMMARY).read_text()) for n in (2, 1)]
  assert summaries[0]["splits"] == summaries[1]["splits"]
