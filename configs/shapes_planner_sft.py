"""Planner SFT on the abstract instructions of the shapes world (and single atomic edits,
whose plan is one step).

    jaxedit train --config configs/shapes_planner_sft.py --workdir DIR
    jaxedit train --config configs/shapes_planner_sft.py:demo --workdir DIR   # a few minutes
    jaxedit train --config configs/shapes_planner_sft.py:scene_text --workdir DIR  # + scene text
    jaxedit eval  --config configs/shapes_planner_sft.py --workdir DIR
"""

from jaxedit import schema


def get_config(arg=None):
  config = schema.planner_sft()
  config.prompt.max_plan_len = 96  # the longest reference plan is 85 tokens with EOS
  if arg == "scene_text":  # the detector's scene description in the prompt, besides the image
    config.prompt.scene_as_text = True
    config.prompt.max_prompt_len = 112  # the longest test prompt is 98 tokens
  elif arg == "demo":
    config.train.num_steps = 300
    config.train.eval_every = 150
    config.train.checkpoint_every = 150
    config.eval.num_examples = 256
  elif arg:
    raise ValueError(f"unknown config arg {arg!r}; use 'scene_text', 'demo' or nothing")
  return config.lock()
