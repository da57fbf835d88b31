"""Online policy distillation on the shapes editor: a colour teacher and a geometry teacher
(Flow-GRPO on one task each) distilled into one student along the student's own rollouts.

    jaxedit train --config configs/shapes_editor_sft.py --workdir SFT
    jaxedit train --config configs/shapes_editor_grpo.py:colour   --workdir T_COLOUR   --config.init_from=SFT
    jaxedit train --config configs/shapes_editor_grpo.py:geometry --workdir T_GEOMETRY --config.init_from=SFT
    jaxedit train --config configs/shapes_editor_opd.py --workdir STUDENT --config.init_from=SFT \
        --config.opd.teachers.colour=T_COLOUR --config.opd.teachers.geometry=T_GEOMETRY
    jaxedit eval  --config configs/shapes_editor_opd.py --workdir STUDENT  # edit_success_by_task

The student sees as many rollouts as configs/shapes_editor_grpo.py's multi-reward run
(64 per iteration, 80 iterations), so the two compare at equal student rollouts.
"""

import os

import ml_collections

from jaxedit import schema
from jaxedit.config import load_file


def get_config(arg=None):
  config = schema.editor_opd()
  # Model, data, sampler, rewards (logged only), schedule and eval of the GRPO runs.
  grpo = load_file(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                "shapes_editor_grpo.py" + (":demo" if arg == "demo" else "")))
  for section in ("model", "data", "sample", "rewards", "train", "eval"):
    config[section] = ml_collections.ConfigDict(grpo[section].to_dict())
  r = config.rollout
  r.prompts_per_step, r.group_size, r.rollout_chunks, r.minibatches = 64, 1, 2, 2
  r.num_steps = grpo.rollout.num_steps
  r.noise_level = grpo.rollout.noise_level
  if arg == "ode":
    r.noise_level = 0.0  # ODE rollouts, pure mean matching
  elif arg not in (None, "demo"):
    raise ValueError(f"unknown config arg {arg!r}; use 'demo', 'ode' or nothing")
  return config.lock()
