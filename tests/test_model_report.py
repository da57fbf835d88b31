"""Real-size configs, sized without allocating: parameter counts equal the published models
(and the PyTorch classes built on the meta device), and the per-device bytes the report
computes on an abstract mesh equal those of a real sharded state."""

import json

import jax
import numpy as np
import pytest

from conftest import tiny_editor_config
from jaxedit import model_report
from jaxedit.config import load_file
from jaxedit.interop import flux_diffusers, lm_transformers
from jaxedit.models import vae
from jaxedit.models.editor import editor_config
from jaxedit.models.planner import planner_config
from jaxedit.trainers import editor_sft

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

FLUX_DEV_TRANSFORMER = 11_901_408_320  # FLUX.1-dev / FLUX.1-Kontext-dev transformer
QWEN2_5_7B = 7_615_616_512


def meta_count(build) -> int:
  with torch.device("meta"):
    return sum(p.numel() for p in build().parameters())


def test_flux_kontext_config_is_flux_dev_sized(tmp_path, capsys):
  config = load_file("configs/flux_kontext_grpo.py")
  rep = model_report.report(config)
  cfg = editor_config(config.model, config.world.image_size, config.tokenizer.vocab_size)
  torch_count = meta_count(lambda: diffusers.FluxTransformer2DModel(
      **flux_diffusers.diffusers_config(cfg.flux)))
  assert rep["params"] == rep["params_by_module"]["transformer"] == torch_count
  assert rep["params"] == FLUX_DEV_TRANSFORMER
  assert cfg.flux.in_channels == 64 and cfg.image_size == 64  # 16 latents x 2x2, 512 / 8
  vae_cfg = model_report.vae_config(config.model)
  assert rep["vae_params"] == meta_count(lambda: diffusers.AutoencoderKL(
      **vae.diffusers_config(vae_cfg)))
  assert rep["trained_params"] == rep["adapter_params"] > 0  # LoRA: only adapters train
  b = rep["bytes_per_device"]
  assert 0 < b["params"] < b["base"] < 4 * FLUX_DEV_TRANSFORMER / 32  # sharded over fsdp

  out = tmp_path / "report.json"
  assert model_report.main(["--config", "configs/flux_kontext_grpo.py", "--json",
                            str(out)]) == 0
  assert json.loads(out.read_text())["params"] == FLUX_DEV_TRANSFORMER
  assert "11,901,408,320 parameters" in capsys.readouterr().out


def test_qwen2_5_planner_config_is_qwen2_5_7b_sized():
  config = load_file("configs/qwen2_5_planner_grpo.py")
  rep = model_report.report(config)
  lm = planner_config(config.model, config.world).lm
  hf = transformers.Qwen2Config(**lm_transformers.hf_config(lm))
  assert rep["params_by_module"]["lm"] == meta_count(
      lambda: transformers.Qwen2ForCausalLM(hf)) == QWEN2_5_7B
  b = rep["bytes_per_device"]
  assert b["opt_state"] == pytest.approx(2 * b["params"], rel=1e-3)  # Adam mu, nu (fp32)


def test_report_bytes_equal_a_real_sharded_state(small_data_dir, tmp_path):
  config = tiny_editor_config(small_data_dir)
  config.mesh.shape = (2, 2, 2)
  rep = model_report.report(config)
  setup = editor_sft.make_setup(config, str(tmp_path))
  for name in ("params", "ema_params", "opt_state"):
    real = sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize
               for x in jax.tree.leaves(getattr(setup.abstract_state, name)))
    assert rep["bytes_per_device"][name] == real, name
  assert rep["params"] == sum(x.size for x in jax.tree.leaves(setup.abstract_state.params))


def test_report_refuses_an_unsized_mesh():
  config = load_file("configs/flux_kontext_grpo.py").unlock()
  config.mesh.shape = (-1, 64, 1)
  with pytest.raises(model_report.ConfigError, match="has a -1"):
    model_report.report(config)
