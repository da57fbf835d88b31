"""Rewards for editor RL, registered by name and combined by weights from the config.

    config.rewards = {"checklist": {"weight": 1.0},
                      "preservation": {"weight": 0.5},
                      "remote": {"weight": 1.0, "url": "http://judge:8000/score"}}

A reward is built by `factory(world, **options)` and called as `fn(images, prompts)`:
`images` uint8 (N, H, W, 3) edits, `prompts` a dict of per-example fields (instruction,
checklist, source_image, source_scene, target_scene, family, task); it returns float (N,).
Rewards run on the host in threads, so slow ones (a remote VLM judge) overlap each other and
the caller can keep the device busy meanwhile (`Rewards.submit`). A NaN reward means the sample
is masked (a judge that failed on it, `on_failure="mask"`): the total is NaN there too and GRPO
gives it zero advantage.

VLM judges over HTTP: `remote` posts batches to a server speaking the JSON protocol below;
`judge` (`jaxedit.judges`) asks an OpenAI-compatible chat-completions server (vLLM, SGLang,
`jaxedit.judge_server`) per sample. flow_grpo's pickle protocol is not supported on purpose:
unpickling a reply runs whatever code the server sends; serve the judge with either of these.
"""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import time
import urllib.error
import urllib.request
from typing import Any, Callable, Mapping

import numpy as np
from PIL import Image

from jaxedit.evaluation import score_edits
from jaxedit.shapes.world import World

RewardFn = Callable[[np.ndarray, Mapping[str, Any]], np.ndarray]
REGISTRY: dict[str, Callable[..., RewardFn]] = {}


def register(name: str):
  def wrap(factory):
    REGISTRY[name] = factory
    return factory
  return wrap


class RewardServerError(RuntimeError):
  """The remote reward server could not be reached or answered something unusable."""


# ------------------------------------------------------------------------------------------
# Shapes-world rewards: read the edit with the detector, or compare pixels with the source.
# ------------------------------------------------------------------------------------------
@register("checklist")
def checklist_reward(world: World, strict: bool = False) -> RewardFn:
  """Instruction adherence: the fraction of checklist items the detected edit satisfies
  (`strict`: 1 only when all hold)."""
  def fn(images, prompts):
    scores = score_edits(images, list(prompts["checklist"]), world)
    return scores["success" if strict else "score"].astype(np.float32)
  return fn


def untouched_mask(source_scene, target_scene, world: World) -> np.ndarray:
  """(N, H, W) True on the pixels of cells the edit leaves as they are."""
  same = np.all(np.asarray(source_scene) == np.asarray(target_scene), axis=-1)  # (N, G, G)
  c = world.cell_size
  return np.repeat(np.repeat(same, c, axis=1), c, axis=2)


@register("preservation")
def preservation_reward(world: World) -> RewardFn:
  """What the instruction does not touch must not change: 1 - mean |edit - source| / 255
  over the pixels of untouched cells (1 where every cell is touched)."""
  def fn(images, prompts):
    mask = untouched_mask(prompts["source_scene"], prompts["target_scene"], world)
    diff = np.abs(np.asarray(images, np.float32) - np.asarray(prompts["source_image"],
                                                              np.float32)).mean(-1) / 255
    kept = mask.sum((1, 2))
    err = (diff * mask).sum((1, 2)) / np.maximum(kept, 1)
    return np.where(kept > 0, 1.0 - err, 1.0).astype(np.float32)
  return fn


# ------------------------------------------------------------------------------------------
# Remote rewards: how users plug in a VLM judge (EditScore and the like) over HTTP.
# ------------------------------------------------------------------------------------------
def png_base64(image: np.ndarray) -> str:
  buf = io.BytesIO()
  Image.fromarray(np.asarray(image, np.uint8)).save(buf, format="PNG")
  return base64.b64encode(buf.getvalue()).decode("ascii")


METADATA_FIELDS = ("family", "task", "checklist")


