"""Online policy distillation on the shapes planner: one teacher per task tag (planner GRPO on
that task's prompts only) distilled into one student on the student's own plans.

    jaxedit train --config configs/shapes_planner_sft.py --workdir SFT
    for task in colour geometry mixed; do
      jaxedit train --config configs/shapes_planner_grpo.py:$task --workdir T_$task \
          --config.init_from=SFT
    done
    jaxedit train --config configs/shapes_planner_opd.py --workdir STUDENT --config.init_from=SFT \
        --config.opd.teachers.colour=T_colour --config.opd.teachers.geometry=T_geometry \
        --config.opd.teachers.mixed=T_mixed
    jaxedit eval  --config configs/shapes_planner_opd.py --workdir STUDENT

`:full_vocab` distils with the full-vocabulary KL instead of the sampled-token estimate.
The student sees as many plans as the multi-task GRPO run (16 prompts x 8 plans, 200 steps).
"""

import os

import ml_collections

from jaxedit import schema
from jaxedit.config import load_file


def get_config(arg=None):
  config = schema.planner_opd()
  grpo = load_file(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                "shapes_planner_grpo.py"))
  for section in ("prompt", "train", "eval", "rewards"):
    config[section] = ml_collections.ConfigDict(grpo[section].to_dict())
  r = config.rollout
  r.prompts_per_step = grpo.rollout.prompts_per_step * grpo.rollout.group_size
  r.group_size, r.minibatches = 1, grpo.rollout.minibatches
  if arg == "full_vocab":
    config.opd.kl = "full_vocab"
  elif arg:
    raise ValueError(f"unknown config arg {arg!r}; use 'full_vocab' or nothing")
  return config.lock()
