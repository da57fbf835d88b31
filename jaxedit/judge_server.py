"""A reference judge server for a lab without vLLM: a transformers Qwen2-VL / Qwen2.5-VL model
folder behind the part of the OpenAI chat-completions API that `jaxedit.judges` uses.

    python -m jaxedit.judge_server --model DIR --port 8000    # serves http://127.0.0.1:8000/v1

GET /v1/models lists the model. POST /v1/chat/completions takes `messages` (content a string
or a list of {"type": "text"} and {"type": "image_url"} parts; images as data: URLs only, the
server fetches nothing), `max_tokens`, `temperature` (0: greedy), `top_p`, `seed`, `logprobs`
and `top_logprobs` (at most 20), and answers as vLLM does; log-probs are the model's own (before
temperature and top_p). The request's settings replace the folder's generation_config (its
repetition penalty would tilt a judge against the digits its rubric names). One generation
runs at a time (a lock around the model): enough for tests and small runs, not for throughput.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import http.server
import io
import json
import logging
import os
import threading
import time
import uuid
from typing import Any

MAX_BODY = 64 << 20  # bytes
MAX_TOP_LOGPROBS = 20


class BadRequest(ValueError):
  """The request is wrong: answered with HTTP 400 and the message."""


def load_processor(folder: str):
  """AutoProcessor, else (Qwen2-VL's processor also loads a video processor, which needs
  torchvision) the folder's processor class without its video half: judging needs images only."""
  import transformers

  try:
    return transformers.AutoProcessor.from_pretrained(folder)
  except ImportError as e:
    config = transformers.AutoConfig.from_pretrained(folder)
    name = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor"}.get(
        config.model_type)
    if name is None:
      raise
    logging.warning("%s; serving images only", str(e).strip().splitlines()[0])

    # ProcessorMixin takes its parts from the __init__ signature: without `video_processor`
    # there, the None passed for it is dropped instead of checked.
    def init(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
      getattr(transformers, name).__init__(self, image_processor, tokenizer, None,
                                           chat_template=chat_template, **kwargs)

    cls = type(name + "WithoutVideo", (getattr(transformers, name),), {"__init__": init})
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    template = tokenizer.chat_template
    if template is None and os.path.exists(os.path.join(folder, "chat_template.json")):
      with open(os.path.join(folder, "chat_template.json")) as f:  # the Hub's older place
        template = json.load(f)["chat_template"]
    return cls(transformers.AutoImageProcessor.from_pretrained(folder), tokenizer,
               chat_template=template)


class Engine:
  """The model and its processor; `complete(request)` answers one chat-completions request."""

  def __init__(self, folder: str, served_name: str = "", dtype: str = "auto", device: str = ""):
    import torch
    import transformers

    self.torch, self.name = torch, served_name or folder.rstrip("/").rsplit("/", 1)[-1]
    self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    self.processor = load_processor(folder)
    self.tokenizer = self.processor.tokenizer
    self.model = transformers.AutoModelForImageTextToText.from_pretrained(
        folder, dtype=dtype if dtype == "auto" else getattr(torch, dtype)).to(self.device).eval()
    eos = self.model.generation_config.eos_token_id
    self.eos = {*(eos if isinstance(eos, (list, tuple)) else [eos]),
                self.tokenizer.eos_token_id} - {None}
    self.lock = threading.Lock()

  def complete(self, request: Any) -> dict:
    """The chat.completion reply to `request` (parsed JSON); BadRequest if it is wrong."""
    messages, images = parse_messages(request)
    model = request.get("model")
    if model not in (None, self.name):
      raise BadRequest(f"model {model!r} is not served here; this server serves {self.name!r}")
    max_tokens = integer(request, "max_tokens", integer(request, "max_completion_tokens", 512))
    temperature = number(request, "temperature", 1.0, 0.0, 2.0)
    top_p = number(request, "top_p", 1.0, 1e-6, 1.0)
    top = integer(request, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS)
    if top and not request.get("logprobs"):
      raise BadRequest("top_logprobs needs logprobs: true")
    if request.get("n", 1) != 1 or request.get("stream"):
      raise BadRequest("this server answers n=1 without streaming only")
    prompt = self.processor.apply_chat_template(messages, tokenize=False,
                                                add_generation_prompt=True)
    inputs = self.processor(text=[prompt], images=images or None, return_tensors="pt")
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p,
                    top_k=0) if temperature > 0 else dict(do_sample=False)
    with self.lock, self.torch.inference_mode():
      if temperature > 0 and isinstance(request.get("seed"), int):
        self.torch.manual_seed(request["seed"])
      out = self.model.generate(**inputs.to(self.device), max_new_tokens=max_tokens,
                                repetition_penalty=1.0, return_dict_in_generate=True,
                                output_logits=True, **sampling)
    prompt_len = inputs["input_ids"].shape[1]
    ids = out.sequences[0, prompt_len:].tolist()
    finish = "stop" if ids and ids[-1] in self.eos else "length"
    choice = {"index": 0, "message": {"role": "assistant", "content": self.tokenizer.decode(
        ids[:-1] if finish == "stop" else ids, skip_special_tokens=True)},
              "finish_reason": finish, "logprobs": None}
    if request.get("logprobs"):
      choice["logprobs"] = {"content": [self.token_logprobs(step, i, top)
                                        for step, i in zip(out.logits, ids)]}
    return {"id": "chatcmpl-" + uuid.uuid4().hex, "object": "chat.completion",
            "created": int(time.time()), "model": self.name, "choices": [choice],
            "usage": {"prompt_tokens": prompt_len, "completion_tokens": len(ids),
                      "total_tokens": prompt_len + len(ids)}}

  def token_logprobs(self, logits, token: int, top: int) -> dict:
    """vLLM's entry for one generated token: its log-prob and the `top` likeliest tokens'."""
    logprobs = self.torch.log_softmax(logits[0].float(), -1)
    best = self.torch.topk(logprobs, top) if top else None
    entry = lambda i, lp: {"token": (t := self.tokenizer.decode([i])),
                           "logprob": max(float(lp), -9999.0), "bytes": list(t.encode())}
    return {**entry(token, logprobs[token]), "top_logprobs": [] if best is None else [
        entry(i, lp) for lp, i in zip(best.values.tolist(), best.indices.tolist())]}