@register("remote")
def remote_reward(world: World, url: str, timeout: float = 30.0, retries: int = 3,
                  backoff: float = 0.5, batch_size: int = 32) -> RewardFn:
  """POSTs JSON {"images", "source_images" (base64 PNG), "instructions", "metadata"} to
  `url` in chunks of `batch_size`; expects {"rewards": [float] * n}. Connection errors,
  timeouts and 5xx answers are retried `retries` times with exponential backoff; anything
  else raises RewardServerError naming the server and the problem."""
  if not url:
    raise ValueError("reward 'remote' needs a url (rewards.remote.url)")
  del world

  def post(payload: dict, n: int) -> np.ndarray:
    body = json.dumps(payload).encode()
    last = None
    for attempt in range(retries + 1):
      if attempt:
        time.sleep(backoff * 2 ** (attempt - 1))
      request = urllib.request.Request(url, data=body,
                                       headers={"Content-Type": "application/json"})
      try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
          answer = response.read()
        break
      except urllib.error.HTTPError as e:
        detail = e.read()[:200].decode(errors="replace")
        if e.code < 500:
          raise RewardServerError(f"reward server {url} refused the request: HTTP {e.code} "
                                  f"{detail}") from None
        last = f"HTTP {e.code} {detail}"
      except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
        last = str(getattr(e, "reason", e))
    else:
      raise RewardServerError(f"reward server {url} unreachable after {retries + 1} attempts "
                              f"(timeout {timeout}s): {last}")
    try:
      rewards = np.asarray(json.loads(answer)["rewards"], np.float32)
    except (ValueError, KeyError, TypeError) as e:
      raise RewardServerError(f"reward server {url} answered without a 'rewards' list of "
                              f"numbers: {answer[:200]!r} ({e})") from None
    if rewards.shape != (n,) or not np.all(np.isfinite(rewards)):
      raise RewardServerError(f"reward server {url} returned {rewards.shape} rewards "
                              f"(finite: {bool(np.all(np.isfinite(rewards)))}) for {n} images")
    return rewards

  def fn(images, prompts):
    out = []
    for i in range(0, len(images), batch_size):
      sl = slice(i, i + batch_size)
      payload = {
          "images": [png_base64(im) for im in images[sl]],
          "source_images": [png_base64(im) for im in prompts["source_image"][sl]],
          "instructions": [str(s) for s in prompts["instruction"][sl]],
          "metadata": [{k: str(prompts[k][j]) for k in METADATA_FIELDS if k in prompts}
                       for j in range(i, min(i + batch_size, len(images)))],
      }
      out.append(post(payload, len(payload["images"])))
    return np.concatenate(out) if out else np.zeros((0,), np.float32)
  return fn


@register("judge")
def judge_reward(world: World, **options) -> RewardFn:
  """A VLM judge behind an OpenAI-compatible chat-completions server: `jaxedit.judges`."""
  del world
  from jaxedit import judges  # it imports this module

  return judges.Judge(**options)


# ------------------------------------------------------------------------------------------
# Combining rewards.
# ------------------------------------------------------------------------------------------


class Rewards:
  """The weighted sum of the configured rewards; each runs in its own host thread.
  Rewards with weight 0 are not built."""

  def __init__(self, spec: Mapping[str, Mapping[str, Any]], world: World):
    self.weights, self.fns = {}, {}
    for name, options in spec.items():
      if name not in REGISTRY:
        raise ValueError(f"unknown reward {name!r}; registered: {sorted(REGISTRY)}")
      options = dict(options)
      weight = float(options.pop("weight", 1.0))
      if weight == 0.0:
        continue
      self.weights[name] = weight
      try:
        self.fns[name] = REGISTRY[name](world, **options)
      except TypeError as e:
        raise ValueError(f"bad options for reward {name!r}: {e}") from None
    if not self.fns:
      raise ValueError("no rewards configured: give at least one reward a nonzero weight, "
                       "e.g. --config.rewards.checklist.weight=1")
    self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=len(self.fns))

  def submit(self, images: np.ndarray, prompts: Mapping[str, Any]) -> "PendingRewards":
    """Starts every reward on the host and returns at once."""
    return PendingRewards({name: self._pool.submit(fn, images, prompts)
                           for name, fn in self.fns.items()}, self.weights)

  def __call__(self, images, prompts):
    return self.submit(images, prompts).result()

  @property
  def can_mask(self) -> bool:
    """Whether some reward may return NaN (mask a sample) rather than fail."""
    return any(getattr(fn, "can_mask", False) for fn in self.fns.values())


class PendingRewards:
  """Rewards being computed; `result()` waits: (weighted total (N,), {name: (N,)}). A sample
  masked (NaN) by any reward is NaN in the total: the weighted sum propagates it."""

  def __init__(self, futures: dict, weights: dict):
    self._futures, self._weights = futures, weights

  def result(self):
    parts = {name: np.asarray(f.result(), np.float32) for name, f in self._futures.items()}
    total = sum(self._weights[name] * parts[name] for name in parts)
    return np.asarray(total, np.float32), parts
