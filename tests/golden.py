"""Golden runs: tiny runs of every trainer whose logged per-step metrics are kept as fixtures
(tests/fixtures/golden/DEVICES.json), so that a change to how the trainers are built (the
training core, the RL package) is checked to train exactly as before, bit for bit.

    python tests/golden.py record --devices 8   # rewrite the fixture (only on purpose)
    python tests/golden.py check --devices 1    # what tests/test_golden.py runs
    python tests/golden.py workdirs --devices 8 # rewrite tests/fixtures/workdirs

Each run is a few steps with validation off, chained where one trainer starts from another
(GRPO and OPD from the SFT runs, the OPD teachers are the SFT runs). Float metrics are
stored as `float.hex` strings, one recording per platform (software and processor
features: XLA orders float32 sums by the vector width it compiles for), all made with the
same code (each recording's `code`: the commit recorded from, 18b36d7; the 1-device
recording of an AMD AVX-512 machine from 13066df, which reproduces it). Where a recording of this platform exists the check is bit for bit; elsewhere
it compares with the first recording to a relative 1e-3 or an absolute 1e-5 (the metrics
that are rounding noise around zero, such as a GRPO loss at ratio 1, differ by their own
size), and says so. `record` adds or replaces this platform's recording.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "fixtures", "golden")
# Workdirs written by the trainers as they were when the fixtures were made: later code must
# still evaluate, resume and export them.
WORKDIRS = os.path.join(HERE, "fixtures", "workdirs")
WORKDIR_RUNS = ("editor_sft", "editor_grpo", "planner_sft")
RUNS = ("editor_sft", "vae", "population", "editor_grpo", "editor_grpo_overlap", "editor_opd",
        "planner_sft", "planner_grpo", "planner_opd")
# Overlapped rollouts need devices of their own beside the update's.
NEEDS_DEVICES = {"editor_grpo_overlap": 2}
ELSEWHERE_RTOL, ELSEWHERE_ATOL = 1e-3, 1e-5


def fixture_path(devices: int) -> str:
  return os.path.join(FIXTURES, f"{devices}.json")


def machine() -> dict:
  """What bitwise float results depend on: the software and the processor's features."""
  import jax
  import jaxlib

  flags = ""
  if os.path.exists("/proc/cpuinfo"):
    for line in open("/proc/cpuinfo"):
      if line.startswith("flags"):
        flags = " ".join(sorted(f for f in line.split(":", 1)[1].split()
                                if f.startswith(("avx", "fma", "sse", "amx"))))
        break
  return {"jax": jax.__version__, "jaxlib": jaxlib.__version__,
          "machine": platform.machine(), "cpu_flags": flags}


def _set(config, overrides: dict) -> None:
  for key, value in overrides.items():
    node = config
    *path, name = key.split(".")
    for part in path:
      node = node[part]
    node[name] = value


def _quiet(config) -> None:
  t = config.train
  t.eval_every = t.sample_every = -1
  t.log_every, t.async_checkpoints = 1, False


def editor_sft_config(data_dir):
  from conftest import tiny_editor_config

  config = tiny_editor_config(data_dir, num_steps=3, checkpoint_every=0)
  config.model.text_max_len = 64  # as the OPD and GRPO runs after it
  _quiet(config)
  return config


def planner_sft_config(data_dir):
  from conftest import tiny_planner_config

  config = tiny_planner_config(data_dir, num_steps=3, checkpoint_every=0)
  _quiet(config)
  return config


def rl_config(trainer: str, data_dir, sft_dir, overrides: dict):
  """An RL run from the SFT run at `sft_dir`, with its model, data and sampling; editors
  train LoRA adapters."""
  from jaxedit import schema

  config = schema.reference_config(trainer)
  editor = trainer.startswith("editor")
  sft = (editor_sft_config if editor else planner_sft_config)(data_dir)
  for section in ("data", "tokenizer", "model", "sample" if editor else "prompt"):
    config[section] = sft[section]
  config.init_from = sft_dir
  if editor:
    config.model.lora_rank = 4
  config.train.num_steps, config.train.checkpoint_every = 2, 0
  config.eval.batch_size = 8
  _quiet(config)
  _set(config, overrides)
  return config


