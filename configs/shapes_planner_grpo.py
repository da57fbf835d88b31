"""Planner GRPO with the plan-checklist (cognitive) reward, from a planner SFT run.

    jaxedit train --config configs/shapes_planner_grpo.py --workdir DIR --config.init_from=SFT_DIR
    jaxedit eval  --config configs/shapes_planner_grpo.py --workdir DIR   # before/after
    # + end to end: plans run by an editor, and the single-step baseline
    jaxedit eval  --config configs/shapes_planner_grpo.py --workdir DIR --config.init_from=SFT_DIR \
        --config.editor=EDITOR_DIR --config.eval.baseline_editor=BASELINE_DIR
    # the visual reward (every rollout plan run by the editor; slow on CPU)
    jaxedit train --config configs/shapes_planner_grpo.py --workdir DIR --config.init_from=SFT_DIR \
        --config.editor=EDITOR_DIR --config.rewards.visual.weight=1.0
"""

from jaxedit.trainers import planner_grpo


def get_config(arg=None):
  config = planner_grpo.reference_config()
  config.prompt.max_plan_len = 96  # as configs/shapes_planner_sft.py: the models must match
  if arg == "scene_text":  # the detector's scene description in the prompt, besides the image
    config.prompt.scene_as_text = True
    config.prompt.max_prompt_len = 112  # the longest test prompt is 98 tokens
  elif arg == "demo":
    config.train.num_steps = 20
    config.train.eval_every = 10
    config.train.checkpoint_every = 10
    config.eval.num_examples = 256
  elif arg:
    raise ValueError(f"unknown config arg {arg!r}; use 'scene_text', 'demo' or nothing")
  return config.lock()