def integer(request: dict, key: str, default: int, low: int = 1, high: int = 1 << 20) -> int:
  value = request.get(key)
  if value is None:
    return default
  if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
    raise BadRequest(f"{key} must be an integer from {low} to {high}, got {value!r}")
  return value


def number(request: dict, key: str, default: float, low: float, high: float) -> float:
  value = request.get(key)
  if value is None:
    return default
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
    raise BadRequest(f"{key} must be a number from {low} to {high}, got {value!r}")
  return float(value)


def parse_messages(request: Any) -> tuple[list, list]:
  """OpenAI messages -> (the processor's chat messages with {"type": "image"} placeholders,
  the PIL images in order)."""
  from PIL import Image

  if not isinstance(request, dict):
    raise BadRequest(f"the body must be a JSON object, got {type(request).__name__}")
  messages = request.get("messages")
  if not isinstance(messages, list) or not messages:
    raise BadRequest("the body needs `messages`, a non-empty list")
  chat, images = [], []
  for n, message in enumerate(messages):
    if not isinstance(message, dict) or message.get("role") not in ("system", "user",
                                                                       "assistant"):
      raise BadRequest(f"messages[{n}] needs a role: system, user or assistant")
    content = message.get("content")
    if isinstance(content, str):
      content = [{"type": "text", "text": content}]
    if not isinstance(content, list):
      raise BadRequest(f"messages[{n}].content must be a string or a list of parts")
    parts = []
    for k, part in enumerate(content):
      where = f"messages[{n}].content[{k}]"
      kind = part.get("type") if isinstance(part, dict) else None
      if kind == "text" and isinstance(part.get("text"), str):
        parts.append({"type": "text", "text": part["text"]})
      elif kind == "image_url":
        url = part.get("image_url")
        url = url.get("url") if isinstance(url, dict) else url
        if not isinstance(url, str) or not url.startswith("data:image/") or (
            ";base64," not in url):
          raise BadRequest(f"{where}: only data:image/...;base64, URLs are served (this server "
                           f"fetches nothing), got {str(url)[:60]!r}")
        try:
          data = base64.b64decode(url.split(";base64,", 1)[1], validate=True)
          images.append(Image.open(io.BytesIO(data)).convert("RGB"))
        except (binascii.Error, OSError, ValueError) as e:
          raise BadRequest(f"{where}: not a readable image: {e}") from None
        parts.append({"type": "image"})
      else:
        raise BadRequest(f"{where} must be {{'type': 'text', 'text': ...}} or "
                         f"{{'type': 'image_url', 'image_url': {{'url': ...}}}}")
    chat.append({"role": message["role"], "content": parts})
  return chat, images


