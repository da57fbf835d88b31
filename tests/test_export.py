"""`jaxedit export` to diffusers and transformers folders, and streamed loading back.

The runs exported here carry random weights everywhere (saved as a checkpoint of a tiny
run's workdir), so zero-initialised output layers cannot hide a mapping bug.
"""

import json
import os

import flax
import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from conftest import randomized_run, tiny_editor_config  # noqa: E402
from jaxedit import cli, export, flow, sharding, workdirs  # noqa: E402
from jaxedit.interop import (flux_diffusers, safetensors_io,  # noqa: E402
                             torch_names)
from jaxedit.models.planner import VisionPrefix  # noqa: E402
from jaxedit.trainers import editor_sft, planner_sft  # noqa: E402
from jaxedit import editing


@pytest.fixture(scope="module")
def random_editor(tiny_editor_dir, tmp_path_factory):
  return randomized_run(tiny_editor_dir, str(tmp_path_factory.mktemp("x") / "editor"),
                        editor_sft.make_setup)


@pytest.fixture(scope="module")
def random_planner(tiny_planner_dir, tmp_path_factory):
  # Larger weights than the editor's: at 0.2 a random LM repeats one token whatever it sees.
  return randomized_run(tiny_planner_dir, str(tmp_path_factory.mktemp("x") / "planner"),
                        planner_sft.make_setup, scale=1.0)


@pytest.fixture(scope="module")
def conditioned_planner(tiny_planner_dir, tmp_path_factory):
  # For logit parity: at scale 1.0 the attention of this 32-wide LM is nearly one-hot, and
  # float32 rounding differences between two correct implementations grow to ~2e-5 relative
  # at the last positions (seen on two different draws); at 0.5 they stay near 1e-6, and a
  # wrong weight mapping still moves the logits by O(1).
  return randomized_run(tiny_planner_dir, str(tmp_path_factory.mktemp("x") / "planner_05"),
                        planner_sft.make_setup, scale=0.5)


def host(tree):
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), flax.linen.unbox(tree))


def test_editor_export_round_trip_and_whole_edit(random_editor, small_dataset, tmp_path):
  from jaxedit.interop import torch_editor

  out = str(tmp_path / "diffusers")
  assert cli.main(["export", "--workdir", random_editor, "--to", "diffusers",
                   "--out", out, "--weights", "raw"]) == 0
  assert sorted(os.listdir(out)) == ["config.json", "diffusion_pytorch_model.safetensors",
                                     "jaxedit_editor.json", "text_encoder.safetensors",
                                     "tokenizer.json"]
  loaded = workdirs.load_editor(random_editor, batch_size=8, weights="raw")
  params = host(loaded.params)

  # JAX -> PyTorch -> JAX is the identity.
  with safetensors_io.SafetensorsFolder(out, "diffusion_pytorch_model.safetensors") as src:
    back = torch_names.load(flux_diffusers.LAYOUT, src, params["transformer"])
  jax.tree.map(np.testing.assert_array_equal, back, params["transformer"])

  # A whole edit sampled in PyTorch matches jaxedit's sampler from the same noise.
  editor = torch_editor.load(out)
  assert isinstance(editor.transformer, diffusers.FluxTransformer2DModel)
  _, world = small_dataset
  batch = editing.eval_batches(loaded.setup, "test", ("atomic",), 8, 8)[0][0]
  rng = jax.random.key(3)
  ours = np.asarray(loaded.sampler(loaded.params, sharding.global_batch(
      batch, loaded.setup.batch_sharding), rng))
  noise = np.asarray(jax.random.normal(rng, batch["source_image"].shape))
  instructions = [loaded.setup.tokenizer.decode([int(i) for i, m in zip(ids, mask) if m])
                  for ids, mask in zip(batch["ids"], batch["mask"])]
  theirs = torch_editor.sample(editor, batch["source_image"], instructions, noise)
  diff = np.abs(ours.astype(int) - theirs.astype(int))
  # Stated tolerance: float32 paths agree to ~1e-5, so a pixel differs by at most one level
  # (a value sitting on a rounding boundary), and almost none do.
  assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())
  assert ours.std() > 10  # random weights: the edit is far from flat, so the check bites


