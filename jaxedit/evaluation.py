"""Scoring edits with the detector: strict success and checklist score per example."""

from __future__ import annotations

import json

import numpy as np

from jaxedit import viz
from jaxedit.shapes.checklist import Checklist
from jaxedit.shapes.detect import detect
from jaxedit.shapes.world import World


def score_edits(edited: np.ndarray, checklists: list[str], world: World) -> dict[str, np.ndarray]:
  """Per example: `success` (every checklist item holds in the detected scene) and `score`
  (fraction of items that hold)."""
  scenes = detect(edited, world).scenes
  lists = [Checklist.from_json(c) for c in checklists]
  return {"success": np.array([c.passes(s) for c, s in zip(lists, scenes)], np.float32),
          "score": np.array([c.score(s) for c, s in zip(lists, scenes)], np.float32)}


def summarize(scores: dict[str, np.ndarray], groups: dict[str, list[str]] | None = None) -> dict:
  """Means over all examples, and strict success per group label: `groups` maps a name
  (`family`, `task`) to one label per example and yields `edit_success_by_{name}`."""
  summary = {"edit_success": float(scores["success"].mean()),
             "checklist_score": float(scores["score"].mean()),
             "num_examples": int(len(scores["success"]))}
  for name, labels in (groups or {}).items():
    labels = np.asarray(labels)
    summary[f"edit_success_by_{name}"] = {
        str(label): float(scores["success"][labels == label].mean())
        for label in sorted(set(labels.tolist()))}
  return summary


def edit_grid(sources, edits, targets, instructions, success=None, limit: int = 24):
  """PNG grid: source | edit | target, captioned with the instruction (and the verdict)."""
  rows = []
  for i in range(min(limit, len(sources))):
    caption = [instructions[i]]
    if success is not None:
      caption.append("success" if success[i] else "failed")
    rows.append(([sources[i], edits[i], targets[i]], caption))
  return viz.image_grid(rows, header=["source", "edit", "target"], text_width=48)


def write_metrics(path: str, metrics: dict) -> None:
  with open(path, "w") as f:
    json.dump(metrics, f, indent=1, sort_keys=True)
