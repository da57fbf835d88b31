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
  """PNG grid: source | edit | target (targets None: data without them), captioned with the
  instruction (and the verdict)."""
  rows = []
  for i in range(min(limit, len(sources))):
    caption = [instructions[i]]
    if success is not None:
      caption.append("success" if success[i] else "failed")
    rows.append(([sources[i], edits[i]] + ([] if targets is None else [targets[i]]), caption))
  header = ["source", "edit"] + ([] if targets is None else ["target"])
  return viz.image_grid(rows, header=header, text_width=48)


def write_metrics(path: str, metrics: dict) -> None:
  with open(path, "w") as f:
    json.dump(metrics, f, indent=1, sort_keys=True)


def across_seeds(runs: list[dict]) -> dict:
  """Mean, sample std, min and max over runs (e.g. seeds) of every number in their
  metrics.json, nested dicts included (before, change, per family, ...)."""
  out = {}
  for key, value in runs[0].items():
    values = [run.get(key) for run in runs]
    if isinstance(value, dict) and all(isinstance(v, dict) for v in values):
      out[key] = across_seeds(values)
    elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
      a = np.asarray(values, np.float64)
      out[key] = {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
                  "min": float(a.min()), "max": float(a.max())}
  return out


def main(argv=None) -> None:
  """python -m jaxedit.evaluation DIR [DIR ...] --out FILE: spread of DIR/eval/metrics.json
  over runs (e.g. seeds)."""
  import argparse
  import os

  p = argparse.ArgumentParser(description=main.__doc__.split("\n")[0])
  p.add_argument("workdirs", nargs="+")
  p.add_argument("--out", required=True)
  args = p.parse_args(argv)
  runs = []
  for d in args.workdirs:
    path = os.path.join(d, "eval", "metrics.json")
    if not os.path.exists(path):
      raise SystemExit(f"{path} does not exist: run `jaxedit eval` on {d} first")
    runs.append(json.load(open(path)))
  summary = {"workdirs": args.workdirs, "num_runs": len(runs), **across_seeds(runs)}
  write_metrics(args.out, summary)
  keys = ["edit_success", "checklist_score", "reward", "preservation", "plan_checklist_score",
          "plan_exact"]
  keys += [f"edit_success_by_task.{task}" for task in summary.get("edit_success_by_task", {})]
  for key in keys:
    s = _nested(summary, key)
    if s is None:
      continue
    line = f"{key}: {s['mean']:.4f} +- {s['std']:.4f} (min {s['min']:.4f}, max {s['max']:.4f})"
    c = _nested(summary.get("change", {}), key)
    if c is not None:
      line += f"; change {c['mean']:+.4f} +- {c['std']:.4f}"
    print(line)


def _nested(tree: dict, dotted: str):
  for part in dotted.split("."):
    if not isinstance(tree, dict) or part not in tree:
      return None
    tree = tree[part]
  return tree


if __name__ == "__main__":
  main()