def test_editor_export_bfloat16_and_ema(random_editor, tmp_path):
  out = str(tmp_path / "bf16")
  manifest = export.export(random_editor, "diffusers", out, dtype="bfloat16", weights="ema")
  assert manifest["weights"] == "ema"
  model = diffusers.FluxTransformer2DModel.from_pretrained(out, torch_dtype=torch.bfloat16)
  ema = host(workdirs.load_editor(random_editor, batch_size=8,
                                   weights="ema").params)["transformer"]
  with safetensors_io.SafetensorsFolder(out, "diffusion_pytorch_model.safetensors") as src:
    assert src.read("proj_out.weight", (slice(None), slice(None))).dtype.name == "bfloat16"
    back = torch_names.load(flux_diffusers.LAYOUT, src, ema)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(ema)):
    np.testing.assert_allclose(a, b, rtol=2 ** -8, atol=0)  # bfloat16 rounding only
  weight = model.proj_out.weight.detach().float().numpy()
  np.testing.assert_allclose(weight, ema["proj_out"]["kernel"].T, rtol=2 ** -8)


def test_planner_export_matches_transformers(conditioned_planner, tmp_path):
  out = str(tmp_path / "transformers")
  export.export(conditioned_planner, "transformers", out)
  loaded = workdirs.load_planner(conditioned_planner, batch_size=8)
  setup = loaded.setup
  model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  tok = transformers.AutoTokenizer.from_pretrained(out)
  assert type(model).__name__ == "Qwen2ForCausalLM"
  meta = json.load(open(os.path.join(out, export.PLANNER_META)))

  instruction = "make every red shape blue"
  ids, valid = setup.prompt_ids([instruction], [None])
  text = meta["prompt_template"].replace("{instruction}", instruction)
  # The template holds the whole prompt text, BOS included: tokenized as it is.
  assert text.startswith(tok.bos_token)
  assert tok(text, add_special_tokens=False)["input_ids"] == [int(i) for i in ids[0][valid[0]]]

  rng = np.random.default_rng(1)
  image = rng.integers(0, 256, (1, setup.world.image_size, setup.world.image_size, 3), np.uint8)
  row = jax.numpy.asarray(ids[:, valid[0]])
  all_valid = jax.numpy.ones((1, setup.model.cfg.prefix_len + row.shape[1]), bool)
  ours = setup.model.apply({"params": loaded.params}, row, all_valid,
                           image=flow.to_model_space(image))
  # transformers gets the image through inputs_embeds: jaxedit's vision prefix + embeddings.
  cfg = setup.model.cfg
  prefix = VisionPrefix(cfg.vision, cfg.lm).apply({"params": loaded.params["vision"]},
                                                  flow.to_model_space(image))
  with torch.no_grad():
    embeds = model.get_input_embeddings()(torch.tensor(np.asarray(row)).long())
    embeds = torch.cat([torch.tensor(np.asarray(prefix)), embeds], 1)
    ref = model(inputs_embeds=embeds).logits.numpy()
  ours = np.asarray(ours)
  assert ours.shape == ref.shape
  assert np.abs(ours - ref).max() / np.abs(ref).max() < 1e-5


def test_streamed_load_reads_only_local_shards(random_editor, tmp_path):
  """Loading onto an (fsdp 8) sharding reads each kernel in 8 slices and gives the same
  params as an in-memory load; several weight shards with an index load the same."""
  out = str(tmp_path / "sharded")
  params = host(workdirs.load_editor(random_editor, batch_size=8).params)["transformer"]
  safetensors_io.write(out, "w.safetensors", flux_diffusers.to_diffusers(params), "float32",
                       max_shard_bytes=20_000)
  assert os.path.exists(os.path.join(out, "w.safetensors.index.json"))
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("fsdp",))

  def last_axis_split(x):  # over the 8 devices where it divides, else replicated
    axes = [None] * (x.ndim - 1) + ["fsdp" if x.shape[-1] % 8 == 0 else None]
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*axes))

  shardings = jax.tree.map(last_axis_split, params)

  class Counting(safetensors_io.SafetensorsFolder):
    reads = []

    def read(self, name, index):
      block = super().read(name, index)
      self.reads.append((name, block.size))
      return block

  with Counting(out, "w.safetensors") as src:
    loaded = torch_names.load(flux_diffusers.LAYOUT, src, params, shardings=shardings)
    sizes = {name: src.shape(name) for name, _ in src.reads}
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), loaded, params)
  leaf = loaded["x_embedder"]["kernel"]
  assert leaf.sharding == shardings["x_embedder"]["kernel"]
  blocks = [size for name, size in Counting.reads if name == "x_embedder.weight"]
  assert len(blocks) == 8 and all(s * 8 == np.prod(sizes["x_embedder.weight"]) for s in blocks)


