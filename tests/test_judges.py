"""The OpenAI-compatible VLM judge (`jaxedit.judges`) against fake servers on 127.0.0.1, and the
reference server (`jaxedit.judge_server`) serving a tiny random Qwen2-VL end to end.

Nothing here may hang: every request has a short deadline, every server started here is shut
down by its fixture, every thread is a daemon, and a watchdog ends the run (with the stacks)
if one test still takes over WATCHDOG_S."""

from __future__ import annotations

import base64
import faulthandler
import http.server
import io
import json
import math
import os
import select
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

from jaxedit import judges, rewards

WATCHDOG_S = 120
FAST = dict(timeout=2.0, backoff=0.01)  # Judge options: short deadline, short backoff


@pytest.fixture(autouse=True)
def watchdog():
  faulthandler.dump_traceback_later(WATCHDOG_S, exit=True)
  yield
  faulthandler.cancel_dump_traceback_later()


def batch(n: int = 2, seed: int = 0):
  """(edited images, prompts) of n random 12 x 16 samples."""
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (n, 12, 16, 3), np.uint8)
  prompts = {"source_image": rng.integers(0, 256, (n, 12, 16, 3), np.uint8),
             "instruction": [f"make shape {i} red" for i in range(n)]}
  return images, prompts


def chat(text: str) -> dict:
  return {"id": "x", "object": "chat.completion",
          "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                       "finish_reason": "stop"}]}


def top(pairs) -> dict:
  """A logprobs reply whose first token's top log-probs are `pairs` [(token, logprob)]."""
  reply = chat(pairs[0][0] if pairs else "")
  reply["choices"][0]["logprobs"] = {"content": [{
      "token": pairs[0][0] if pairs else "", "logprob": pairs[0][1] if pairs else 0.0,
      "top_logprobs": [{"token": t, "logprob": lp} for t, lp in pairs]}]}
  return reply


# ------------------------------------------------------------------------------------------
# Reading scores.
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, want", [
    ("The edit is clean.\nScore: 7", 7.0),
    ("Score: 3 at first; on reflection the hat is missing.\nScore: 2", 2.0),  # last wins
    ("**Score:** 7", 7.0),
    ("**Score**: 6.5", 6.5),
    ("final score = 10", 10.0),
    ("SCORE:0", 0.0),
    ("Score: .5/10", 0.5),
    ("Score: 8.", 8.0),
])
def test_text_score_reads_the_last_score(text, want):
  assert judges.text_score(chat(text)) == want


@pytest.mark.parametrize("text, match", [
    ("Score: 11", "score 11.0 is not a number from 0 to 10"),
    ("Score: -1", "score -1.0 is not a number from 0 to 10"),
    ("Score: NaN", "score nan is not a number from 0 to 10"),
    ("Score: inf", "score inf is not a number from 0 to 10"),
    ("Score: 7\nScore: 11", "score 11.0 is not"),  # the last one counts, even out of range
    ("A fine edit, 9 out of 10.", "no 'Score: N' in the reply"),
    ("", "no 'Score: N'"),
])
def test_text_score_rejects(text, match):
  with pytest.raises(judges.BadReply, match=match):
    judges.text_score(chat(text))


def test_text_score_needs_a_message():
  for reply in ({}, {"choices": []}, {"choices": [{"text": "Score: 3"}]}, [1]):
    with pytest.raises(judges.BadReply, match=r"no choices\[0\].message.content"):
      judges.text_score(reply)
  with pytest.raises(judges.BadReply, match="no 'Score: N' in the reply ''"):
    judges.text_score({"choices": [{"message": {"content": None}}]})


