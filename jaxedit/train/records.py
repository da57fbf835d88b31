"""What a run writes as it trains: the metrics log (DIR/metrics.jsonl and TensorBoard), the
validation curve (DIR/curve.json) and sample grids (DIR/samples/*.png and TensorBoard)."""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np

from jaxedit import evaluation


def due(every: int, step: int, last: bool) -> bool:
  """Whether a periodic action (validation, sample grids) runs at `step`: every `every`
  steps and at the last; 0: at the last only; < 0: never."""
  return (every > 0 and step % every == 0) or (last and every >= 0)


class MetricsLog:
  """Writes a logged step's metrics (to the metric writer, and from process 0 to
  DIR/metrics.jsonl) when the next step is logged, or at `flush`.

  Reading a step's device metrics right after dispatching the step blocks the host until
  that step ends; the device then idles while the host loads and dispatches the next batch.
  One log period later they are long computed, so the loop never waits on the device.
  `select(scalars)` picks this log's scalars from the fetched metrics (e.g. one member's);
  `prefix` goes before their names (not the host scalars')."""

  def __init__(self, writer, workdir: str, select=lambda scalars: scalars, prefix: str = ""):
    self.writer, self.workdir, self.select, self.prefix = writer, workdir, select, prefix
    self._pending = None  # (step, device metrics, host scalars)

  def __call__(self, step: int, metrics, host_scalars: dict | None = None) -> None:
    self.flush()
    self._pending = (step, metrics, host_scalars or {})

  def flush(self) -> None:
    if self._pending is None:
      return
    step, metrics, host_scalars = self._pending
    self._pending = None
    fetched = {k: float(v) if np.ndim(v) == 0 else np.asarray(v)
               for k, v in jax.device_get(metrics).items()}
    scalars = {**{self.prefix + k: v for k, v in self.select(fetched).items()},
               **host_scalars}
    self.writer.write_scalars(step, scalars)  # TensorBoard
    if jax.process_index() == 0:
      with open(os.path.join(self.workdir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps({"step": step, **scalars}) + "\n")


class Curve:
  """The validation points of a run (DIR/curve.json), each with the wall-clock minutes since
  the run began and the minutes of training alone (validation excluded); a resumed run
  keeps the points up to its checkpoint and counts on from their minutes."""

  def __init__(self, workdir: str, start: int):
    self.path = os.path.join(workdir, "curve.json")
    points = json.load(open(self.path)) if os.path.exists(self.path) else []
    self.points = [p for p in points if p["step"] <= start]  # past a hard kill's checkpoint
    last = self.points[-1] if self.points else {"minutes": 0.0}
    self.t0 = time.time() - last["minutes"] * 60
    self.eval_seconds = 60 * (last["minutes"] - last.get("train_minutes", last["minutes"]))

  def minutes(self) -> float:
    return (time.time() - self.t0) / 60

  def add(self, step: int, summary: dict, eval_seconds: float) -> float:
    """Records a validation that took `eval_seconds`; returns the run's minutes."""
    self.eval_seconds += eval_seconds
    minutes = self.minutes()
    self.points.append({"step": step, "minutes": round(minutes, 2),
                        "train_minutes": round(minutes - self.eval_seconds / 60, 2), **summary})
    if jax.process_index() == 0:
      evaluation.write_metrics(self.path, self.points)
    return minutes


def scalars(summary: dict, prefix: str) -> dict:
  """The numbers of a (nested) summary as TensorBoard scalars named prefix/key/subkey."""
  out = {}
  for key, value in summary.items():
    if isinstance(value, dict):
      out.update(scalars(value, f"{prefix}/{key}"))
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
      out[f"{prefix}/{key}"] = value
  return out


def write_image(writer, workdir: str, step: int, tag: str, prefix: str, image) -> None:
  """A PIL image to TensorBoard (as `tag`) and, from process 0, to
  DIR/samples/PREFIX_STEP.png."""
  writer.write_images(step, {tag: np.asarray(image)[None]})
  if jax.process_index() == 0:
    os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
    image.save(os.path.join(workdir, "samples", f"{prefix}_{step:07d}.png"))
