"""The reward library: shapes rewards on rendered scenes, and the remote client against a
loopback HTTP server."""

import base64
import http.server
import io
import json
import socket
import threading

import numpy as np
import pytest
from PIL import Image

from jaxedit import rewards, schema
from jaxedit.data.examples import generate
from jaxedit.shapes.world import World

WORLD = World()


@pytest.fixture(scope="module")
def prompts():
  records = list(generate(WORLD, "train", 6, 0, seed=3))
  fields = ("instruction", "checklist", "family", "task")
  out = {k: [r[k] for r in records] for k in fields}
  for k in ("source_image", "target_image", "source_scene", "target_scene"):
    out[k] = np.stack([r[k] for r in records])
  return out


def test_checklist_and_preservation_on_targets_and_sources(prompts):
  fn = rewards.Rewards({"checklist": {"weight": 1.0}, "preservation": {"weight": 0.5}}, WORLD)
  total, parts = fn(prompts["target_image"], prompts)
  np.testing.assert_array_equal(parts["checklist"], 1.0)  # the target satisfies its checklist
  np.testing.assert_array_equal(parts["preservation"], 1.0)
  np.testing.assert_allclose(total, 1.5)
  # Returning the source preserves everything but fails the edit items.
  total, parts = fn(prompts["source_image"], prompts)
  np.testing.assert_array_equal(parts["preservation"], 1.0)
  assert np.all(parts["checklist"] < 1.0)
  strict = rewards.REGISTRY["checklist"](WORLD, strict=True)
  np.testing.assert_array_equal(strict(prompts["source_image"], prompts), 0.0)


def test_preservation_counts_only_untouched_cells(prompts):
  fn = rewards.REGISTRY["preservation"](WORLD)
  images = prompts["target_image"].copy()
  mask = rewards.untouched_mask(prompts["source_scene"], prompts["target_scene"], WORLD)
  images[~mask] = 255  # scribbling over the edited cells costs nothing
  np.testing.assert_array_equal(fn(images, prompts), 1.0)
  images = prompts["target_image"].copy()
  images[0][mask[0]] = 255 - prompts["source_image"][0][mask[0]]  # inverting the rest: 0
  got = fn(images, prompts)
  want = 1 - np.abs(images[0].astype(float) - prompts["source_image"][0])[mask[0]].mean() / 255
  np.testing.assert_allclose(got[0], want, rtol=1e-5)
  np.testing.assert_array_equal(got[1:], 1.0)


def test_config_errors_name_the_problem():
  with pytest.raises(ValueError, match="unknown reward 'aesthetic'.*checklist"):
    rewards.Rewards({"aesthetic": {}}, WORLD)
  with pytest.raises(ValueError, match="bad options for reward 'checklist'"):
    rewards.Rewards({"checklist": {"weight": 1.0, "temperature": 2}}, WORLD)
  with pytest.raises(ValueError, match="no rewards configured"):
    rewards.Rewards({}, WORLD)
  with pytest.raises(ValueError, match="no rewards configured"):
    rewards.Rewards({"checklist": {"weight": 0.0}}, WORLD)
  with pytest.raises(ValueError, match="needs a url"):
    rewards.Rewards({"remote": {"weight": 1.0, "url": ""}}, WORLD)


def test_config_section_builds_and_weight_zero_turns_a_reward_off():
  spec = schema.rewards().to_dict()
  assert set(spec) == set(rewards.REGISTRY)
  built = rewards.Rewards(spec, WORLD)
  assert set(built.fns) == {"checklist"}  # preservation and remote have weight 0
  spec["preservation"]["weight"] = 0.5
  assert set(rewards.Rewards(spec, WORLD).fns) == {"checklist", "preservation"}


class _Judge(http.server.BaseHTTPRequestHandler):
  """Rewards each image by its mean brightness; fails the first `flaky` requests with 503."""

  flaky = 0
  requests = 0
  answer = None  # overrides the answer when set

  def do_POST(self):
    cls = type(self)
    cls.requests += 1
    payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
    if cls.requests <= cls.flaky:
      self.send_response(503)
      self.end_headers()
      self.wfile.write(b"busy")
      return
    assert len(payload["source_images"]) == len(payload["images"]) == len(payload["metadata"])
    scores = [float(np.asarray(Image.open(io.BytesIO(base64.b64decode(s)))).mean() / 255)
              for s in payload["images"]]
    body = json.dumps(cls.answer if cls.answer is not None else {"rewards": scores}).encode()
    self.send_response(200)
    self.send_header("Content-Type", "application/json")
    self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    self.wfile.write(body)

  def log_message(self, *args):
    pass


@pytest.fixture
def judge():
  handler = type("Judge", (_Judge,), {"flaky": 0, "requests": 0, "answer": None})
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  yield handler, f"http://127.0.0.1:{server.server_address[1]}/score"
  server.shutdown()
  server.server_close()


def test_remote_reward_round_trip_in_chunks_with_retries(judge, prompts):
  handler, url = judge
  handler.flaky = 2  # two 503s, then answers
  fn = rewards.REGISTRY["remote"](WORLD, url=url, timeout=5, retries=3, backoff=0.01,
                                  batch_size=4)
  got = fn(prompts["target_image"], prompts)
  want = prompts["target_image"].reshape(6, -1).mean(1) / 255
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert handler.requests == 4  # 2 refused + 2 chunks (4 + 2 images)


def test_remote_reward_errors_are_clear(judge, prompts):
  handler, url = judge
  handler.answer = {"rewards": [1.0]}
  fn = rewards.REGISTRY["remote"](WORLD, url=url, timeout=5, retries=0)
  with pytest.raises(rewards.RewardServerError, match=r"returned \(1,\) rewards .* for 6"):
    fn(prompts["target_image"], prompts)
  handler.answer = {"score": 3}
  with pytest.raises(rewards.RewardServerError, match="without a 'rewards' list"):
    fn(prompts["target_image"], prompts)
  handler.flaky = 100
  fn = rewards.REGISTRY["remote"](WORLD, url=url, timeout=5, retries=1, backoff=0.01)
  with pytest.raises(rewards.RewardServerError, match="unreachable after 2 attempts.*HTTP 503"):
    fn(prompts["target_image"], prompts)


def test_unreachable_server_fails_fast_and_names_it(prompts):
  with socket.socket() as s:  # a port nobody listens on
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  url = f"http://127.0.0.1:{port}/score"
  fn = rewards.Rewards({"remote": {"url": url, "timeout": 1, "retries": 1, "backoff": 0.01}},
                       WORLD)
  with pytest.raises(rewards.RewardServerError, match=f"reward server {url} unreachable"):
    fn(prompts["target_image"], prompts)