def test_logprob_score_is_the_renormalised_expectation():
  # p(7) = .5, p(8) = .25, p(9) = .05 ("x" is no digit): (3.5 + 2 + .45) / .8
  pairs = [("7", math.log(.5)), ("8", math.log(.25)), ("x", math.log(.2)), (" 9", math.log(.05))]
  assert judges.logprob_score(top(pairs)) == pytest.approx(5.95 / 0.8, rel=1e-12)
  # spaces around tokens are ignored, "10" counts, and "7" and " 7" add up: (2.1 + 1) / .6
  pairs = [(" 7", math.log(.2)), ("7", math.log(.1)), ("10 ", math.log(.1)), (" 0", math.log(.2)),
           ("-", math.log(.3))]
  assert judges.logprob_score(top(pairs)) == pytest.approx(3.1 / 0.6, rel=1e-12)
  # one digit only: its value, whatever its probability
  assert judges.logprob_score(top([("3", math.log(1e-3)), ("a", math.log(.9))])) == 3.0
  # -inf log-probs count for nothing
  assert judges.logprob_score(top([("4", 0.0), ("5", -math.inf)])) == 4.0


def test_logprob_score_rejects():
  with pytest.raises(judges.BadReply, match=r"none of the tokens 0..10 .*'Yes', 'No'"):
    judges.logprob_score(top([("Yes", -0.1), ("No", -2.5), ("11", -3.0)]))
  with pytest.raises(judges.BadReply, match="none of the tokens"):
    judges.logprob_score(top([]))
  with pytest.raises(judges.BadReply, match="log-prob 0.5 for token '7'"):
    judges.logprob_score(top([("7", 0.5)]))
  with pytest.raises(judges.BadReply, match="log-prob nan"):
    judges.logprob_score(top([("7", float("nan"))]))
  for reply in (chat("7"), {"choices": [{"logprobs": None}]},
                {"choices": [{"logprobs": {"content": [{"top_logprobs": [{"token": "7"}]}]}}]}):
    with pytest.raises(judges.BadReply, match=r"no choices\[0\].logprobs.content\[0\]"):
      judges.logprob_score(reply)


# ------------------------------------------------------------------------------------------
# Fake servers.
# ------------------------------------------------------------------------------------------
class Fake(http.server.BaseHTTPRequestHandler):
  """GET /v1/models lists `models`; each POST /v1/chat/completions takes the next of `script`
  (the last one repeats): a dict (200 with it as JSON), (status, dict or bytes), "hang" (read
  the request, never answer) or "trickle" (promise 10 kB, send a byte every 0.1 s)."""

  timeout = 10  # a client that stops sending does not hold a handler thread for ever
  models: list
  script: list
  posts: list
  gets: list
  stop: threading.Event

  def send(self, status: int, body):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    self.send_response(status)
    self.send_header("Content-Type", "application/json")
    self.send_header("Content-Length", str(len(data)))
    self.end_headers()
    self.wfile.write(data)

  def do_GET(self):
    self.gets.append(self.path)
    if self.models is None:  # a server with chat completions only
      self.send(404, {"error": {"message": "no such path"}})
    elif isinstance(self.models, dict):  # a listing of another shape
      self.send(200, self.models)
    elif self.path == "/v1/models":
      self.send(200, {"object": "list", "data": [{"id": m, "object": "model"}
                                                 for m in self.models]})
    else:
      self.send(404, {"error": {"message": "no such path"}})

  def do_POST(self):
    body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
    with lock:
      self.posts.append(body)
      action = self.script[min(len(self.posts), len(self.script)) - 1]
    if action == "hang":
      self.stop.wait(WATCHDOG_S)
    elif action == "trickle":
      self.send_response(200)
      self.send_header("Content-Length", "10000")
      self.end_headers()
      for _ in range(100):
        if self.stop.wait(0.1):
          break
        try:
          self.wfile.write(b" ")
          self.wfile.flush()
        except OSError:  # the client hung up: the deadline worked
          break
    elif isinstance(action, tuple):
      self.send(*action)
    else:
      self.send(200, action)

  def log_message(self, *args):
    pass


lock = threading.Lock()


