"""The README's "Train on your own data" block, run as it stands: data, SFT (rejection
sampling with the judge), GRPO with the judge, eval and export, on a tiny FLUX.1-Kontext
pipeline folder (tests/tiny_flux.py, in the layout transformers and diffusers give by default:
T5 v1.0 FFN, quant convs, no guidance embedding) and an Edit-R1 folder of PNGs, rewarded by an
OpenAI-compatible judge on loopback that answers in text ("Score: N") or only with
log-probs. The exported transformer then edits an image in diffusers' FluxKontextPipeline."""

import base64
import http.server
import io
import json
import math
import os
import re
import subprocess
import sys
import threading

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import tiny_flux  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_block() -> str:
  readme = open(os.path.join(ROOT, "README.md")).read()
  section = readme.split("## Train on your own data", 1)[1]
  block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
  assert set(re.findall(r"\$(\w+)", block)) == {"JSONL", "PIPELINE", "JUDGE", "OUT"}
  return block


class Judge(http.server.BaseHTTPRequestHandler):
  """Scores an edit by its mean brightness; every other request answers with log-probs of
  the first token only (the text a bare digit), the others in text ending "Score: N"."""

  def _send(self, obj):
    data = json.dumps(obj).encode()
    self.send_response(200)
    self.send_header("Content-Type", "application/json")
    self.send_header("Content-Length", str(len(data)))
    self.end_headers()
    self.wfile.write(data)

  def do_GET(self):
    assert self.path == "/v1/models", self.path
    self._send({"object": "list", "data": [{"id": "judge", "object": "model"}]})

  def do_POST(self):
    assert self.path == "/v1/chat/completions", self.path
    body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
    parts = body["messages"][0]["content"]
    urls = [p["image_url"]["url"] for p in parts if p["type"] == "image_url"]
    edit = Image.open(io.BytesIO(base64.b64decode(urls[-1].split(",", 1)[1])))
    score = float(np.asarray(edit, np.float32).mean() / 255 * 10)
    with self.server.lock:
      self.server.requests += 1
      by_logprobs = self.server.requests % 2 == 0
    if by_logprobs:  # p(floor) and p(ceil) whose expectation is the score
      low = min(int(score), 9)
      top = [{"token": str(low), "logprob": math.log(max(low + 1 - score, 1e-9))},
             {"token": str(low + 1), "logprob": math.log(max(score - low, 1e-9))},
             {"token": "The", "logprob": -30.0}]
      choice = {"message": {"role": "assistant", "content": str(round(score))},
                "logprobs": {"content": [{"token": str(low), "logprob": top[0]["logprob"],
                                          "top_logprobs": top}]}}
    else:
      choice = {"message": {"role": "assistant",
                            "content": f"The edit is fine.\nScore: {score:.2f}"}}
    self._send({"object": "chat.completion", "model": "judge",
                "choices": [{"index": 0, "finish_reason": "stop", **choice}]})

  def log_message(self, *args):
    pass


def test_the_readme_block_trains_evaluates_and_exports(tmp_path):
  pipeline = tiny_flux.write_pipeline(
      str(tmp_path / "pipeline"), guidance_embeds=False, t5={"feed_forward_proj": "relu"},
      vae={"use_quant_conv": True, "use_post_quant_conv": True, "shift_factor": 0.05,
           "block_out_channels": (8, 16)})
  jsonl = tiny_flux.write_edit_r1(str(tmp_path / "edits"))
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Judge)
  server.lock, server.requests = threading.Lock(), 0
  threading.Thread(target=server.serve_forever, daemon=True).start()
  out = str(tmp_path / "out")
  env = {**os.environ, "JSONL": jsonl, "PIPELINE": pipeline, "OUT": out,
         "JUDGE": f"http://127.0.0.1:{server.server_address[1]}/v1",
         "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
  try:
    run = subprocess.run(["bash", "-euo", "pipefail", "-c", readme_block()], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
  finally:
    server.shutdown()
  assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
  assert server.requests > 0

  records = json.load(open(os.path.join(out, "records", "dataset.json")))
  assert {"source_latents", "context", "pooled"} <= set(records["fields"])
  assert set(records["splits"]) == {"train", "test"}
  for run_dir in ("sft", "grpo"):
    lines = [json.loads(line) for line in open(os.path.join(out, run_dir, "metrics.jsonl"))]
    rewards = [line["reward/mean"] for line in lines if "reward/mean" in line]
    assert rewards and all(0 <= r <= 1 for r in rewards), rewards
  assert any(line.get("train/kept_fraction") == 1.0
             for line in map(json.loads, open(os.path.join(out, "sft", "metrics.jsonl"))))
  metrics = json.load(open(os.path.join(out, "grpo", "eval", "metrics.json")))
  assert metrics["examples"] == 2 and metrics["masked"] == 0
  assert 0 <= metrics["reward_judge"] <= 1 and "before" in metrics
  assert os.path.exists(os.path.join(out, "grpo", "eval", "edits_after.png"))

  transformer = diffusers.FluxTransformer2DModel.from_pretrained(os.path.join(out,
                                                                              "transformer"))
  pipe = diffusers.FluxKontextPipeline.from_pretrained(pipeline, transformer=transformer)
  source = json.loads(open(jsonl).readline())["image"]
  image = Image.open(os.path.join(os.path.dirname(jsonl), source)).convert("RGB")
  edited = pipe(image=image, prompt="make the square red", num_inference_steps=2, height=64,
                width=64, max_area=64 * 64, _auto_resize=False, max_sequence_length=16,
                output_type="np").images
  assert edited.shape == (1, 64, 64, 3) and np.isfinite(edited).all()
