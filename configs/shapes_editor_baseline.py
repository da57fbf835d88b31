"""The single-step baseline of the planning papers: the editor of `shapes_editor_sft.py`,
same size and compute, trained on the same data plus the (source, abstract instruction,
final target) pairs, and asked to do an abstract edit in one step.

    jaxedit train --config configs/shapes_editor_baseline.py --workdir BASELINE_DIR
    jaxedit eval  --config configs/shapes_planner_grpo.py --workdir PLANNER_DIR \
        --config.editor=EDITOR_DIR --config.eval.baseline_editor=BASELINE_DIR
"""

import importlib.util
import os


def get_config(arg=None):
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "shapes_editor_sft.py")
  spec = importlib.util.spec_from_file_location("shapes_editor_sft", path)
  editor = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(editor)
  config = editor.get_config(arg).unlock()
  config.data.splits.train.abstract = 16_000  # the default split: the planner's data too
  config.train.example_kinds = ("atomic", "abstract")
  config.eval.example_kinds = ("abstract",)
  config.model.text_max_len = 40  # abstract instructions run to 30 tokens on the test split
  return config.lock()