class Server:
  """A Fake on 127.0.0.1:0 served by a daemon thread; `close()` stops it and wakes handlers."""

  def __init__(self, script=(), models=("judge-7b",)):
    self.stop = threading.Event()
    models = models if models is None or isinstance(models, dict) else list(models)
    self.handler = type("Handler", (Fake,), {"models": models, "script": list(script),
                                             "posts": [], "gets": [], "stop": self.stop})
    self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self.handler)
    self.httpd.daemon_threads = True
    self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
    threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                     daemon=True).start()

  @property
  def posts(self) -> list:
    return self.handler.posts

  def close(self):
    self.stop.set()
    self.httpd.shutdown()
    self.httpd.server_close()


@pytest.fixture
def serve():
  """serve(script, models) -> a running Server, closed after the test."""
  servers = []

  def start(script=(), models=("judge-7b",)):
    servers.append(Server(script, models))
    return servers[-1]

  yield start
  for server in servers:
    server.close()


@pytest.fixture
def closed_port() -> int:
  """A port nobody listens on: connections to it are refused."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


# ------------------------------------------------------------------------------------------
# The judge against fake servers.
# ------------------------------------------------------------------------------------------
def test_request_body_and_text_score(serve):
  server = serve([chat("Fine.\nScore: 7"), chat("Score: 2.5")])
  judge = judges.Judge(base_url=server.url + "/", score="text", **FAST)
  images, prompts = batch(2)
  got = judge(images, prompts)
  assert got.dtype == np.float32 and got.shape == (2,)
  # the pool may send them in either order; the server answers in arrival order
  np.testing.assert_array_equal(np.sort(got), np.float32([0.25, 0.7]))
  assert (judge.scored, judge.masked) == (2, 0)
  assert server.handler.gets == ["/v1/models"]  # the model, asked once
  assert len(server.posts) == 2
  for body in server.posts:
    assert body["model"] == "judge-7b"
    assert (body["max_tokens"], body["temperature"]) == (512, 0.0)
    assert "logprobs" not in body and "top_logprobs" not in body
    (message,) = body["messages"]
    assert message["role"] == "user"
    kinds = [part["type"] for part in message["content"]]
    assert kinds == ["text", "image_url", "text", "image_url", "text"]
    urls = [part["image_url"]["url"] for part in message["content"] if part["type"] ==
            "image_url"]
    assert all(url.startswith("data:image/png;base64,") for url in urls)
    source, edited = (np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",")[1]))))
                      for url in urls)
    i = [k for k in range(2) if np.array_equal(edited, images[k])]
    assert i and np.array_equal(source, prompts["source_image"][i[0]])
    rubric = message["content"][-1]["text"]
    assert rubric == judges.RUBRIC.replace("{instruction}", prompts["instruction"][i[0]])
  assert {p["messages"][0]["content"][-1]["text"] for p in server.posts} == {
      judges.RUBRIC.replace("{instruction}", s) for s in prompts["instruction"]}
  judge(images, prompts)
  assert server.handler.gets == ["/v1/models"]


def test_request_body_and_logprob_score(serve):
  server = serve([top([("8", math.log(.5)), ("6", math.log(.5))])])
  judge = judges.Judge(base_url=server.url, model="mine", score="logprobs", **FAST)
  images, prompts = batch(1)
  np.testing.assert_array_equal(judge(images, prompts), np.float32([0.7]))
  assert server.handler.gets == []  # a configured model is not asked for
  (body,) = server.posts
  assert body["model"] == "mine"
  assert (body["logprobs"], body["top_logprobs"], body["max_tokens"]) == (True, 20, 1)
  rubric = body["messages"][0]["content"][-1]["text"]
  assert rubric == judges.LOGPROBS_RUBRIC.replace("{instruction}", "make shape 0 red")
  assert "make shape 0 red" in rubric and rubric.endswith("and nothing else.")
  assert "Score: N" not in rubric


def test_auto_score_reads_the_text_else_the_first_tokens_logprobs(serve):
  """The default: the text rubric with log-probs asked; "Score: N" where the reply has one,
  else the expectation over the first token's top log-probs, else a retried bad reply."""
  with_text = top([("8", math.log(.5)), ("6", math.log(.5))])
  with_text["choices"][0]["message"]["content"] = "Good.\nScore: 3"
  digits_only = top([("8", math.log(.25)), ("4", math.log(.75))])
  neither = chat("I cannot tell.")
  server = serve([with_text, digits_only, neither])
  judge = judges.Judge(base_url=server.url, model="m", retries=0, on_failure="mask", **FAST)
  images, prompts = batch(1)
  got = [float(judge(images, prompts)[0]) for _ in range(3)]
  np.testing.assert_allclose(got[:2], [0.3, 0.5], rtol=1e-6)
  assert math.isnan(got[2]) and judge.masked == 1
  body = server.posts[0]
  assert (body["logprobs"], body["top_logprobs"], body["max_tokens"]) == (True, 20, 512)
  assert body["messages"][0]["content"][-1]["text"] == judges.RUBRIC.replace(
      "{instruction}", prompts["instruction"][0])