def test_loading_bad_folders_names_the_problem(random_editor, tmp_path):
  out = str(tmp_path / "good")
  export.export(random_editor, "diffusers", out)
  params = host(workdirs.load_editor(random_editor, batch_size=8).params)["transformer"]
  state = flux_diffusers.to_diffusers(params)
  del state["x_embedder.weight"]
  state["extra.weight"] = np.zeros(3, np.float32)
  state["proj_out.bias"] = np.zeros(5, np.float32)
  bad = str(tmp_path / "bad")
  safetensors_io.write(bad, "w.safetensors", state, "float32")
  with safetensors_io.SafetensorsFolder(bad, "w.safetensors") as src:
    with pytest.raises(torch_names.MappingError) as e:
      torch_names.load(flux_diffusers.LAYOUT, src, params)
  msg = str(e.value)
  assert "missing tensors: x_embedder.weight" in msg
  assert "unexpected tensors: extra.weight" in msg
  assert "proj_out.bias has shape (5,), expected" in msg

  pickled = tmp_path / "pickled"
  pickled.mkdir()
  (pickled / "pytorch_model.bin").write_bytes(b"not read")
  with pytest.raises(torch_names.MappingError, match="pickles and are never read"):
    safetensors_io.SafetensorsFolder(str(pickled), "model.safetensors")


def test_export_errors(random_editor, random_planner, tmp_path, capsys):
  assert cli.main(["export", "--workdir", random_planner, "--to", "diffusers",
                   "--out", str(tmp_path / "o")]) == 2
  assert "expected an editor workdir" in capsys.readouterr().err
  assert cli.main(["export", "--workdir", str(tmp_path / "nothing"), "--to", "transformers",
                   "--out", str(tmp_path / "o")]) == 2
  assert "no checkpoint" in capsys.readouterr().err


def test_init_from_exported_folders(random_editor, random_planner, small_data_dir, tmp_path):
  """`init_from` a diffusers / transformers folder streams its weights onto the run's
  8-device shardings: an editor trained from the export at learning rate 0 holds exactly the
  exported weights; settings no tensor shape shows are checked against config.json."""
  from jaxedit.interop import pretrained

  folder = str(tmp_path / "diffusers")
  export.export(random_editor, "diffusers", folder, weights="raw")
  config = tiny_editor_config(small_data_dir, num_steps=1, lr=0.0, checkpoint_every=0)
  config.model.text_max_len = 64
  config.init_from = folder
  workdir = str(tmp_path / "from_export")
  editor_sft.train(config, workdir)
  want = host(workdirs.load_editor(random_editor, batch_size=8, weights="raw").params)
  got = host(workdirs.load_editor(workdir, batch_size=8, weights="raw").params)
  jax.tree.map(np.testing.assert_array_equal, got, want)

  meta = json.load(open(os.path.join(folder, "config.json")))
  meta["axes_dims_rope"] = [8, 4, 4]
  json.dump(meta, open(os.path.join(folder, "config.json"), "w"))
  setup = editor_sft.make_setup(config, str(tmp_path / "other"))
  with pytest.raises(cli.ConfigError, match=r"axes_dims_rope = \[8, 4, 4\] there"):
    pretrained.load_editor(folder, setup.abstract_state.params, setup.model.cfg)

  lm_folder = str(tmp_path / "transformers")
  export.export(random_planner, "transformers", lm_folder, weights="raw")
  loaded = workdirs.load_planner(random_planner, batch_size=8, weights="raw")
  abstract = loaded.setup.abstract_state.params
  params = pretrained.load_planner(lm_folder, abstract, loaded.setup.model.cfg)
  assert params["lm"]["layers_0"]["self_attn"]["q_proj"]["kernel"].sharding == (
      abstract["lm"]["layers_0"]["self_attn"]["q_proj"]["kernel"].sharding)
  assert set(params) == {"lm", "vision"}  # not the SFT-only cell head, which keeps its init
  jax.tree.map(np.testing.assert_array_equal, host(params),
               host({k: loaded.params[k] for k in params}))
  with pytest.raises(cli.ConfigError, match="is not a transformers folder"):
    pretrained.load_planner(folder, abstract, loaded.setup.model.cfg)


def test_exported_planner_plans_like_jaxedit(random_planner, tmp_path):
  """Greedy plans from transformers `generate` (vision prefix as inputs_embeds) are the
  plans jaxedit's KV-cache sampler writes."""
  from jaxedit.interop import torch_planner

  out = str(tmp_path / "planner")
  export.export(random_planner, "transformers", out)
  ours = workdirs.load_planner(random_planner, batch_size=8)
  theirs = torch_planner.load(out)
  rng = np.random.default_rng(2)
  size = ours.setup.world.image_size
  images = rng.integers(0, 256, (3, size, size, 3), np.uint8)
  instructions = ["make every red shape blue", "remove the small circle", "swap the squares"]
  want = ours(images, instructions)
  got = torch_planner.generate(theirs, images, instructions)
  assert got == want
  assert len(set(want)) == 3  # each prompt and image gets its own plan: the check bites
