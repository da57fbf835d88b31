"""A VLM judge behind an OpenAI-compatible chat-completions server, as a reward.

    config.rewards.judge = {"weight": 1.0, "base_url": "http://judge:8000/v1",
                            "score": "logprobs", "on_failure": "mask"}

`vllm serve Qwen/Qwen2.5-VL-7B-Instruct`, SGLang, or `python -m jaxedit.judge_server
--model DIR` serve `POST {base_url}/chat/completions`. Each sample is one request: a user
message with the source image, the edited image (PNG data URLs) and the rubric, asking for a
0-10 rating of instruction following, preservation of the rest of the source and quality.
`score="text"` reads the last "Score: N" of the reply; `score="logprobs"` asks for one token
with its top 20 log-probs and takes the expectation over the tokens "0".."10" among them,
renormalised over those present (Edit-R1's reward), which is smoother than a sampled digit;
`score="auto"` (the default) asks as "text" does, with the log-probs, and reads the "Score: N"
or, in a reply without one, the log-probs of its first token. The reward is score / 10, in
[0, 1].

Every request has an overall deadline (`timeout`: a server that trickles bytes is cut off
too) and is retried with exponential backoff and jitter on connection errors, timeouts,
truncated bodies, HTTP 408, 429 and 5xx, and on replies without a usable score; any other
4xx raises at once (the request is wrong: model name, key, payload), whatever `on_failure`.
A sample that fails every attempt raises a JudgeError (`on_failure="error"`) or is masked
(`"mask"`): its reward is NaN, counted in `Judge.masked`, and GRPO leaves it out of its
group's statistics with zero advantage (`jaxedit.grpo.group_advantages`). Without a `model`
configured the judge asks `GET {base_url}/models` first; if that fails every attempt, the
whole batch fails the same way (masked, or an error), and the next call asks again.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import logging
import math
import os
import random
import re
import socket
import threading
import time
import urllib.parse
from typing import Any, Callable, Mapping

import numpy as np

from jaxedit.rewards import RewardServerError, png_base64

RUBRIC = """\
The first image is a source image; the second is the result of editing it with this \
instruction:

{instruction}

Rate the edit from 0 to 10, weighing together:
- instruction following: does the edited image do what the instruction asks, fully and \
exactly?
- preservation: is everything in the source image that the instruction does not ask to \
change kept as it was?
- quality: is the edited image free of artifacts, distortions and blur?
0 means the instruction is ignored or the image is ruined; 10 means a perfect edit. Explain \
briefly, then end your reply with a line "Score: N", where N is your rating from 0 to 10."""

# With score="logprobs" the first token of the reply is the rating.
LOGPROBS_RUBRIC = RUBRIC.rsplit("Explain", 1)[0] + (
    "Answer with the rating alone, a whole number from 0 to 10, and nothing else.")

SCORES = ("auto", "text", "logprobs")
ON_FAILURE = ("error", "mask")
TOP_LOGPROBS = 20
DIGITS = {str(k): k for k in range(11)}
SCORE_RE = re.compile(r"score\**\s*[:=]\s*\**\s*([-+]?(?:\d+(?:\.\d*)?|\.\d+)|nan|[-+]?inf)",
                      re.IGNORECASE)


class JudgeError(RewardServerError):
  """The judge server could not be reached, refused a request or gave no usable score."""


class NotServed(JudgeError):
  """The server has no such endpoint (HTTP 404 / 405)."""


# The model name sent to a server that lists no models (no GET /models): such a server serves
# one model whatever the name.
UNLISTED_MODEL = "default"


class BadReply(Exception):
  """A failed attempt worth retrying: a busy or failing server, or a reply without a
  usable score."""


def excerpt(text: str, limit: int = 200) -> str:
  text = str(text)
  return repr(text if len(text) <= limit else text[:limit // 2] + " ... " + text[-limit // 2:])


# ------------------------------------------------------------------------------------------
# Reading a score out of a chat completion.
# ------------------------------------------------------------------------------------------
def checked(score: float, source: str) -> float:
  if not math.isfinite(score) or not 0.0 <= score <= 10.0:
    raise BadReply(f"score {score} is not a number from 0 to 10 in {source}")
  return score


def reply_text(reply: Mapping) -> str:
  try:
    return str(reply["choices"][0]["message"]["content"] or "")
  except (KeyError, IndexError, TypeError):
    raise BadReply(f"no choices[0].message.content in the reply {excerpt(reply)}") from None


def text_score(reply: Mapping) -> float:
  """The last "Score: N" of the reply's text."""
  text = reply_text(reply)
  found = SCORE_RE.findall(text)
  if not found:
    raise BadReply(f"no 'Score: N' in the reply {excerpt(text)}")
  return checked(float(found[-1]), f"the reply {excerpt(text)}")