def test_a_server_without_a_model_list_gets_the_default_name(serve):
  """A server with POST /chat/completions alone (GET /models: 404) serves one model whatever
  its name: the judge asks it once, then sends UNLISTED_MODEL."""
  server = serve([chat("Score: 6")], models=None)
  judge = judges.Judge(base_url=server.url, **FAST)
  images, prompts = batch(2)
  np.testing.assert_array_equal(judge(images, prompts), np.float32([0.6, 0.6]))
  judge(images, prompts)
  assert server.handler.gets == ["/v1/models"]
  assert {p["model"] for p in server.posts} == {judges.UNLISTED_MODEL}


def test_several_models_and_none_configured_is_an_error(serve):
  server = serve([chat("Score: 5")], models=["judge-a", "judge-b"])
  judge = judges.Judge(base_url=server.url, on_failure="mask", **FAST)
  with pytest.raises(judges.JudgeError, match=r"serves 2 models \['judge-a', 'judge-b'\]: set "
                                              r"the judge's `model`"):
    judge(*batch(1))
  assert server.posts == []
  judge = judges.Judge(base_url=server.url, model="judge-b", **FAST)
  assert judge(*batch(1)).tolist() == [0.5]


def test_judge_down_errors_or_masks(closed_port):
  url = f"http://127.0.0.1:{closed_port}/v1"
  start = time.monotonic()
  judge = judges.Judge(base_url=url, model="m", retries=1, **FAST)
  with pytest.raises(judges.JudgeError, match=rf"judge {url} \(model m\): sample \d failed "
                                              r"after 2 attempts .*ConnectionRefusedError"):
    judge(*batch(2))
  judge = judges.Judge(base_url=url, model="m", retries=1, on_failure="mask", **FAST)
  got = judge(*batch(3))
  assert got.shape == (3,) and np.isnan(got).all()
  assert (judge.masked, judge.scored) == (3, 0)
  # without a model the listing fails first: the whole batch is masked (or an error)
  judge = judges.Judge(base_url=url, retries=1, on_failure="mask", **FAST)
  assert np.isnan(judge(*batch(2))).all() and judge.masked == 2
  assert np.isnan(judge(*batch(2))).all() and judge.masked == 4  # asked again: still down
  judge = judges.Judge(base_url=url, retries=0, **FAST)
  with pytest.raises(judges.JudgeError, match=r"GET /models failed after 1 attempts"):
    judge(*batch(2))
  assert time.monotonic() - start < 10


def test_hanging_server_is_cut_off_at_the_deadline():
  """A server that accepts (the kernel does, from its backlog) and never answers."""
  with socket.create_server(("127.0.0.1", 0), backlog=16) as listener:
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/v1"
    judge = judges.Judge(base_url=url, model="m", timeout=0.5, retries=1, backoff=0.01)
    start = time.monotonic()
    with pytest.raises(judges.JudgeError, match=r"failed after 2 attempts \(deadline 0.5 s "
                                                r"each\): TimeoutError"):
      judge(*batch(1))
    elapsed = time.monotonic() - start
    assert 1.0 <= elapsed < 4.0, elapsed  # two attempts of 0.5 s, then the error
    judge = judges.Judge(base_url=url, model="m", timeout=0.5, retries=1, backoff=0.01,
                         on_failure="mask")
    start = time.monotonic()
    got = judge(*batch(2))
    assert np.isnan(got).all() and judge.masked == 2
    assert time.monotonic() - start < 4.0  # the samples wait side by side


