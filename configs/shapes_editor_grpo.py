"""Flow-GRPO on the shapes editor, starting from configs/shapes_editor_sft.py's run.

    jaxedit train --config configs/shapes_editor_sft.py  --workdir SFT
    jaxedit train --config configs/shapes_editor_grpo.py --workdir RL --config.init_from=SFT
    jaxedit eval  --config configs/shapes_editor_grpo.py --workdir RL   # before/after

The default run takes < 30 min on 2 CPU cores; `:demo` a few minutes. `:colour` and
`:geometry` train on the prompts of one task only: the task teachers that
configs/shapes_editor_opd.py distils into one student. `:latent` starts from
`shapes_editor_sft.py:latent` (set model.vae.init_from as there).

    python launch/sweep.py --config configs/shapes_editor_grpo.py --workdir SWEEP -- \
        --config.init_from=SFT     # learning rate x KL beta: one compiled program for all
"""

import os

import ml_collections

from jaxedit import schema, sweep
from jaxedit.config import load_file


def get_config(arg=None):
  config = schema.editor_grpo()
  # The model, data and eval sampler of the SFT run this one starts from.
  sft = load_file(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                               "shapes_editor_sft.py" + (f":{arg}" if arg in ("demo", "latent")
                                                         else "")))
  for section in ("model", "data", "sample"):
    config[section] = ml_collections.ConfigDict(sft[section].to_dict())
  config.eval.num_examples = sft.eval.num_examples
  config.model.lora_rank = 16
  r = config.rollout
  r.prompts_per_step, r.group_size, r.rollout_chunks = 8, 8, 2
  r.num_steps = 8
  config.grpo.kl_beta = 0.01
  config.train.lr = 1e-3  # LoRA; 3e-4 moved the policy too little in 80 steps
  config.train.num_steps = 80
  config.train.eval_every = 20
  config.train.sample_every = 20
  config.train.checkpoint_every = 20
  config.train.eval_examples = 128
  if arg == "demo":
    config.train.num_steps = 10
    config.train.eval_every = config.train.sample_every = config.train.checkpoint_every = 5
  elif arg in ("colour", "geometry"):
    config.train.tasks = (arg,)
  elif arg and arg != "latent":
    raise ValueError(f"unknown config arg {arg!r}; use 'demo', 'latent', 'colour', 'geometry' "
                     "or nothing")
  return config.lock()


def get_sweep(arg=None):
  """Learning rate x KL beta; both are traced inputs of the update (jaxedit.hparams)."""
  del arg
  return sweep.product(sweep.values("train.lr", [3e-4, 1e-3]),
                       sweep.values("grpo.kl_beta", [0.01, 0.04]))
