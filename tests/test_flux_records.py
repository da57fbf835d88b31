"""Editors trained on edit records with FLUX conditioning, on a tiny FLUX.1-Kontext pipeline
folder written by diffusers / transformers (tests/tiny_flux.py): records with cached latents
and embeddings, SFT (cached against encoding each step), GRPO from the SFT run with a judge,
and the export loading into diffusers' FluxKontextPipeline."""

import http.server
import json
import os
import threading

import jax
import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import tiny_flux  # noqa: E402
from configs import edit_data, flux_kontext_grpo, flux_kontext_opd, flux_kontext_sft  # noqa: E402
from jaxedit import flux_editing, sharding  # noqa: E402
from jaxedit.config import ConfigError  # noqa: E402
from jaxedit.data import edit_job, edit_records  # noqa: E402
from jaxedit.trainers import editor_grpo, editor_opd, editor_sft  # noqa: E402

BUCKETS = ((64, 64), (48, 80), (80, 48))


def build_records(jsonl, root, pipeline=""):
  c = edit_data.get_config("tiny").unlock()
  c.data.train, c.data.buckets, c.data.test_holdout = jsonl, BUCKETS, 2
  c.report.contact_sheet_examples = 0
  c.encode.pipeline, c.encode.max_sequence_length = pipeline, 16
  plan, bad = edit_job.make_plan(c)
  from jaxedit.data import edit_cache

  encoders = edit_cache.Encoders(c.encode, c.mesh) if pipeline else None
  edit_job.write_shards(root, plan, 0, 1, "error", 2, encoders)
  edit_job.finish(root, plan, bad, c, 0.0)
  return root


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  root = tmp_path_factory.mktemp("flux_records")
  pipeline = tiny_flux.write_pipeline(str(root / "pipeline"))
  pairs = tiny_flux.write_pairs(str(root / "pairs"))
  return {"pipeline": pipeline, "pairs": pairs,
          "cached": build_records(pairs, str(root / "cached"), pipeline),
          "plain": build_records(pairs, str(root / "plain")), "root": root}


def sft_config(world, records, **train):
  c = flux_kontext_sft.get_config("tiny").unlock()
  c.init_from, c.data.records = world["pipeline"], records
  c.model.text_max_len = 16
  for k, v in train.items():
    c.train[k] = v
  return c


def test_architecture_comes_from_the_pipeline(world):
  setup = flux_editing.make_setup(sft_config(world, world["cached"]), "")
  flux = setup.model.cfg.flux
  assert (flux.num_layers, flux.num_single_layers, flux.num_attention_heads) == (1, 1, 2)
  assert flux.guidance_embeds and setup.guidance == 2.5
  assert (setup.model.cfg.channels, setup.model.cfg.patch_size) == (4, 2)
  assert (flux.joint_attention_dim, flux.pooled_projection_dim) == (32, 32)
  assert setup.cached


def test_step_on_cached_inputs_equals_the_step_that_encodes_them(world):
  cached = flux_editing.make_setup(sft_config(world, world["cached"]), "")
  plain = flux_editing.make_setup(sft_config(world, world["plain"]), "")
  assert not plain.cached
  batch = lambda setup: next(iter(edit_records.train_batches(
      setup.records, "train", 8, seed=0, process_index=0, process_count=1)))
  a, b = cached.model_inputs(batch(cached)), plain.model_inputs(batch(plain))
  for k in flux_editing.CACHED:
    np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)
  states, losses = [], []
  for setup, inputs in ((cached, a), (plain, b)):
    state = editor_sft.start_state(setup)
    state, metrics = editor_sft.make_records_step(setup)(
        state, sharding.global_batch(inputs, setup.batch_sharding))
    states.append(jax.device_get(state.params))
    losses.append(float(metrics["loss"]))
  np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6), *states)


