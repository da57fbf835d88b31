"""Plan then edit (DESIGN.md 6): a planner writes a JSON list of atomic steps for an abstract
instruction, an editor executes the steps one at a time, and the detector reads the result.

Each model loads from its workdir's latest checkpoint with the config saved there. Inference
needs neither the dataset nor the training config file.

    jaxedit edit --workdir PLANNER_DIR --image IN.png --instruction "..." --out OUT.png
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np
from PIL import Image

from jaxedit import checkpoint, editing, plans, registry, sharding, viz
from jaxedit.config import ConfigError
from jaxedit.shapes.checklist import Checklist
from jaxedit.shapes.detect import detect
from jaxedit.text import tokenizer as tokenizer_lib

EDITORS, PLANNERS = registry.EDITORS, registry.PLANNERS


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
  setup: Any  # editor_sft.Setup or editor_grpo.Setup
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
  from jaxedit.trainers import editor_grpo, editor_opd, editor_sft

  mngr, step, config = saved_run(workdir, EDITORS, "an editor workdir (editor_sft, "
                                 "editor_grpo or editor_opd)")
  config.eval.batch_size = batch_size
  key = weights_key(config, weights)
  if config.trainer == "editor_sft":
    setup = editor_sft.make_setup(config, workdir, devices)
    params = checkpoint.restore_subtree(mngr, step, key, setup.abstract_state.params)
  else:
    trainer = editor_grpo if config.trainer == "editor_grpo" else editor_opd
    setup = trainer.make_setup(config, workdir, devices)
    trained = checkpoint.restore_subtree(mngr, step, key, setup.abstract_state.params)
    frozen = (checkpoint.restore_subtree(mngr, step, "frozen", setup.abstract_state.frozen)
              if setup.use_lora else None)
    params = setup.policy(trained, frozen)
  sample = config.sample
  sampler = editing.make_sampler(setup, sample.num_steps, sample.shift, sample.guidance_scale)
  return LoadedEditor(setup, params, sampler, batch_size, workdir)


# ------------------------------------------------------------------------------------------
# The planner: a plan per (image, instruction).
# ------------------------------------------------------------------------------------------
@dataclasses.dataclass
class LoadedPlanner:
  setup: Any  # planner_sft.Setup
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
  from jaxedit.trainers import planner_grpo, planner_sft

  mngr, step, config = saved_run(workdir, PLANNERS, "a planner workdir (planner_sft, "
                                 "planner_grpo or planner_opd)")
  sft_config = planner_grpo.as_sft_config(config) if config.trainer != "planner_sft" else config
  sft_config.eval.batch_size = batch_size
  setup = planner_sft.make_setup(sft_config, workdir, devices)
  key = weights_key(config, weights)
  params = checkpoint.restore_subtree(mngr, step, key, setup.abstract_state.params)
  return LoadedPlanner(setup, params, planner_sft.make_plan_sampler(setup), batch_size, workdir,
                       config)


# ------------------------------------------------------------------------------------------
# Executing plans.
# ------------------------------------------------------------------------------------------
def executable_steps(text: str, editor: LoadedEditor, max_steps: int) -> list[str]:
  """The steps of a plan text; PlanError if it is not a JSON list of strings, is longer than
  `max_steps`, or has a step the editor cannot read."""
  steps = plans.parse_json(text)
  if len(steps) > max_steps:
    raise plans.PlanError(f"the plan has {len(steps)} steps; at most {max_steps} are run")
  for k, step in enumerate(steps):
    if not editor.fits(step):
      raise plans.PlanError(f"step {k + 1} ({step!r}) is longer than the editor's text length "
                            f"{editor.setup.text_len}")
  return steps


def run_plans(editor: LoadedEditor, images: np.ndarray, step_lists: Sequence[Sequence[str]],
              seed: int) -> list[list[np.ndarray]]:
  """Executes each plan on its image, one step at a time (the k-th steps of all plans are
  batched): per example [source, after step 1, ...]."""
  trails = [[np.asarray(img, np.uint8)] for img in images]
  start = time.time()
  for k in range(max((len(s) for s in step_lists), default=0)):
    rows = [i for i, s in enumerate(step_lists) if len(s) > k]
    if len(images) > editor.batch_size:  # long work: say how far it is
      logging.info("running plans: step %d, %d edits (%.0f s so far)", k + 1, len(rows),
                   time.time() - start)
    edited = editor(np.stack([trails[i][-1] for i in rows]),
                    [step_lists[i][k] for i in rows], seed=seed * 131 + k)
    for i, image in zip(rows, edited):
      trails[i].append(image)
  return trails


def run_plan_texts(editor: LoadedEditor, images: np.ndarray, texts: Sequence[str],
                   max_steps: int, seed: int):
  """Runs each plan text that can be run (`executable_steps`) on its image: (per example
  the steps run, None where the plan could not run and the image stays the source; trails
  as in `run_plans`)."""
  step_lists = []
  for text in texts:
    try:
      step_lists.append(executable_steps(text, editor, max_steps))
    except plans.PlanError:
      step_lists.append(None)
  return step_lists, run_plans(editor, images, [s or [] for s in step_lists], seed)


def strict_success(images: np.ndarray, checklists: Sequence[str], world) -> np.ndarray:
  """1.0 where every checklist item holds in the detected scene of the image."""
  scenes = detect(np.asarray(images), world).scenes
  return np.asarray([Checklist.from_json(c).passes(s) for c, s in zip(checklists, scenes)],
                    np.float32)


def trail_grid(trails, captions: Sequence[Sequence[str]], limit: int = 16):
  """PNG grid: each row the source then the image after each executed step."""
  rows = [(trail, caption) for trail, caption in zip(trails[:limit], captions[:limit])]
  return viz.image_grid(rows, header=["source", "step 1", "step 2", "..."], text_width=56)


# ------------------------------------------------------------------------------------------
# `jaxedit edit`: one image, one instruction.
# ------------------------------------------------------------------------------------------
def read_image(path: str, image_size: int) -> np.ndarray:
  try:
    image = np.asarray(Image.open(path).convert("RGB"))
  except (OSError, ValueError) as e:
    raise ConfigError(f"cannot read image {path!r}: {e}") from None
  if image.shape != (image_size, image_size, 3):
    raise ConfigError(f"image {path!r} is {image.shape[1]}x{image.shape[0]}; the planner and "
                      f"editor work on {image_size}x{image_size} RGB images")
  return image


def edit(workdir: str, image_path: str, instruction: str, out_path: str,
         editor_workdir: str = "", seed: int = 0, max_steps: int = 8) -> dict:
  """Plans with the planner in `workdir`, runs the plan with the editor (`editor_workdir`, or
  the one its config names in `editor`), writes OUT.png, OUT.plan.json and
  OUT.step_K.png per step, and returns the plan record."""
  planner = load_planner(workdir, batch_size=jax.device_count())
  editor_workdir = editor_workdir or planner.config.get("editor", "")
  if not editor_workdir:
    raise ConfigError(f"no editor: pass --editor DIR (the planner in {workdir} names none in "
                      "its config key 'editor')")
  editor = load_editor(editor_workdir, batch_size=jax.device_count())
  if editor.setup.world.image_size != planner.setup.world.image_size:
    raise ConfigError("the planner and the editor were trained on different image sizes")
  image = read_image(image_path, planner.setup.world.image_size)
  [text] = planner(image[None], [instruction], seed)
  try:
    steps = executable_steps(text, editor, max_steps)
  except plans.PlanError as e:
    raise ConfigError(f"the planner's plan cannot be run: {e}\nplan: {text}") from None
  try:  # run anyway: the editor reads the image, not the planner's idea of it
    plans.parse_plan(text, detect(image, planner.setup.world).scenes[0])
    problem = None
  except plans.PlanError as e:
    problem = str(e)
  [trail] = run_plans(editor, image[None], [steps], seed)
  base, _ = os.path.splitext(out_path)
  os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
  Image.fromarray(trail[-1]).save(out_path)
  record = {"instruction": instruction, "plan": steps,
            "plan_problem": problem,  # PlanError against the detected source scene, if any
            "planner": os.path.abspath(workdir),
            "editor": os.path.abspath(editor_workdir), "seed": seed, "images": []}
  for k, img in enumerate(trail[1:], 1):
    path = f"{base}.step_{k}.png"
    Image.fromarray(img).save(path)
    record["images"].append(path)
  record["detected_scene"] = detect(trail[-1], planner.setup.world).scenes[0].describe()
  with open(f"{base}.plan.json", "w") as f:
    json.dump(record, f, indent=1)
  return record

