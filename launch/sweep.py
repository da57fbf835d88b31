"""Runs the sweep a config file declares (`get_sweep`, jaxedit/sweep.py) and tabulates it.

    python launch/sweep.py --config configs/shapes_editor_grpo.py --workdir /tmp/sweep \
        [--parallel 2 | --in_process] [--eval] [-- --config.train.num_steps=20]
    python launch/sweep.py --config ... --workdir gs://bucket/sweep --on tpu_vm \
        --pod "--name s1 --zone us-east5-a --accelerator v5p-64"

Every point trains in ROOT/NAME (NAME from its settings; an existing run resumes), then,
with --eval, is scored. All runs share a persistent compilation cache (ROOT/xla_cache unless
JAX_COMPILATION_CACHE_DIR is set): points that differ only in traced hyperparameters
(learning rate, KL beta, clip range) or host-side ones (noise level, reward weights) compile
nothing new, and the table's `compiled` column counts what each run added to the cache.
Writes ROOT/sweep_summary.json and ROOT/sweep_summary.md.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import os
import shlex
import subprocess
import sys
import time

from etils import epath

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxedit import sweep  # noqa: E402  (imports no JAX: the cache is configured first)
from jaxedit.config import ConfigError  # noqa: E402
from launch import common  # noqa: E402

METRICS = ("edit_success", "checklist_score", "plan_checklist_score", "e2e_success",
           "loss", "train/loss", "train/lr", "reward/mean")


@dataclasses.dataclass
class Result:
  name: str
  point: dict
  workdir: str
  code: int = 0
  minutes: float = 0.0
  compiled: list = dataclasses.field(default_factory=list)  # new cache entries, by program
  metrics: dict = dataclasses.field(default_factory=dict)


def commands(spec: str, workdir: str, point: dict, extra: list[str], evaluate: bool):
  """The jaxedit argument lists of one point: train, then eval."""
  flags = [f"--config.{o}" for o in sweep.overrides(point)] + list(extra)
  out = [["train", "--config", spec, "--workdir", workdir, *flags]]
  if evaluate:
    out.append(["eval", "--config", spec, "--workdir", workdir, *flags])
  return out


def read_metrics(workdir: str) -> dict:
  """The headline figures of a finished run: eval/metrics.json, else its last validation
  point, plus the last logged training metrics."""
  out = {}
  root = epath.Path(workdir)  # a local folder or a bucket (gs://) of a pod run
  eval_path, curve_path = root / "eval/metrics.json", root / "curve.json"
  if eval_path.exists():
    scores = json.loads(eval_path.read_text())
    out.update(scores.get("after", scores))  # GRPO/OPD evals hold before/after
  elif curve_path.exists():
    out.update((json.loads(curve_path.read_text()) or [{}])[-1])
  lines = root / "metrics.jsonl"
  if lines.exists():
    rows = lines.read_text().splitlines()
    out.update(json.loads(rows[-1]) if rows else {})
  return {k: out[k] for k in METRICS if isinstance(out.get(k), (int, float))}


def program_names(entries) -> list[str]:
  """`jit_update-<hash>-cache` -> `update`, sorted."""
  return sorted(e.split("-")[0].removeprefix("jit_") for e in entries)


def run_point(args, result: Result, extra: list[str], cache_dir: str,
              sequential: bool) -> Result:
  os.makedirs(result.workdir, exist_ok=True)
  before, start = sweep.cache_entries(cache_dir), time.time()
  for jaxedit_args in commands(args.config, result.workdir, result.point, extra, args.eval):
    if args.in_process:
      from jaxedit import cli

      result.code = cli.main(jaxedit_args)
    else:
      with open(os.path.join(result.workdir, "sweep.log"), "a") as log:
        result.code = subprocess.run([sys.executable, "-m", "jaxedit", *jaxedit_args],
                                     stdout=log, stderr=subprocess.STDOUT).returncode
    if result.code:
      break
  result.minutes = round((time.time() - start) / 60, 2)
  if sequential:  # the cache entries of concurrent runs would mix
    result.compiled = program_names(sweep.cache_entries(cache_dir) - before)
  result.metrics = read_metrics(result.workdir)
  status = "ok" if not result.code else f"exit code {result.code}"
  print(f"[sweep] {result.name}: {status}, {result.minutes} min, "
        f"{len(result.compiled)} programs compiled, {result.metrics}", flush=True)
  return result


def run_on_pods(args, results: list[Result], extra: list[str]) -> None:
  """Every point on one TPU VM pod (created once, deleted after the last point) or as one
  xpk workload each."""
  from launch import tpu_vm, xpk

  runner = common.Runner(dry_run=args.dry_run)
  module = tpu_vm if args.on == "tpu_vm" else xpk
  spec = module.spec_from(module.parser().parse_args(shlex.split(args.pod)))
  launched = 0
  try:
    for i, result in enumerate(results):
      start = time.time()
      for jaxedit_args in commands(args.config, result.workdir, result.point, extra,
                                   args.eval):
        if args.on == "tpu_vm":  # created by the first command, reused by the rest
          point_spec = dataclasses.replace(spec, reuse=spec.reuse or launched > 0, keep=True)
          result.code = tpu_vm.run_on_pod(point_spec, jaxedit_args, runner)
        else:  # a workload per command (train, eval): names must not clash
          point_spec = dataclasses.replace(
              spec, workload=f"{spec.workload}-{i}-{jaxedit_args[0]}")
          result.code = xpk.run_on_cluster(point_spec, jaxedit_args, runner)
        launched += 1
        if result.code:
          break
      result.minutes = round((time.time() - start) / 60, 2)
  finally:
    if args.on == "tpu_vm" and not spec.keep:
      tpu_vm.delete(runner, spec)


def table(results: list[Result], swept: list[str]) -> str:
  """A markdown table: one row per point."""
  metrics = [m for m in METRICS if any(m in r.metrics for r in results)]
  head = ["run", *swept, "exit", "minutes", "compiled", *metrics]
  rows = [[r.name, *[str(r.point.get(k, "")) for k in swept], str(r.code), f"{r.minutes}",
           str(len(r.compiled)), *[f"{r.metrics[m]:.4g}" if m in r.metrics else ""
                                   for m in metrics]] for r in results]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              usage="%(prog)s --config FILE.py[:arg] --workdir ROOT [options] "
                                    "[-- --config.KEY=VALUE ...]")
  p.add_argument("--config", required=True, help="a config file with get_sweep()")
  p.add_argument("--workdir", required=True, help="root folder; each point runs in ROOT/NAME")
  p.add_argument("--parallel", type=int, default=1, help="local runs at once")
  p.add_argument("--in_process", action="store_true",
                 help="run the points one after another in this process")
  p.add_argument("--eval", action="store_true", help="run `jaxedit eval` after each train")
  p.add_argument("--on", default="local", choices=("local", "tpu_vm", "xpk"))
  p.add_argument("--pod", default="", help="the pod launcher's own arguments, quoted")
  p.add_argument("--dry_run", action="store_true", help="print the runs, start none")
  return p


def main(argv=None) -> int:
  own, extra = common.split_at_dashes(sys.argv[1:] if argv is None else argv)
  args = parser().parse_args(own)
  try:
    points = sweep.load(args.config)
    config = sweep.check(args.config, points)
  except ConfigError as e:
    print(f"sweep: error: {e}", file=sys.stderr)
    return 2
  swept = sorted({k for p in points for k in p})
  recompiling = sweep.recompiling_keys(config.get("trainer", ""), points)
  print(f"[sweep] {len(points)} runs of {args.config} over {', '.join(swept)}; "
        + (f"{', '.join(recompiling)} change the compiled program" if recompiling
           else "one compiled program for all"), flush=True)
  results = [Result(sweep.name(p), p, os.path.join(args.workdir, sweep.name(p)))
             for p in points]
  if args.dry_run and args.on == "local":
    for r in results:
      for c in commands(args.config, r.workdir, r.point, extra, args.eval):
        print("jaxedit " + shlex.join(c))
    return 0
  if args.on != "local":
    run_on_pods(args, results, extra)
    if args.dry_run:  # nothing ran: no summary to write
      return 0
    for r in results:  # after every launch: a bucket read that fails stops no point
      r.metrics = read_metrics(r.workdir)
  else:
    cache_dir = os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                                      os.path.join(os.path.abspath(args.workdir), "xla_cache"))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    sequential = args.in_process or args.parallel <= 1
    if sequential:  # in the main thread (SIGTERM handling)
      for r in results:
        run_point(args, r, extra, cache_dir, sequential)
    else:
      with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
        list(pool.map(lambda r: run_point(args, r, extra, cache_dir, sequential), results))
  root = epath.Path(args.workdir)  # gs:// for pod runs: not a local folder named "gs:"
  root.mkdir(parents=True, exist_ok=True)
  (root / "sweep_summary.json").write_text(
      json.dumps([dataclasses.asdict(r) for r in results], indent=1))
  text = table(results, swept)
  (root / "sweep_summary.md").write_text(text + "\n")
  print(text, flush=True)
  return max((r.code for r in results), default=0)


if __name__ == "__main__":
  sys.exit(main())