class Handler(http.server.BaseHTTPRequestHandler):
  timeout = 60  # seconds a client may take to send its request
  engine: Engine

  def reply(self, status: int, body: dict):
    data = json.dumps(body).encode()
    self.send_response(status)
    self.send_header("Content-Type", "application/json")
    self.send_header("Content-Length", str(len(data)))
    self.end_headers()
    self.wfile.write(data)

  def error(self, status: int, message: str, kind: str = "invalid_request_error"):
    self.reply(status, {"error": {"message": message, "type": kind, "code": status}})

  def do_GET(self):
    if self.path.rstrip("/") == "/v1/models":
      self.reply(200, {"object": "list", "data": [{"id": self.engine.name, "object": "model",
                                                   "owned_by": "jaxedit"}]})
    else:
      self.error(404, f"no route GET {self.path}; try GET /v1/models", "not_found_error")

  def do_POST(self):
    try:
      data = self.read_body()  # all of it first: closing on unread input resets the connection
      if self.path.rstrip("/") != "/v1/chat/completions":
        self.error(404, f"no route POST {self.path}; try POST /v1/chat/completions",
                   "not_found_error")
        return
      try:
        request = json.loads(data)
      except ValueError as e:
        raise BadRequest(f"the body is not JSON: {e}") from None
      reply = self.engine.complete(request)
    except BadRequest as e:
      self.error(400, f"bad request: {e}")
    except Exception as e:  # noqa: BLE001 -- the server stays up; the client sees the cause
      logging.exception("chat completion failed")
      self.error(500, f"{type(e).__name__}: {e}", "server_error")
    else:
      self.reply(200, reply)

  def read_body(self) -> bytes:
    size = self.headers.get("Content-Length", "")
    if not size.isdigit() or not 0 < int(size) <= MAX_BODY:
      self.close_connection = True
      raise BadRequest(f"the body must be 1 to {MAX_BODY} bytes with its Content-Length, "
                       f"got Content-Length {size!r}")
    return self.rfile.read(int(size))

  def log_message(self, fmt, *args):
    logging.info("%s %s", self.address_string(), fmt % args)


class JudgeServer(http.server.ThreadingHTTPServer):
  daemon_threads = True

  @property
  def url(self) -> str:
    host, port = self.server_address[:2]
    return f"http://{host}:{port}/v1"


def make_server(engine: Engine, host: str = "127.0.0.1", port: int = 8000) -> JudgeServer:
  """A server for `engine` bound to host:port (0: any free port); run `serve_forever()`."""
  return JudgeServer((host, port), type("JudgeHandler", (Handler,), {"engine": engine}))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", required=True, help="a Qwen2-VL / Qwen2.5-VL model folder")
  parser.add_argument("--served_name", default="", help="the model's name (default: folder's)")
  parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve other machines")
  parser.add_argument("--port", type=int, default=8000)
  parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16",
                                                          "float16"])
  parser.add_argument("--device", default="", help="default: cuda if available, else cpu")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
  server = make_server(Engine(args.model, args.served_name, args.dtype, args.device),
                       args.host, args.port)
  print(f"serving {server.RequestHandlerClass.engine.name} at {server.url}", flush=True)
  try:
    server.serve_forever()
  except KeyboardInterrupt:
    pass
  finally:
    server.server_close()


if __name__ == "__main__":
  main()