def test_trickling_and_silent_servers_are_cut_off(serve):
  for action in ("trickle", "hang"):
    server = serve([action])
    judge = judges.Judge(base_url=server.url, model="m", timeout=0.5, retries=1, backoff=0.01)
    start = time.monotonic()
    with pytest.raises(judges.JudgeError, match="no complete answer within the 0.5 s deadline"):
      judge(*batch(1))
    elapsed = time.monotonic() - start
    assert 1.0 <= elapsed < 4.0, (action, elapsed)
    assert len(server.posts) == 2  # retried once


def test_garbage_and_wrong_shapes_are_retried(serve):
  server = serve([(200, b"<html>busy</html>"), {"nothing": 1}, chat("no score"),
                  chat("Score: 9")])
  judge = judges.Judge(base_url=server.url, model="m", retries=3, **FAST)
  assert judge(*batch(1)).tolist() == [pytest.approx(0.9)]
  assert len(server.posts) == 4
  for reply, match in (((200, b"<html>busy</html>"), "the reply is not JSON: '<html>busy"),
                       ({"nothing": 1}, r"no choices\[0\].message.content in the reply"),
                       ({"choices": "x"}, r"no choices\[0\]")):
    server = serve([reply])
    judge = judges.Judge(base_url=server.url, model="m", retries=2, **FAST)
    with pytest.raises(judges.JudgeError, match=rf"failed after 3 attempts .*: {match}"):
      judge(*batch(1))
    assert len(server.posts) == 3
  server = serve(models={"data": "x"})  # a listing of the wrong shape
  judge = judges.Judge(base_url=server.url, retries=1, on_failure="mask", **FAST)
  assert np.isnan(judge(*batch(1))).all()


@pytest.mark.parametrize("status", [500, 502, 503, 429, 408])
def test_busy_or_failing_server_is_retried(serve, status):
  server = serve([(status, {"error": {"message": "try later"}})] * 2 + [chat("Score: 4")])
  judge = judges.Judge(base_url=server.url, model="m", retries=2, **FAST)
  assert judge(*batch(1)).tolist() == [pytest.approx(0.4)]
  assert len(server.posts) == 3
  server = serve([(status, {"error": {"message": "try later"}})])
  judge = judges.Judge(base_url=server.url, model="m", retries=2, **FAST)
  with pytest.raises(judges.JudgeError, match=rf"after 3 attempts .*: HTTP {status}: try later"):
    judge(*batch(1))
  assert len(server.posts) == 3


@pytest.mark.parametrize("on_failure", ["error", "mask"])
def test_bad_request_raises_at_once(serve, on_failure):
  server = serve([(400, {"error": {"message": "The model `m` does not exist.",
                                   "type": "invalid_request_error", "code": 400}})])
  judge = judges.Judge(base_url=server.url, model="m", retries=3, on_failure=on_failure,
                       **FAST)
  with pytest.raises(judges.JudgeError, match=r"refused POST /chat/completions: HTTP 400: "
                                              r"The model `m` does not exist."):
    judge(*batch(1))
  assert len(server.posts) == 1 and judge.masked == 0
  server = serve([(401, b"no key")])  # vLLM's older {"message"} or any body
  judge = judges.Judge(base_url=server.url, model="m", retries=3, on_failure=on_failure,
                       api_key="sk-test", **FAST)
  with pytest.raises(judges.JudgeError, match="HTTP 401: no key"):
    judge(*batch(1))
  assert len(server.posts) == 1


@pytest.mark.parametrize("reply", [chat("Score: NaN"), chat("Score: 11"), chat("Score: -1"),
                                   top([("7", float("nan"))]), top([("7", 0.3)])])