def logprob_score(reply: Mapping) -> float:
  """The expected rating under the first token's top log-probs: sum_k k p(k) / sum_k p(k)
  over the tokens "0".."10" among them (surrounding spaces ignored). vLLM's shape:
  choices[0].logprobs.content[0].top_logprobs = [{"token": "7", "logprob": -0.1}, ...]."""
  try:
    top = reply["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
    pairs = [(str(t["token"]).strip(), float(t["logprob"])) for t in top]
  except (KeyError, IndexError, TypeError, ValueError):
    raise BadReply("no choices[0].logprobs.content[0].top_logprobs list of {token, logprob} "
                   f"in the reply {excerpt(reply)}") from None
  probs = np.zeros(len(DIGITS))
  for token, logprob in pairs:
    if token in DIGITS:
      if math.isnan(logprob) or logprob > 0:
        raise BadReply(f"log-prob {logprob} for token {token!r}")
      probs[DIGITS[token]] += math.exp(logprob)
  if probs.sum() <= 0:
    raise BadReply(f"none of the tokens 0..10 among the top log-probs "
                   f"{excerpt([t for t, _ in pairs])}; the reply {excerpt(reply_text(reply))}")
  return checked(float(probs @ np.arange(len(DIGITS)) / probs.sum()), "the log-probs")


def auto_score(reply: Mapping) -> float:
  """The reply's last "Score: N"; where it has none, the expectation over the first token's
  top log-probs (a judge that answered with the rating alone)."""
  try:
    return text_score(reply)
  except BadReply as text_failed:
    try:
      return logprob_score(reply)
    except BadReply as logprobs_failed:
      raise BadReply(f"{text_failed}; and by log-probs: {logprobs_failed}") from None


SCORERS: dict[str, Callable[[Mapping], float]] = {"auto": auto_score, "text": text_score,
                                                  "logprobs": logprob_score}


# ------------------------------------------------------------------------------------------
# HTTP with an overall deadline.
# ------------------------------------------------------------------------------------------
class Client:
  """Requests to one server, each cut off `timeout` seconds after it starts whatever the
  server does: a watchdog shuts the socket down at the deadline (socket timeouts alone
  bound each read, so a server trickling a byte a second would hold a request forever)."""

  def __init__(self, base_url: str, api_key: str, timeout: float):
    parts = urllib.parse.urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
      raise ValueError(f"judge base_url {base_url!r} must be http(s)://host[:port]/prefix, "
                       "e.g. http://localhost:8000/v1")
    self.connection = (http.client.HTTPSConnection if parts.scheme == "https"
                       else http.client.HTTPConnection)
    self.host, self.port, self.prefix = parts.hostname, parts.port, parts.path.rstrip("/")
    self.headers = {"Content-Type": "application/json"}
    if api_key:
      self.headers["Authorization"] = f"Bearer {api_key}"
    self.timeout = timeout

  def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    """(HTTP status, body). Raises OSError or http.client.HTTPException (TimeoutError past
    the deadline, IncompleteRead for a truncated body)."""
    conn = self.connection(self.host, self.port, timeout=self.timeout)
    expired = threading.Event()
    # The socket, kept here: `conn.sock` is None once getresponse() sees a response that
    # closes the connection (HTTP/1.0, "Connection: close"), while its body is still read.
    sockets: list[socket.socket] = []

    def expire():
      expired.set()
      for sock in sockets:
        try:
          sock.shutdown(socket.SHUT_RDWR)  # wakes a blocked read
        except OSError:
          pass

    watchdog = threading.Timer(self.timeout, expire)
    watchdog.daemon = True
    watchdog.start()
    try:
      conn.connect()
      sockets.append(conn.sock)
      if expired.is_set():  # the deadline passed while connecting, before shutdown could act
        raise TimeoutError
      conn.request(method, self.prefix + path, body=body, headers=self.headers)
      response = conn.getresponse()
      data = response.read()
      if expired.is_set():
        raise TimeoutError
      return response.status, data
    except (OSError, http.client.HTTPException):
      if expired.is_set():
        raise TimeoutError(f"no complete answer within the {self.timeout} s deadline") from None
      raise
    finally:
      watchdog.cancel()
      conn.close()


def error_message(data: bytes) -> str:
  """The message of an OpenAI-style error body ({"error": {"message"}} or vLLM's older
  {"message"}), else the body's start."""
  try:
    body = json.loads(data)
    error = body.get("error", body)
    return str(error.get("message", error) if isinstance(error, dict) else error)[:300]
  except (ValueError, AttributeError):
    return data[:300].decode(errors="replace")


class Failed(Exception):
  """Every attempt at a request failed; args: (attempts, last cause)."""


# ------------------------------------------------------------------------------------------
# The reward.
# ------------------------------------------------------------------------------------------
class Judge:
  """The reward fn: `judge(images, prompts)` -> (N,) float32 scores / 10, NaN where masked.
  `masked` counts the samples masked so far, `scored` those scored."""

  def __init__(self, base_url: str = "http://localhost:8000/v1", model: str = "",
               api_key: str = "", api_key_env: str = "OPENAI_API_KEY", rubric: str = "",
               score: str = "auto", max_tokens: int = 0, temperature: float = 0.0,
               max_concurrency: int = 8, timeout: float = 60.0, retries: int = 3,
               backoff: float = 1.0, on_failure: str = "error"):
    if score not in SCORES:
      raise ValueError(f"judge score must be one of {SCORES}, got {score!r}")
    if on_failure not in ON_FAILURE:
      raise ValueError(f"judge on_failure must be one of {ON_FAILURE}, got {on_failure!r}")
    if max_concurrency < 1 or retries < 0 or timeout <= 0:
      raise ValueError("judge needs max_concurrency >= 1, retries >= 0 and timeout > 0")
    self.rubric = rubric or (LOGPROBS_RUBRIC if score == "logprobs" else RUBRIC)
    if "{instruction}" not in self.rubric:
      raise ValueError("the judge rubric needs an {instruction} placeholder")
    self.base_url, self.model, self.score = base_url.rstrip("/"), model, score
    self.client = Client(base_url, api_key or os.environ.get(api_key_env or "", ""), timeout)
    self.max_tokens = max_tokens or (1 if score == "logprobs" else 512)
    self.temperature, self.retries, self.backoff = temperature, retries, backoff
    self.on_failure = on_failure
    self.masked = self.scored = 0
    self._lock = threading.Lock()
    self._pool = concurrent.futures.ThreadPoolExecutor(max_concurrency,
                                                       thread_name_prefix="judge")

  @property
  def can_mask(self) -> bool:
    return self.on_failure == "mask"

  def __call__(self, images: np.ndarray, prompts: Mapping[str, Any]) -> np.ndarray:
    try:
      model = self.model_name()
    except Failed as e:  # the server is down or failing: every sample would fail the same way
      cause = (f"judge {self.base_url}: GET /models failed after {e.args[0]} attempts "
               f"(deadline {self.client.timeout} s each): {e.args[1]}")
      if self.on_failure == "error":
        raise JudgeError(cause) from None
      logging.warning("masked %d samples: %s", len(images), cause)
      with self._lock:
        self.masked += len(images)
      return np.full(len(images), np.nan, np.float32)
    futures = [self._pool.submit(self.score_sample, i, model, images[i],
                                 prompts["source_image"][i], str(prompts["instruction"][i]))
               for i in range(len(images))]
    done, pending = concurrent.futures.wait(futures,
                                            return_when=concurrent.futures.FIRST_EXCEPTION)
    for f in pending:
      f.cancel()
    return np.asarray([f.result() for f in futures], np.float32)

  def model_name(self) -> str:
    """The configured model, else the only one `GET {base_url}/models` lists (asked until it
    answers; Failed if it does not), else, where the server has no /models, UNLISTED_MODEL.
    Several listed and none configured is an error: a judge must not be picked by chance."""
    with self._lock:
      if not self.model:
        try:
          ids = self.exchange("GET", "/models", None,
                              lambda body: [m["id"] for m in body["data"]])
        except NotServed as e:
          logging.warning("%s; asking for model %r (set the judge's `model` option to name "
                          "one)", e, UNLISTED_MODEL)
          ids = [UNLISTED_MODEL]
        if len(ids) != 1:
          raise JudgeError(f"judge {self.base_url} serves {len(ids)} models {ids}: set the "
                           "judge's `model` option to one of them")
        self.model = ids[0]
      return self.model

  def request_body(self, model: str, image, source, instruction: str) -> dict:
    image_part = lambda im: {"type": "image_url",
                             "image_url": {"url": "data:image/png;base64," + png_base64(im)}}
    content = [{"type": "text", "text": "Source image:"}, image_part(source),
               {"type": "text", "text": "Edited image:"}, image_part(image),
               {"type": "text", "text": self.rubric.replace("{instruction}", instruction)}]
    body = {"model": model, "messages": [{"role": "user", "content": content}],
            "max_tokens": self.max_tokens, "temperature": self.temperature}
    if self.score in ("logprobs", "auto"):
      body.update(logprobs=True, top_logprobs=TOP_LOGPROBS)
    return body

  def score_sample(self, i: int, model: str, image, source, instruction: str) -> float:
    """Sample i's reward in [0, 1], or NaN when masked."""
    body = self.request_body(model, image, source, instruction)
    try:
      score = self.exchange("POST", "/chat/completions", body, SCORERS[self.score])
    except Failed as e:
      cause = (f"judge {self.base_url} (model {model}): sample {i} failed after {e.args[0]} "
               f"attempts (deadline {self.client.timeout} s each): {e.args[1]}")
      if self.on_failure == "error":
        raise JudgeError(cause) from None
      logging.warning("masked: %s", cause)
      with self._lock:
        self.masked += 1
      return float("nan")
    with self._lock:
      self.scored += 1
    return score / 10.0

  def exchange(self, method: str, path: str, body: dict | None, parse: Callable):
    """parse(the reply's JSON), retried on what may pass: raises Failed after the last
    attempt, JudgeError at once on a 4xx other than 408 and 429."""
    data = None if body is None else json.dumps(body).encode()
    cause = ""
    for attempt in range(self.retries + 1):
      if attempt:
        time.sleep(self.backoff * 2 ** (attempt - 1) * random.uniform(1.0, 1.5))
      try:
        status, answer = self.client.request(method, path, data)
      except (OSError, http.client.HTTPException) as e:
        cause = f"{type(e).__name__}: {e}"
        continue
      if status == 200:
        try:
          return parse(json.loads(answer))
        except ValueError:
          cause = f"the reply is not JSON: {excerpt(answer.decode(errors='replace'))}"
        except (KeyError, IndexError, TypeError):
          cause = f"unexpected reply shape: {excerpt(answer.decode(errors='replace'))}"
        except BadReply as e:
          cause = str(e)
        continue
      cause = f"HTTP {status}: {error_message(answer)}"
      if status in (404, 405):
        raise NotServed(f"judge {self.base_url} has no {method} {path}: {cause}")
      if status not in (408, 429) and status < 500:
        raise JudgeError(f"judge {self.base_url} refused {method} {path}: {cause}")
    raise Failed(self.retries + 1, cause)
