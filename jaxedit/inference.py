"""Plan then edit (docs/design.md 6): a planner writes a JSON list of atomic steps for an abstract
instruction, an editor executes the steps one at a time, and the detector reads the result.

Each model loads from its workdir's latest checkpoint with the config saved there. Inference
needs neither the dataset nor the training config file.

    jaxedit edit --workdir PLANNER_DIR --image IN.png --instruction "..." --out OUT.png
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from PIL import Image

from jaxedit import plan_then_edit, plans, workdirs
from jaxedit.config import ConfigError
from jaxedit.shapes.detect import detect


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
  planner = workdirs.load_planner(workdir, batch_size=jax.device_count())
  editor_workdir = editor_workdir or planner.config.get("editor", "")
  if not editor_workdir:
    raise ConfigError(f"no editor: pass --editor DIR (the planner in {workdir} names none in "
                      "its config key 'editor')")
  editor = workdirs.load_editor(editor_workdir, batch_size=jax.device_count())
  if editor.setup.world.image_size != planner.setup.world.image_size:
    raise ConfigError("the planner and the editor were trained on different image sizes")
  image = read_image(image_path, planner.setup.world.image_size)
  [text] = planner(image[None], [instruction], seed)
  try:
    steps = plan_then_edit.executable_steps(text, editor, max_steps)
  except plans.PlanError as e:
    raise ConfigError(f"the planner's plan cannot be run: {e}\nplan: {text}") from None
  try:  # run anyway: the editor reads the image, not the planner's idea of it
    plans.parse_plan(text, detect(image, planner.setup.world).scenes[0])
    problem = None
  except plans.PlanError as e:
    problem = str(e)
  [trail] = plan_then_edit.run_plans(editor, image[None], [steps], seed)
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