def test_unusable_scores_are_retried_then_masked_never_zero(serve, reply):
  score = "logprobs" if "logprobs" in reply["choices"][0] else "text"
  server = serve([reply])
  judge = judges.Judge(base_url=server.url, model="m", score=score, retries=2,
                       on_failure="mask", **FAST)
  got = judge(*batch(2))
  assert np.isnan(got).all() and (judge.masked, judge.scored) == (2, 0)
  assert len(server.posts) == 6  # 3 attempts each
  judge = judges.Judge(base_url=server.url, model="m", score=score, retries=1, **FAST)
  with pytest.raises(judges.JudgeError, match="failed after 2 attempts"):
    judge(*batch(1))
  good = chat("Score: 6") if score == "text" else top([("6", 0.0)])
  server = serve([reply, good])  # a bad reply, then a good one: the good one counts
  judge = judges.Judge(base_url=server.url, model="m", score=score, retries=1, **FAST)
  assert judge(*batch(1)).tolist() == [pytest.approx(0.6)]


def test_judge_options_are_checked():
  for options, match in (({"score": "digits"}, "score must be one of"),
                         ({"on_failure": "skip"}, "on_failure must be one of"),
                         ({"timeout": 0}, "timeout > 0"),
                         ({"rubric": "Rate it."}, r"\{instruction\} placeholder"),
                         ({"base_url": "localhost:8000"}, "must be http")):
    with pytest.raises(ValueError, match=match):
      judges.Judge(**options)


def test_through_the_rewards_registry(serve):
  server = serve([chat("Score: 5")])
  fn = rewards.Rewards({"judge": {"weight": 2.0, "base_url": server.url, "on_failure": "mask",
                                  **FAST}}, None)
  assert fn.can_mask
  total, parts = fn(*batch(2))
  np.testing.assert_allclose(parts["judge"], [0.5, 0.5])
  np.testing.assert_allclose(total, [1.0, 1.0])
  server.handler.script[:] = [(503, b"down")]
  total, parts = fn(*batch(2))  # masked samples are NaN in the total too
  assert np.isnan(total).all() and np.isnan(parts["judge"]).all()
  with pytest.raises(ValueError, match="bad options for reward 'judge'"):
    rewards.Rewards({"judge": {"url": server.url}}, None)


# ------------------------------------------------------------------------------------------
# The reference server with a tiny random Qwen2-VL.
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def qwen_folder(tmp_path_factory):
  pytest.importorskip("torch")
  sys.path.insert(0, os.path.dirname(__file__))
  try:
    import tiny_qwen2_vl
  finally:
    sys.path.pop(0)
  return tiny_qwen2_vl.write_model(str(tmp_path_factory.mktemp("tiny_qwen2_vl")))


@pytest.fixture(scope="module")
def reference(qwen_folder):
  """(engine, url) of a judge_server on 127.0.0.1:0, shut down after the module."""
  from jaxedit import judge_server

  engine = judge_server.Engine(qwen_folder, served_name="tiny-judge", device="cpu")
  server = judge_server.make_server(engine, port=0)
  threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                   daemon=True).start()
  yield engine, server.url
  server.shutdown()
  server.server_close()


def post(url: str, body, timeout: float = 60) -> tuple[int, dict]:
  data = body if isinstance(body, bytes) else json.dumps(body).encode()
  request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
  try:
    with urllib.request.urlopen(request, timeout=timeout) as response:
      return response.status, json.loads(response.read())
  except urllib.error.HTTPError as e:
    return e.code, json.loads(e.read())


def get(url: str) -> tuple[int, dict]:
  try:
    with urllib.request.urlopen(url, timeout=10) as response:
      return response.status, json.loads(response.read())
  except urllib.error.HTTPError as e:
    return e.code, json.loads(e.read())


def data_url(image: np.ndarray) -> str:
  return "data:image/png;base64," + rewards.png_base64(image)


