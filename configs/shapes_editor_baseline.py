"""The single-step baseline of the planning papers: the editor of `shapes_editor_sft.py`,
same size and compute, trained on the same data plus the (source, abstract instruction,
final target) pairs, and asked to do an abstract edit in one step.

    jaxedit train --config configs/shapes_editor_baseline.py --workdir BASELINE_DIR
    jaxedit eval  --config configs/shapes_planner_grpo.py --workdir PLANNER_DIR \
        --config.editor=EDITOR_DIR --config.eval.baseline_editor=BASELINE_DIR
"""

import os

from jaxedit.config import load_file

EDITOR_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "shapes_editor_sft.py")


def get_config(arg=None):
  config = load_file(EDITOR_CONFIG + (f":{arg}" if arg else "")).unlock()
  config.data.splits.train.abstract = 16_000  # the default split: the planner's data too
  config.train.example_kinds = ("atomic", "abstract")
  config.eval.example_kinds = ("abstract",)
  config.model.text_max_len = 40  # abstract instructions run to 30 tokens on the test split
  return config.lock()
