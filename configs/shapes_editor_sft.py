"""Editor SFT on single atomic edits of the shapes world.

    jaxedit train --config configs/shapes_editor_sft.py --workdir DIR        # ~20 min, 2 CPU cores
    jaxedit train --config configs/shapes_editor_sft.py:demo --workdir DIR   # < 5 min
    jaxedit eval  --config configs/shapes_editor_sft.py --workdir DIR
"""

from jaxedit.trainers import editor_sft


def get_config(arg=None):
  config = editor_sft.reference_config()
  config.data.splits.train.abstract = 0  # the editor learns atomic edits
  # Weight high noise levels: there the model must read the source tokens, which is what it
  # is slowest to learn (at t = 1 its x0 error fell below copying the source only with this).
  config.flow.shift = 3.0
  config.sample.shift = 3.0
  config.sample.num_steps = 8
  config.train.lr = 2e-3
  config.train.warmup_steps = 50
  config.train.eval_examples = 128
  if arg == "demo":
    config.data.splits.train.atomic = 8_000
    config.data.splits.validation.abstract = 0
    config.data.splits.test.abstract = 0
    config.train.num_steps = 200
    config.train.eval_every = 100
    config.train.sample_every = 100
    config.train.checkpoint_every = 100
    config.eval.num_examples = 256
  elif arg:
    raise ValueError(f"unknown config arg {arg!r}; use 'demo' or nothing")
  return config.lock()