def test_reference_server_scores_with_logprobs(reference):
  _, url = reference
  assert get(url + "/models") == (200, {"object": "list", "data": [
      {"id": "tiny-judge", "object": "model", "owned_by": "jaxedit"}]})
  judge = judges.Judge(base_url=url, score="logprobs", timeout=60, retries=0,
                       max_concurrency=2)
  got = judge(*batch(2))
  assert judge.model == "tiny-judge" and judge.scored == 2
  assert got.shape == (2,) and np.all(np.isfinite(got)) and np.all((got >= 0) & (got <= 1))
  text = judges.Judge(base_url=url, model="tiny-judge", score="text", timeout=60, retries=0,
                      max_tokens=4)
  with pytest.raises(judges.JudgeError, match="no 'Score: N' in the reply"):
    text(*batch(1))  # a tiny random model says no "Score: N": an error, not a zero
  # The default reads such a reply by its first token's log-probs instead.
  auto = judges.Judge(base_url=url, model="tiny-judge", timeout=60, retries=0, max_tokens=4)
  got = auto(*batch(1))
  assert auto.scored == 1 and np.isfinite(got).all() and 0 <= got[0] <= 1


def test_reference_server_logprobs_are_valid(reference):
  _, url = reference
  images, prompts = batch(1)
  body = {"model": "tiny-judge", "max_tokens": 4, "temperature": 0, "logprobs": True,
          "top_logprobs": 5, "messages": [
              {"role": "system", "content": "You are a judge."},
              {"role": "user", "content": [
                  {"type": "image_url", "image_url": {"url": data_url(prompts["source_image"][0])}},
                  {"type": "image_url", "image_url": {"url": data_url(images[0])}},
                  {"type": "text", "text": "Rate the edit from 0 to 10."}]}]}
  status, reply = post(url + "/chat/completions", body)
  assert status == 200, reply
  assert reply["object"] == "chat.completion" and reply["model"] == "tiny-judge"
  (choice,) = reply["choices"]
  assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
  assert choice["finish_reason"] in ("stop", "length")
  content = choice["logprobs"]["content"]
  usage = reply["usage"]
  assert len(content) == usage["completion_tokens"] <= 4
  assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
  for entry in content:
    logprobs = [t["logprob"] for t in entry["top_logprobs"]]
    assert len(logprobs) == 5 and all(lp <= 0 for lp in logprobs)
    assert logprobs == sorted(logprobs, reverse=True)
    assert sum(math.exp(lp) for lp in logprobs) <= 1 + 1e-6
    assert entry["top_logprobs"][0]["token"] == entry["token"]  # greedy: the likeliest
    assert entry["top_logprobs"][0]["logprob"] == pytest.approx(entry["logprob"], abs=1e-6)
    assert entry["bytes"] == list(entry["token"].encode())


def test_reference_server_greedy_text_matches_generate(reference, qwen_folder):
  import torch

  from jaxedit import judge_server

  engine, url = reference
  images, prompts = batch(1, seed=3)
  body = {"max_tokens": 6, "temperature": 0, "messages": [{"role": "user", "content": [
      {"type": "text", "text": "Source:"},
      {"type": "image_url", "image_url": {"url": data_url(prompts["source_image"][0])}},
      {"type": "text", "text": "Edited:"},
      {"type": "image_url", "image_url": {"url": data_url(images[0])}},
      {"type": "text", "text": "Score the edit."}]}]}
  first = post(url + "/chat/completions", body)
  second = post(url + "/chat/completions", body)
  assert first[0] == second[0] == 200
  text = first[1]["choices"][0]["message"]["content"]
  assert second[1]["choices"][0]["message"]["content"] == text
  assert first[1]["choices"][0]["logprobs"] is None
  # the same generation, run directly
  processor = judge_server.load_processor(qwen_folder)
  chat_messages = [{"role": "user", "content": [
      {"type": "text", "text": "Source:"}, {"type": "image"}, {"type": "text", "text": "Edited:"},
      {"type": "image"}, {"type": "text", "text": "Score the edit."}]}]
  prompt = processor.apply_chat_template(chat_messages, tokenize=False,
                                         add_generation_prompt=True)
  inputs = processor(text=[prompt], images=[Image.fromarray(prompts["source_image"][0]),
                                            Image.fromarray(images[0])], return_tensors="pt")
  with engine.lock, torch.inference_mode():
    out = engine.model.generate(**inputs, max_new_tokens=6, do_sample=False)
  new = out[0, inputs["input_ids"].shape[1]:]
  assert text == processor.tokenizer.decode(new, skip_special_tokens=True)
  assert first[1]["usage"]["completion_tokens"] == len(new)
  assert first[1]["usage"]["prompt_tokens"] == inputs["input_ids"].shape[1]
  # a plain string content is a text part
  status, reply = post(url + "/chat/completions", {
      "messages": [{"role": "user", "content": "Score: "}], "max_tokens": 2, "temperature": 0})
  assert status == 200 and reply["usage"]["completion_tokens"] <= 2
  # sampling with a seed repeats itself
  body.update(temperature=1.0, seed=7)
  assert (post(url + "/chat/completions", body)[1]["choices"][0]["message"]
          == post(url + "/chat/completions", body)[1]["choices"][0]["message"])