def test_sft_then_grpo_with_a_judge_then_opd_then_export(world, tmp_path):
  sft = str(tmp_path / "sft")
  out = editor_sft.train(sft_config(world, world["cached"]), sft)
  assert out["step"] == 6 and np.isfinite(out["final_loss"])
  assert os.path.exists(os.path.join(sft, "samples", "step_0000006.png"))
  summary = editor_sft.run_eval(sft_config(world, world["cached"]), sft)
  assert summary["examples"] == 2 and np.isfinite(summary["val_flow_loss"])

  server, url = judge_server()
  try:
    c = flux_kontext_grpo.get_config("tiny").unlock()
    c.init_from, c.data.records = sft, world["cached"]
    c.rewards.judge.weight, c.rewards.remote.weight, c.rewards.remote.url = 0.0, 1.0, url
    rl = str(tmp_path / "rl")
    result = editor_grpo.train(c, rl)
    assert result["step"] == 2
    lines = [json.loads(line) for line in open(os.path.join(rl, "metrics.jsonl"))]
    assert all(np.isfinite(line["reward/mean"]) for line in lines if "reward/mean" in line)
    assert server.requests  # the judge saw the rollouts
    ev = editor_grpo.run_eval(c, rl)
    assert "reward" in ev and "before" in ev

    # OPD: the SFT and GRPO runs distilled into a student, in turn, along its rollouts.
    o = flux_kontext_opd.get_config("tiny").unlock()
    o.init_from, o.data.records = sft, world["cached"]
    o.opd.teachers.first, o.opd.teachers.second = sft, rl
    o.rewards.judge.weight, o.rewards.remote.weight, o.rewards.remote.url = 0.0, 1.0, url
    student = str(tmp_path / "opd")
    assert editor_opd.train(o, student)["step"] == 2
    lines = [json.loads(line) for line in open(os.path.join(student, "metrics.jsonl"))]
    kls = [line["train/kl"] for line in lines if "train/kl" in line]
    assert kls and all(np.isfinite(k) and k >= 0 for k in kls)
    assert any(line.get("train/kl_first", 0) > 0 for line in lines)
    assert any(line.get("train/kl_second", 0) > 0 for line in lines)
    assert "reward" in editor_opd.run_eval(o, student)
  finally:
    server.shutdown()

  from jaxedit import export

  folder = str(tmp_path / "export")
  export.export(rl, "diffusers", folder)
  transformer = diffusers.FluxTransformer2DModel.from_pretrained(folder)
  pipe = diffusers.FluxKontextPipeline.from_pretrained(world["pipeline"],
                                                      transformer=transformer)
  image = Image.open(json.loads(open(world["pairs"]).readline())["source_image"])
  edited = pipe(image=image, prompt="invert the red", num_inference_steps=2, height=64,
                width=64, max_area=64 * 64, _auto_resize=False, max_sequence_length=16,
                output_type="np").images
  assert edited.shape == (1, 64, 64, 3) and np.isfinite(edited).all()


def judge_server():
  """A JSON-protocol reward server: the mean brightness of each edit."""
  import base64
  import io

  class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
      body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
      self.server.requests.append(len(body["images"]))
      rewards = [float(np.asarray(Image.open(io.BytesIO(base64.b64decode(im)))).mean() / 255)
                 for im in body["images"]]
      data = json.dumps({"rewards": rewards}).encode()
      self.send_response(200)
      self.send_header("Content-Length", str(len(data)))
      self.end_headers()
      self.wfile.write(data)

    def log_message(self, *args):
      pass

  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
  server.requests = []
  threading.Thread(target=server.serve_forever, daemon=True).start()
  return server, f"http://127.0.0.1:{server.server_address[1]}/score"


def test_bad_setups_are_named(world, tmp_path):
  with pytest.raises(ConfigError, match="data.records: no edit records at"):
    flux_editing.make_setup(sft_config(world, str(tmp_path)), "")
  c = sft_config(world, world["cached"])
  c.init_from = str(tmp_path)
  with pytest.raises(ConfigError, match="needs the pipeline folder"):
    flux_editing.make_setup(c, "")
  rl_only = build_records(tiny_flux.write_edit_r1(str(tmp_path / "r1"), num_test=0),
                          str(tmp_path / "r1_records"), world["pipeline"])
  with pytest.raises(ConfigError, match="only 0 of the 4 training records .* have one"):
    editor_sft.train(sft_config(world, rl_only), str(tmp_path / "sft"))
  c = flux_kontext_grpo.get_config("tiny").unlock()
  c.init_from, c.data.records = world["pipeline"], world["cached"]
  c.rewards.checklist.weight = 1.0
  with pytest.raises(ConfigError, match="reward 'checklist' reads the shapes world"):
    editor_grpo.train(c, str(tmp_path / "rl"))


def test_benchmark_records_are_scored_per_task_type(world, tmp_path):
  """A GEdit-Bench-style file alone (key, task_type, instruction, input_image) makes an
  evaluation set; evaluation with a judge reports the reward per task type and shows the
  examples of every type in its grid."""
  from jaxedit import rewards as rewards_lib

  images = tiny_flux.write_images(str(tmp_path / "images"))
  types = ["color_alter", "subject-add", "color_alter", "style_change", "subject-add",
           "color_alter"]
  bench = str(tmp_path / "gedit.jsonl")
  with open(bench, "w") as f:
    f.writelines(json.dumps({"key": f"k{i}", "task_type": t, "instruction": f"edit {i}",
                             "instruction_language": "en", "input_image": path}) + "\n"
                 for i, (t, path) in enumerate(zip(types, images)))
  c = edit_data.get_config("tiny").unlock()
  c.data.test, c.data.buckets, c.report.contact_sheet_examples = bench, BUCKETS, 0
  c.encode.pipeline, c.encode.max_sequence_length = world["pipeline"], 16
  plan, bad = edit_job.make_plan(c)
  assert not bad and {s["split"] for s in plan["shards"]} == {"test"}
  from jaxedit.data import edit_cache

  root = str(tmp_path / "bench")
  edit_job.write_shards(root, plan, 0, 1, "error", 2, edit_cache.Encoders(c.encode, c.mesh))
  edit_job.finish(root, plan, bad, c, 0.0)

  setup = flux_editing.make_setup(sft_config(world, root), "")
  assert setup.records.splits == ["test"]
  server, url = judge_server()
  try:
    reward_fn = rewards_lib.Rewards({"remote": {"weight": 1.0, "url": url}}, None)
    batches = flux_editing.eval_batches(setup, "test", 0, 8)
    params = editor_sft.start_state(setup).params
    summary, grid = flux_editing.evaluate(
        setup, params, batches, flux_editing.make_sampler(setup, 2), seed=0,
        reward_fn=reward_fn)
  finally:
    server.shutdown()
  assert summary["examples"] == 6 and summary["masked"] == 0
  assert summary["examples_by_task_type"] == {"color_alter": 3, "style_change": 1,
                                              "subject-add": 2}
  by_type = summary["reward_by_task_type"]
  assert all(0 <= v <= 1 for v in by_type.values())
  weighted = sum(by_type[t] * n for t, n in summary["examples_by_task_type"].items()) / 6
  np.testing.assert_allclose(weighted, summary["reward"], rtol=1e-5)
  sources, edits, targets, texts, verdicts = grid
  assert len(sources) == 6 and targets is None and verdicts is None  # no targets to show
  assert sorted({t.split("]")[0][1:] for t in texts}) == sorted(set(types))


