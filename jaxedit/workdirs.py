"""What a run saved, loaded to sample: the editor or the planner of a workdir (any of its
trainers), in this process's shardings."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np

from jaxedit import checkpoint, editing, flux_editing, lora, planning, registry, sharding
from jaxedit.config import ConfigError
from jaxedit.rl import editor_policy, planner_policy
from jaxedit.shapes.detect import detect
from jaxedit.text import tokenizer as tokenizer_lib


def saved_run(workdir: str, trainers: Sequence[str], what: str):
  """(manager, latest step, saved config) of a workdir trained by one of `trainers`."""
  mngr, step = checkpoint.latest_step(workdir, what)
  config = ml_collections.ConfigDict(checkpoint.saved_config(mngr, step))
  if config.get("trainer") not in trainers:
    raise ConfigError(f"{workdir} holds a {config.get('trainer')!r} run; expected {what}")
  return mngr, step, config


def _in_batches(fn, arrays: dict, batch_size: int, batch_sharding):
  """Runs `fn(global batch, chunk index)` over rows of `arrays`, padding the last chunk."""
  n = len(next(iter(arrays.values())))
  out = []
  for i, start in enumerate(range(0, n, batch_size)):
    chunk = {k: sharding.pad_rows(v[start:start + batch_size], batch_size)
             for k, v in arrays.items()}
    result = fn(sharding.global_batch(chunk, batch_sharding), i)
    out.append(jax.tree.map(lambda x: np.asarray(x)[:min(batch_size, n - start)], result))
  return jax.tree.map(lambda *xs: np.concatenate(xs), *out)


# ------------------------------------------------------------------------------------------
# The editor: one atomic instruction per image.
# ------------------------------------------------------------------------------------------
@dataclasses.dataclass
class LoadedEditor:
  setup: Any  # editing.Setup, or rl.editor_policy.Setup
  params: Any
  sampler: Callable  # (params, batch, rng) -> uint8 images
  batch_size: int
  workdir: str

  def fits(self, instruction: str) -> bool:
    """Whether the editor's tokenizer fits `instruction` into its text length."""
    return len(self.setup.tokenizer.encode(instruction).ids) <= self.setup.text_len

  def __call__(self, images: np.ndarray, instructions: Sequence[str], seed: int) -> np.ndarray:
    """uint8 (N, H, W, 3) edited images; ValueError names an instruction that does not fit."""
    ids, mask = tokenizer_lib.encode(self.setup.tokenizer, list(instructions),
                                     self.setup.text_len)
    arrays = {"source_image": np.asarray(images, np.uint8), "ids": ids, "mask": mask}
    return _in_batches(lambda b, i: self.sampler(self.params, b, jax.random.key(seed * 7919 + i)),
                       arrays, self.batch_size, self.setup.batch_sharding)


def weights_key(config: ml_collections.ConfigDict, weights: str) -> str:
  """The train-state entry to load: `weights` is 'ema', 'raw', or 'eval' (what the run's
  eval uses)."""
  if weights not in ("eval", "ema", "raw"):
    raise ConfigError(f"weights must be 'eval', 'ema' or 'raw', got {weights!r}")
  if weights == "eval":
    weights = "ema" if config.eval.use_ema else "raw"
  return "ema_params" if weights == "ema" else "params"


def load_editor(workdir: str, batch_size: int = 64, devices=None,
                weights: str = "eval") -> LoadedEditor:
  """The editor of an SFT, GRPO or OPD workdir (`weights`: see `weights_key`; adapters joined
  onto the base)."""
  mngr, step, config = saved_run(workdir, registry.EDITORS, "an editor workdir (editor_sft, "
                                 "editor_grpo or editor_opd)")
  config.eval.batch_size = batch_size
  key = weights_key(config, weights)
  if not registry.get(config.trainer).rl:
    setup = (flux_editing.make_setup(config, workdir, devices) if flux_editing.on_records(config)
             else editing.make_setup(config, workdir, devices))
    params = checkpoint.restore_subtree(mngr, step, key, setup.abstract_state.params)
    if getattr(setup.abstract_state, "base", None) is not None:  # LoRA SFT on edit records
      params = lora.join(params, checkpoint.restore_subtree(mngr, step, "base",
                                                            setup.abstract_state.base))
  else:
    setup = editor_policy.build_setup(config, workdir, devices)
    trained = checkpoint.restore_subtree(mngr, step, key, setup.abstract_state.params)
    base = (checkpoint.restore_subtree(mngr, step, "base", setup.abstract_state.base)
            if setup.use_lora else None)
    params = setup.policy(trained, base)
  sample = config.sample
  if flux_editing.on_records(config):  # samples from model inputs (latents, embeddings)
    sampler = flux_editing.make_sampler(setup, sample.num_steps)
  else:
    sampler = editing.make_sampler(setup, sample.num_steps, sample.shift,
                                   sample.guidance_scale)
  return LoadedEditor(setup, params, sampler, batch_size, workdir)


# ------------------------------------------------------------------------------------------
# The planner: a plan per (image, instruction).
# ------------------------------------------------------------------------------------------
@dataclasses.dataclass
class LoadedPlanner:
  setup: Any  # planning.Setup
  params: Any
  sampler: Callable  # (params, arrays, rng) -> sampling.Samples
  batch_size: int
  workdir: str
  config: ml_collections.ConfigDict  # as saved with the checkpoint

  def prompts(self, images: np.ndarray, instructions: Sequence[str]) -> dict:
    """Model inputs; in scene-as-text mode the scene text comes from the detector."""
    scene_texts = [None] * len(instructions)
    if self.setup.config.prompt.scene_as_text:
      scene_texts = [s.describe() for s in detect(images, self.setup.world).scenes]
    prompt, valid = self.setup.prompt_ids(list(instructions), scene_texts)
    return {"source_image": np.asarray(images, np.uint8), "prompt": prompt,
            "prompt_valid": valid}

  def __call__(self, images: np.ndarray, instructions: Sequence[str], seed: int = 0) -> list[str]:
    """Plan texts (greedy at the saved sampling temperature)."""
    samples = _in_batches(
        lambda b, i: self.sampler(self.params, b, jax.random.key(seed * 7919 + i)),
        self.prompts(images, instructions), self.batch_size, self.setup.batch_sharding)
    return self.setup.decode(samples.tokens, samples.valid)


def load_planner(workdir: str, batch_size: int = 64, devices=None,
                 weights: str = "eval") -> LoadedPlanner:
  """The planner of an SFT, GRPO or OPD workdir (`weights`: see `weights_key`)."""
  mngr, step, config = saved_run(workdir, registry.PLANNERS, "a planner workdir (planner_sft, "
                                 "planner_grpo or planner_opd)")
  sft_config = planner_policy.as_sft_config(config) if config.trainer != "planner_sft" else config
  sft_config.eval.batch_size = batch_size
  setup = planning.make_setup(sft_config, workdir, devices)
  key = weights_key(config, weights)
  params = checkpoint.restore_subtree(mngr, step, key, setup.abstract_state.params)
  if setup.abstract_state.base is not None:  # LoRA: adapters (and vision prefix) over the LM
    params = lora.join(params, checkpoint.restore_subtree(mngr, step, "base",
                                                          setup.abstract_state.base))
  return LoadedPlanner(setup, params, planning.make_plan_sampler(setup), batch_size, workdir,
                       config)
