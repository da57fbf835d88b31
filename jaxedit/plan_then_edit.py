"""Plans run by an editor, step by step, and scored: the plan-then-edit evaluation of a
planner (`e2e_success`, the reference plans' ceiling, a single-step baseline editor)."""

from __future__ import annotations

import logging
import os
import time
from typing import Sequence

import ml_collections
import numpy as np

from jaxedit import plans, viz, workdirs
from jaxedit.config import ConfigError
from jaxedit.shapes.checklist import Checklist
from jaxedit.shapes.detect import detect


def executable_steps(text: str, editor: workdirs.LoadedEditor, max_steps: int) -> list[str]:
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


def run_plans(editor: workdirs.LoadedEditor, images: np.ndarray, step_lists: Sequence[Sequence[str]],
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


def run_plan_texts(editor: workdirs.LoadedEditor, images: np.ndarray, texts: Sequence[str],
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
# Evaluation: the plans run by an editor and scored.
# ------------------------------------------------------------------------------------------
def e2e_scores(config: ml_collections.ConfigDict, batches, texts, out: str, editor=None,
               name: str = "e2e") -> dict:
  """Per example: `e2e_success` (the plan run step by step by the editor of `config.editor`,
  the final image strictly meets the checklist) and `e2e_runs` (the plan could be run).
  The k-th steps of all plans are edited together. Writes a grid of the first examples to
  `out/{name}.png`; {} without an editor."""
  if not config.editor:
    return {}
  ec = config.eval
  editor = editor or workdirs.load_editor(config.editor, ec.batch_size)
  texts = [t for batch_texts in texts for t in batch_texts]
  info = {k: [v for _, i in batches for v in i[k]] for k in ("instruction", "checklist")}
  images = np.concatenate([a["source_image"][:len(i["instruction"])] for a, i in batches])
  steps, trails = run_plan_texts(editor, images, texts, ec.e2e_max_steps, ec.seed)
  runs = np.asarray([s is not None for s in steps], np.float32)
  success = runs * strict_success(np.stack([t[-1] for t in trails]),
                                            info["checklist"], editor.setup.world)
  captions = [[i, p, "success" if ok else "failed"]
              for i, p, ok in zip(info["instruction"], texts, success)]
  trail_grid(trails, captions).save(os.path.join(out, f"{name}.png"))
  return {"e2e_success": success, "e2e_runs": runs}


def reference_plan_scores(config: ml_collections.ConfigDict, batches, out: str,
                          editor=None) -> dict:
  """With `eval.e2e_reference_plans`, per example `e2e_success_reference_plans`: the
  ground-truth plans run by the same editor, the most any planner can reach with it."""
  if not (config.editor and config.eval.e2e_reference_plans):
    return {}
  texts = [list(info["plan_steps"]) for _, info in batches]
  scores = e2e_scores(config, batches, texts, out, editor, "e2e_reference_plans")
  return {"e2e_success_reference_plans": scores["e2e_success"]}


def baseline_scores(config: ml_collections.ConfigDict, batches, out: str) -> dict:
  """Per example `single_step_baseline_success`: the editor of `eval.baseline_editor` given
  the abstract instruction, in one step. Writes a grid of the first batch; {} without one."""
  ec = config.eval
  if not ec.baseline_editor:
    return {}
  baseline = workdirs.load_editor(ec.baseline_editor, ec.batch_size)
  for _, info in batches:
    for instruction in info["instruction"]:
      if not baseline.fits(instruction):
        raise ConfigError(f"eval.baseline_editor: {instruction!r} does not fit its "
                          f"model.text_max_len {baseline.setup.text_len}; train the baseline "
                          "with room for abstract instructions")
  success = []
  for b, (arrays, info) in enumerate(batches):
    images = arrays["source_image"][:len(info["instruction"])]
    edited = baseline(images, info["instruction"], seed=ec.seed + b)
    success.append(strict_success(edited, info["checklist"], baseline.setup.world))
    if b == 0:
      captions = [[i, "success" if ok else "failed"]
                  for i, ok in zip(info["instruction"], success[0])]
      trail_grid([[s, e] for s, e in zip(images, edited)], captions).save(
          os.path.join(out, "single_step_baseline.png"))
  return {"single_step_baseline_success": np.concatenate(success)}
