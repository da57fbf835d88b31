"""Planner GRPO with the plan-checklist (cognitive) reward, from a planner SFT run.

    jaxedit train --config configs/shapes_planner_grpo.py --workdir DIR --config.init_from=SFT_DIR
    jaxedit eval  --config configs/shapes_planner_grpo.py --workdir DIR   # before/after
    # + end to end: plans run by an editor, and the single-step baseline
    jaxedit eval  --config configs/shapes_planner_grpo.py --workdir DIR --config.init_from=SFT_DIR \
        --config.editor=EDITOR_DIR --config.eval.baseline_editor=BASELINE_DIR
    # the visual reward (every rollout plan run by the editor; slow on CPU)
    jaxedit train --config configs/shapes_planner_grpo.py --workdir DIR --config.init_from=SFT_DIR \
        --config.editor=EDITOR_DIR --config.rewards.visual.weight=1.0
    # from a `shapes_planner_sft.py:smollm2` run (SmolLM2-135M): its model and prompt layout
    jaxedit train --config configs/shapes_planner_grpo.py:smollm2 --workdir DIR --config.init_from=SFT_DIR
"""

import os

import ml_collections

from jaxedit import schema
from jaxedit.config import load_file

SFT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "shapes_planner_sft.py")


def get_config(arg=None):
  config = schema.planner_grpo()
  # The prompt layout (and so the model inputs) of the SFT start.
  sft_arg = arg if arg in ("scene_text", "smollm2", "smollm2_scene_text") else ""
  config.prompt = ml_collections.ConfigDict(
      load_file(SFT_CONFIG + (":" + sft_arg if sft_arg else "")).prompt.to_dict())
  if arg in ("smollm2", "smollm2_scene_text"):
    # The architecture of the SFT run init_from names; LoRA over it, both dual-atomic
    # rewards (the visual one needs --config.editor=EDITOR_DIR), sized for 2 CPU cores.
    schema.pretrained_planner(config)
    config.model.lora_rank, config.model.lora_alpha = 16, 16.0
    config.rewards.visual.weight = 1.0
    r, t = config.rollout, config.train
    r.prompts_per_step, r.group_size, r.minibatches = 8, 4, 1
    t.num_steps, t.lr, t.warmup_steps = 30, 2e-4, 3
    t.eval_every, t.eval_examples, t.checkpoint_every, t.log_every = 15, 64, 5, 1
  if arg == "demo":
    config.train.num_steps = 20
    config.train.eval_every = 10
    config.train.checkpoint_every = 10
    config.eval.num_examples = 256
  elif arg in ("colour", "geometry", "mixed"):  # a task teacher for shapes_planner_opd.py
    config.train.tasks = (arg,)
  elif arg not in (None, "", "scene_text", "smollm2", "smollm2_scene_text"):
    raise ValueError(f"unknown config arg {arg!r}; use 'scene_text', 'smollm2', "
                     "'smollm2_scene_text', 'demo', 'colour', 'geometry', 'mixed' or nothing")
  return config.lock()