def configs(data_dir: str, root: str, devices: int) -> dict:
  """name -> (trainer name, config, workdir) of every run, in the order they must run."""
  from conftest import small_data_config
  from jaxedit.shapes.edits import TASKS
  from jaxedit import schema

  d = lambda name: os.path.join(root, name)
  editor_sft, planner_sft = d("editor_sft"), d("planner_sft")
  out = {"editor_sft": ("editor_sft", editor_sft_config(data_dir), editor_sft)}
  config = schema.vae()
  config.data = small_data_config(data_dir)
  config.model.block_out_channels, config.model.norm_num_groups = (8, 16), 4
  _set(config, {"train.batch_size": 8, "train.num_steps": 3, "train.warmup_steps": 1,
                "train.checkpoint_every": 0, "train.stats_examples": 64,
                "eval.batch_size": 16})
  _quiet(config)
  out["vae"] = ("vae", config, d("vae"))
  config = editor_sft_config(data_dir)
  config.population = json.dumps([{"train.lr": 1e-3}, {"train.lr": 4e-3}])
  out["population"] = ("editor_sft", config, d("population"))
  grpo = {"rollout.prompts_per_step": 8, "rollout.group_size": 2, "rollout.rollout_chunks": 2,
          "rollout.num_steps": 3, "rollout.minibatches": 2, "rollout.inner_epochs": 2}
  out["editor_grpo"] = ("editor_grpo",
                        rl_config("editor_grpo", data_dir, editor_sft, grpo),
                        d("editor_grpo"))
  if devices >= NEEDS_DEVICES["editor_grpo_overlap"]:
    out["editor_grpo_overlap"] = ("editor_grpo", rl_config(
        "editor_grpo", data_dir, editor_sft,
        {**grpo, "rollout.rollout_devices": devices // 2, "mesh.shape": (-1, 1, 1),
         "rollout.rollout_mesh_shape": (-1, 1, 1)}), d("editor_grpo_overlap"))
  opd = {"rollout.prompts_per_step": 16, "rollout.group_size": 1, "rollout.rollout_chunks": 2,
         "rollout.num_steps": 3, "rollout.minibatches": 2, "init_params": "params",
         "opd.teachers.colour": editor_sft, "opd.teachers.geometry": editor_sft}
  out["editor_opd"] = ("editor_opd", rl_config("editor_opd", data_dir, editor_sft, opd),
                       d("editor_opd"))
  out["planner_sft"] = ("planner_sft", planner_sft_config(data_dir), planner_sft)
  pg = {"rollout.prompts_per_step": 4, "rollout.group_size": 4, "rollout.minibatches": 2}
  out["planner_grpo"] = ("planner_grpo",
                         rl_config("planner_grpo", data_dir, planner_sft, pg),
                         d("planner_grpo"))
  po = {"rollout.prompts_per_step": 16, "rollout.group_size": 1, "rollout.minibatches": 2,
        "init_params": "raw", **{f"opd.teachers.{t}": planner_sft for t in TASKS}}
  out["planner_opd"] = ("planner_opd",
                        rl_config("planner_opd", data_dir, planner_sft, po),
                        d("planner_opd"))
  return out


def train(trainer: str, config, workdir: str) -> None:
  from jaxedit import registry

  registry.module(trainer).train(config, workdir)


def logged(workdir: str) -> list[dict]:
  """The run's metrics.jsonl rows (a population's: every member's, member by member)."""
  members = sorted(m for m in os.listdir(workdir) if m.startswith("member_"))
  paths = ([os.path.join(workdir, m, "metrics.jsonl") for m in members] if members
           else [os.path.join(workdir, "metrics.jsonl")])
  rows = []
  for i, path in enumerate(paths):
    for line in open(path):
      row = json.loads(line)
      if members:
        row["member"] = i
      rows.append(row)
  return rows


def encode(rows: list[dict]) -> list[dict]:
  return [{k: float(v).hex() if isinstance(v, float) else v for k, v in row.items()}
          for row in rows]


def run_all(devices: int, root: str, names=RUNS, data_dir: str = "") -> dict:
  """{name: encoded rows} of the runs `names` on this process's `devices` devices, on the
  small dataset in `data_dir` (built there if missing; "": in `root`)."""
  from conftest import small_data_config
  from jaxedit.data import job
  from jaxedit.shapes.world import World

  data_dir = data_dir or os.path.join(root, "tfds")
  job.dataset_dir(World(), small_data_config(data_dir))
  out = {}
  for name, (trainer, config, workdir) in configs(data_dir, root, devices).items():
    if name not in names:
      continue
    start = time.perf_counter()
    train(trainer, config, workdir)
    out[name] = encode(logged(workdir))
    print(f"{name}: {len(out[name])} rows in {time.perf_counter() - start:.1f} s", flush=True)
  return out