def test_sampling_times_follow_the_pipelines_scheduler_per_bucket(world):
  """sample.shift = 0 (edit records' default): each bucket's times are those diffusers'
  FluxKontextPipeline sets (calculate_shift of the token count, the scheduler's exponential
  time shift), for two token counts; a fixed shift overrides them."""
  from diffusers.pipelines.flux.pipeline_flux import calculate_shift

  setup = flux_editing.make_setup(sft_config(world, world["cached"]), "")
  assert setup.config.sample.shift == 0.0
  scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(
      os.path.join(world["pipeline"], "scheduler"))
  c, n = scheduler.config, 6
  for h, w in ((16, 16), (48, 80)):  # latents (the VAE's 4x): 64 and 240 tokens of 2x2
    tokens = (h // 2) * (w // 2)
    mu = calculate_shift(tokens, c.base_image_seq_len, c.max_image_seq_len, c.base_shift,
                         c.max_shift)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), mu=mu)
    np.testing.assert_allclose(setup.sigmas(n, (1, h, w, 4)), scheduler.sigmas.numpy(),
                               rtol=1e-6, atol=1e-7)
  fixed = sft_config(world, world["cached"])
  fixed.sample.shift = 3.0
  np.testing.assert_allclose(flux_editing.make_setup(fixed, "").sigmas(n, (1, 16, 16, 4)),
                             3 * np.linspace(1, 0, n + 1) / (1 + 2 * np.linspace(1, 0, n + 1)),
                             rtol=1e-6)


def test_lora_sft_trains_adapters_over_the_frozen_pipeline_and_exports_merged(world,
                                                                              tmp_path):
  from jaxedit import checkpoint, export, lora
  from jaxedit.interop import pretrained

  config = sft_config(world, world["cached"], num_steps=2, eval_every=2, sample_every=2,
                      checkpoint_every=2)
  config.model.lora_rank, config.model.lora_alpha = 4, 8.0
  workdir = str(tmp_path / "sft_lora")
  editor_sft.train(config, workdir)
  setup = flux_editing.make_setup(config, workdir)
  step, state = checkpoint.restore_latest(workdir, 2, setup.abstract_state)
  state = jax.device_get(state)
  assert step == 2 and state.base is not None
  names = [tuple(getattr(p, "key", p) for p in path)
           for path, _ in jax.tree_util.tree_flatten_with_path(state.params)[0]]
  assert names and all(n[-1] in ("lora_a", "lora_b") for n in names)  # adapters only
  pipeline = jax.device_get(pretrained.load_editor(world["pipeline"], setup.abstract_state.base,
                                                   setup.model.cfg))
  jax.tree.map(np.testing.assert_array_equal, state.base, pipeline)  # frozen
  b = [x for p, x in jax.tree_util.tree_flatten_with_path(state.params)[0]
       if getattr(p[-1], "key", None) == "lora_b"]
  assert max(float(np.abs(x).max()) for x in b) > 0  # B starts at 0: the adapters trained
  folder = str(tmp_path / "export")
  export.export(workdir, "diffusers", folder, weights="ema")
  from jaxedit.interop import flux_diffusers

  merged = jax.tree.map(np.asarray, lora.merge(lora.join(state.ema_params, state.base), 4, 8.0))
  want = flux_diffusers.to_diffusers(merged["transformer"])
  got = diffusers.FluxTransformer2DModel.from_pretrained(folder).state_dict()
  assert set(want) == set(got)
  for name, value in want.items():
    np.testing.assert_allclose(got[name].numpy(), value, rtol=1e-6, atol=1e-7, err_msg=name)
  moved = [n for n in want if not np.array_equal(want[n], flux_diffusers.to_diffusers(
      jax.tree.map(np.asarray, state.base["transformer"]))[n])]
  assert moved  # the merged adapters changed some kernels