@pytest.mark.parametrize("body, match", [
    (b"{not json", "the body is not JSON"),
    ([1, 2], "must be a JSON object"),
    ({}, "needs `messages`"),
    ({"messages": []}, "needs `messages`"),
    ({"messages": [{"content": "hi"}]}, r"messages\[0\] needs a role"),
    ({"messages": [{"role": "user", "content": 3}]}, "a string or a list of parts"),
    ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]},
     r"messages\[0\].content\[0\] must be"),
    ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}]}]},
     r"only data:image/...;base64, URLs are served .* 'http://example.com/a.png'"),
    ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}]}]},
     "not a readable image"),
    ({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]},
     "model 'gpt-4o' is not served here; this server serves 'tiny-judge'"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 21, "logprobs": True},
     "top_logprobs must be an integer from 0 to 20"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2},
     "top_logprobs needs logprobs: true"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens must be"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, "temperature must"),
    ({"messages": [{"role": "user", "content": "hi"}], "stream": True}, "without streaming"),
])
def test_reference_server_bad_requests_get_400(reference, body, match):
  import re

  _, url = reference
  status, reply = post(url + "/chat/completions", body)
  assert status == 400
  assert set(reply) == {"error"} and set(reply["error"]) == {"message", "type", "code"}
  assert reply["error"]["type"] == "invalid_request_error" and reply["error"]["code"] == 400
  assert re.search(match, reply["error"]["message"]), reply["error"]["message"]


def test_reference_server_unknown_paths_and_models(reference):
  _, url = reference
  for status, reply in (get(url + "/nothing"), get(url.rsplit("/v1", 1)[0] + "/models"),
                        post(url + "/completions", {"prompt": "hi"})):
    assert status == 404 and reply["error"]["code"] == 404
    assert reply["error"]["message"].startswith("no route")
  judge = judges.Judge(base_url=url, model="other", on_failure="mask", **FAST)
  with pytest.raises(judges.JudgeError, match="HTTP 400: bad request: model 'other' is not "
                                              "served here"):
    judge(*batch(1))


def test_reference_server_main_prints_its_url(qwen_folder):
  """`python -m jaxedit.judge_server --model DIR --port 0` prints the URL it serves."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.Popen([sys.executable, "-m", "jaxedit.judge_server", "--model", qwen_folder,
                           "--port", "0", "--served_name", "cli-judge"], cwd=root,
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
  try:
    ready, _, _ = select.select([proc.stdout], [], [], 90)
    assert ready, "no URL printed within 90 s"
    line = proc.stdout.readline().strip()
    assert line.startswith("serving cli-judge at http://127.0.0.1:") and line.endswith("/v1")
    assert get(line.split(" at ")[1] + "/models")[1]["data"][0]["id"] == "cli-judge"
  finally:
    proc.kill()
    proc.wait(10)