def _is_float(value) -> bool:
  return isinstance(value, str) and value.startswith(("0x", "-0x", "inf", "-inf", "nan"))


def compare(want: dict, got: dict, exact: bool) -> list[str]:
  """Differences between two fixtures' runs, as readable lines (empty: they agree)."""
  problems = []
  if sorted(want) != sorted(got):
    problems.append(f"runs: fixture {sorted(want)}, now {sorted(got)}")
  for name in sorted(set(want) & set(got)):
    if len(want[name]) != len(got[name]):
      problems.append(f"{name}: {len(want[name])} logged rows in the fixture, {len(got[name])} now")
    for w, g in zip(want[name], got[name]):
      where = f"{name} step {w.get('step')}" + (f" member {w['member']}" if "member" in w else "")
      if sorted(w) != sorted(g):
        problems.append(f"{where}: metrics {sorted(w)} in the fixture, {sorted(g)} now")
        continue
      for k in w:
        a, b = w[k], g[k]
        if not _is_float(a):
          if a != b:
            problems.append(f"{where} {k}: {a!r} in the fixture, {b!r} now")
          continue
        x, y = float.fromhex(a), float.fromhex(b)
        allowed = max(ELSEWHERE_RTOL * max(abs(x), abs(y)), ELSEWHERE_ATOL)
        same = x == y or (math.isnan(x) and math.isnan(y))
        if not same and (exact or not abs(x - y) <= allowed):
          problems.append(f"{where} {k}: {x!r} in the fixture, {y!r} now")
  return problems


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("action", choices=("record", "check", "workdirs"))
  parser.add_argument("--devices", type=int, required=True)
  parser.add_argument("--runs", nargs="+", choices=RUNS, default=RUNS,
                      help="check only these (and the SFT runs they start from)")
  parser.add_argument("--data_dir", default="", help="where the small dataset is (or is "
                      "built); default: a temporary folder")
  args = parser.parse_args(argv)
  os.environ["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={args.devices} "
                             "--xla_backend_optimization_level=0")
  os.environ["JAX_PLATFORMS"] = "cpu"
  sys.path.insert(0, HERE)
  sys.path.insert(0, os.path.dirname(HERE))
  with tempfile.TemporaryDirectory(prefix="jaxedit_golden_") as root:
    if args.action == "workdirs":
      run_all(args.devices, root, WORKDIR_RUNS, args.data_dir)
      shutil.rmtree(WORKDIRS, ignore_errors=True)
      for name in WORKDIR_RUNS:
        shutil.copytree(os.path.join(root, name), os.path.join(WORKDIRS, name))
      print(f"wrote {WORKDIRS}")
      return 0
    needed = set(args.runs) | {("planner_sft" if r.startswith("planner") else "editor_sft")
                               for r in args.runs if r != "vae"}
    runs = run_all(args.devices, root, [r for r in RUNS if r in needed], args.data_dir)
  here = machine()
  recordings = []
  if os.path.exists(fixture_path(args.devices)):
    recordings = json.load(open(fixture_path(args.devices)))["recordings"]
  mine = [r for r in recordings if r["platform"] == here]
  if args.action == "record":
    if set(args.runs) != set(RUNS):
      parser.error("record writes every run: leave out --runs")
    recordings = [r for r in recordings if r["platform"] != here]
    code = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, text=True,
                          capture_output=True).stdout.strip()
    recordings.append({"platform": here, "code": code, "runs": runs})
    os.makedirs(FIXTURES, exist_ok=True)
    with open(fixture_path(args.devices), "w") as f:
      json.dump({"recordings": recordings}, f, indent=1)
      f.write("\n")
    print(f"wrote {fixture_path(args.devices)} ({len(recordings)} platforms)")
    return 0
  fixture = (mine or recordings)[0]
  want = {k: v for k, v in fixture["runs"].items() if k in runs}
  exact = bool(mine)
  problems = compare(want, runs, exact)
  print(("bit for bit" if exact else f"within rtol {ELSEWHERE_RTOL} or atol {ELSEWHERE_ATOL} "
         f"(recorded on {fixture['platform']}, here {here})") + f": {len(problems)} differences")
  for line in problems[:50]:
    print(line)
  return 1 if problems else 0


if __name__ == "__main__":
  sys.exit(main())
