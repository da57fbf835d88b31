"""Run a jaxedit job on a Cloud TPU VM pod slice (or several slices: Multislice) with gcloud.

    python launch/tpu_vm.py --name NAME --zone ZONE --accelerator v5p-256 [options] \\
        -- train --config configs/X.py --workdir gs://bucket/run [--config.key=value ...]

Everything after `--` is the jaxedit command. The phases, in order:
  create   `gcloud compute tpus tpu-vm create` (skipped with --reuse); with --num_slices > 1 a
           queued resource of that many slices, waited for until ACTIVE
  install  this repo's git-tracked files, as they are in the working tree, unpacked into
           --repo_dir on every worker and pip-installed there (with --extras)
  run      the jaxedit command on every worker at once with JAXEDIT_DISTRIBUTED=1, each worker
           writing its output to ~/jaxedit_logs/worker.log too
  logs     each worker's log copied to LOGS/worker_I (LOGS/slice_J/worker_I for Multislice)
  delete   the TPU (skipped with --keep)
Logs are copied and the TPU deleted even when the run fails or is interrupted; the exit code is
the run's. Files not yet added to git are not shipped. gcloud reaches several workers at once only
with its key in ssh-agent: run `ssh-add ~/.ssh/google_compute_engine` first.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import re
import shlex
import sys
import tarfile
import tempfile
import time
from typing import Sequence

if __package__ in (None, ""):  # run as `python launch/tpu_vm.py`: make `launch` importable
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from launch import common  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
TARBALL = "jaxedit.tar.gz"
LOG_FILE = "jaxedit_logs/worker.log"  # on each worker, relative to the login directory
POLL_S = 30  # between looks at a queued resource that is not ACTIVE yet
QUEUED_FAILED = ("FAILED", "SUSPENDING", "SUSPENDED", "DELETING")


def hosts_per_slice(accelerator: str) -> int:
  """The TPU VM workers (hosts) in one slice of `accelerator`: what `--worker=I` counts.

  For v2, v3, v4 and v5p the number after the dash counts TensorCores, two per chip, with four
  chips per host: v4-8 and v5p-8 (4 chips) are one host, v5p-256 (128 chips) is 32, as the v5p
  configurations table lists (2x2x1: 8 cores, 4 chips, 1 host; 4x4x8: 256 cores, 128 chips, 32
  hosts). For v5e (`v5litepod-N`) and v6e (`v6e-N`) it counts chips: a slice of up to 8 chips is
  one VM, a larger one is made of 4-chip VMs (v5litepod-16: 4, v5litepod-256: 64), as in xpk's
  machine table (ct5lp-hightpu-4t / ct6e-standard-4t).
  """
  match = re.fullmatch(r"(v2|v3|v4|v5p|v5litepod|v6e)-(\d+)", accelerator)
  if not match:
    raise ValueError(f"unknown TPU accelerator type {accelerator!r} "
                     "(expected e.g. v4-8, v5p-256, v5litepod-16, v6e-64)")
  family, count = match.group(1), int(match.group(2))
  if family in ("v5litepod", "v6e"):
    if 0 < count <= 8:
      return 1
    per_host = 4  # chips
  else:
    per_host = 8  # TensorCores: 2 per chip, 4 chips
  if count == 0 or count % per_host:
    raise ValueError(f"{accelerator!r}: {count} is not a whole number of {per_host}-unit hosts")
  return count // per_host


@dataclasses.dataclass(frozen=True)
class PodSpec:
  """A TPU pod slice (or `num_slices` of them) and what to do with it around a run."""
  name: str
  zone: str
  accelerator: str
  version: str = "v2-alpha-tpuv5"
  project: str | None = None
  spot: bool = False
  num_slices: int = 1
  keep: bool = False
  reuse: bool = False
  logs: str | None = None  # local directory for the workers' logs; None: pod_logs/NAME
  repo_dir: str = "jaxedit"  # on each worker, under the login directory
  extras: str = ""  # setup.py extras to install, e.g. "tpu" -> pip install -e './jaxedit[tpu]'

  def __post_init__(self):
    hosts_per_slice(self.accelerator)  # an unknown type fails here, not after creating a TPU
    if self.num_slices < 1:
      raise ValueError(f"num_slices must be at least 1, got {self.num_slices}")
    parts = pathlib.PurePosixPath(self.repo_dir).parts
    if not parts or self.repo_dir.startswith(("/", "~")) or ".." in parts:
      # install() empties repo_dir first: keep that under the home directory.
      raise ValueError(f"repo_dir must be a directory under the workers' home directory, "
                       f"like 'jaxedit', got {self.repo_dir!r}")

  @property
  def multislice(self) -> bool:
    return self.num_slices > 1

  @property
  def log_dir(self) -> str:
    return self.logs or os.path.join("pod_logs", self.name)


def _gcloud(spec: PodSpec, verb: str, *args: str) -> list[str]:
  """`gcloud compute tpus tpu-vm VERB ...` (`queued-resources` for Multislice), zone and project
  added."""
  group = "queued-resources" if spec.multislice else "tpu-vm"
  cmd = ["gcloud", "compute", "tpus", group, verb, *args, f"--zone={spec.zone}"]
  if spec.project:
    cmd.append(f"--project={spec.project}")
  return cmd


def _all_workers(spec: PodSpec) -> list[str]:
  return ["--worker=all", *(["--node=all"] if spec.multislice else [])]


def create(runner: common.Runner, spec: PodSpec) -> None:
  """Creates the TPU. Multislice needs a queued resource (one node per slice, named NAME-0,
  NAME-1, ...); the TPU runtime then sets the MEGASCALE variables JAX reads on each worker."""
  if spec.multislice:
    cmd = _gcloud(spec, "create", spec.name, f"--accelerator-type={spec.accelerator}",
                  f"--runtime-version={spec.version}", f"--node-count={spec.num_slices}",
                  f"--node-prefix={spec.name}")
  else:
    cmd = _gcloud(spec, "create", spec.name, f"--accelerator-type={spec.accelerator}",
                  f"--version={spec.version}")
  runner.run(cmd + (["--spot"] if spec.spot else []))


def wait_until_active(runner: common.Runner, spec: PodSpec) -> None:
  """A queued resource is accepted at once and provisioned when capacity frees up: polls its
  state until it is ACTIVE."""
  while True:
    state = runner.run(_gcloud(spec, "describe", spec.name, "--format=value(state.state)"),
                       capture=True).stdout.strip()
    if runner.dry_run or state == "ACTIVE":
      return
    if state in QUEUED_FAILED:
      raise common.LaunchError(f"queued resource {spec.name} is {state}")
    print(f"queued resource {spec.name} is {state or 'not listed yet'}; "
          f"looking again in {POLL_S} s", flush=True)
    time.sleep(POLL_S)


def pack_repo(runner: common.Runner, root: pathlib.Path, tarball: str) -> str:
  """Writes the git-tracked files under `root`, as they are in the working tree, to `tarball`:
  the code at hand ships, build outputs and scratch files stay behind."""
  listed = runner.run(["git", "-C", str(root), "ls-files", "-z"], capture=True).stdout
  with tarfile.open(tarball, "w:gz") as tar:
    for name in filter(None, listed.split("\0")):
      if os.path.lexists(root / name):  # tracked files deleted in the working tree are skipped
        tar.add(root / name, arcname=name, recursive=False)
  return tarball


def install_command(spec: PodSpec) -> str:
  """Unpacks the shipped tarball into a fresh repo_dir (no files left from an earlier install on
  a reused TPU) and pip-installs it, with the extras asked for."""
  repo = shlex.quote(spec.repo_dir)
  target = f"./{spec.repo_dir}" + (f"[{spec.extras}]" if spec.extras else "")
  return (f"rm -rf {repo} && mkdir -p {repo} && tar -xzf {TARBALL} -C {repo} && rm {TARBALL} "
          f"&& python3 -m pip install -e {shlex.quote(target)}")


def install(runner: common.Runner, spec: PodSpec) -> None:
  with tempfile.TemporaryDirectory() as tmp:
    tarball = pack_repo(runner, REPO_ROOT, os.path.join(tmp, TARBALL))
    runner.run(_gcloud(spec, "scp", tarball, f"{spec.name}:", *_all_workers(spec)))
  runner.run(_gcloud(spec, "ssh", spec.name, *_all_workers(spec),
                     f"--command={install_command(spec)}"))


def run(runner: common.Runner, spec: PodSpec, jaxedit_args: Sequence[str]) -> int:
  """Runs the jaxedit command on every worker at once. gcloud waits for all of them and exits
  with the first non-zero status among the workers, so a failure on any worker shows."""
  line = common.job_command(jaxedit_args, repo_dir=spec.repo_dir, log_file=LOG_FILE)
  return runner.run(_gcloud(spec, "ssh", spec.name, *_all_workers(spec), f"--command={line}"),
                    check=False).returncode


def collect_logs(runner: common.Runner, spec: PodSpec) -> None:
  """Copies each worker's log, one scp per worker: an scp from --worker=all would write every
  worker's file to the same local path. A log that cannot be copied is reported and skipped."""
  for node in range(spec.num_slices):
    for worker in range(hosts_per_slice(spec.accelerator)):
      dest = os.path.join(spec.log_dir, *([f"slice_{node}"] if spec.multislice else []),
                          f"worker_{worker}")
      if not runner.dry_run:
        os.makedirs(dest, exist_ok=True)
      which = [f"--worker={worker}", *([f"--node={node}"] if spec.multislice else [])]
      try:
        runner.run(_gcloud(spec, "scp", f"{spec.name}:{LOG_FILE}", dest + os.sep, *which))
      except common.LaunchError as e:
        print(f"warning: no log copied to {dest}: {e}", file=sys.stderr, flush=True)


def delete(runner: common.Runner, spec: PodSpec) -> None:
  """Deletes the TPU; for Multislice `--force` deletes the queued resource's nodes with it."""
  if spec.multislice:
    runner.run(_gcloud(spec, "delete", spec.name, "--force", "--quiet"))
  else:
    runner.run(_gcloud(spec, "delete", spec.name, "--quiet"))


def run_on_pod(spec: PodSpec, jaxedit_args: Sequence[str], runner: common.Runner) -> int:
  """Every phase in order; returns the run's exit code. A failed create leaves nothing to delete
  (and a name clash must not delete someone's TPU); from then on the logs are collected (once the
  run started) and the TPU deleted (unless `keep`) whatever happens."""
  if not spec.reuse:
    create(runner, spec)
  started = False
  try:
    if spec.multislice and not spec.reuse:
      wait_until_active(runner, spec)
    install(runner, spec)
    started = True
    return run(runner, spec, jaxedit_args)
  finally:
    if started:
      collect_logs(runner, spec)
    if not spec.keep:
      delete(runner, spec)


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0],
      usage="%(prog)s --name NAME --zone ZONE --accelerator TYPE [options] -- JAXEDIT_COMMAND...",
      epilog="Everything after `--` is the jaxedit command, e.g. "
             "`-- train --config configs/X.py --workdir gs://bucket/run`.")
  p.add_argument("--name", required=True, help="TPU (queued resource for Multislice) name")
  p.add_argument("--zone", required=True)
  p.add_argument("--accelerator", required=True, help="accelerator type, e.g. v5p-256")
  p.add_argument("--version", default=PodSpec.version, help="TPU software (runtime) version")
  p.add_argument("--project", help="GCP project (default: gcloud's configured one)")
  p.add_argument("--spot", action="store_true", help="Spot TPU VMs")
  p.add_argument("--num_slices", type=int, default=1, help="> 1: Multislice, a queued resource")
  p.add_argument("--keep", action="store_true", help="do not delete the TPU afterwards")
  p.add_argument("--reuse", action="store_true", help="use an existing TPU: skip create")
  p.add_argument("--dry_run", action="store_true", help="print the commands, run none")
  p.add_argument("--logs", help="local directory for the workers' logs (default pod_logs/NAME)")
  p.add_argument("--repo_dir", default=PodSpec.repo_dir,
                 help="where the repo goes on each worker, under the home directory")
  p.add_argument("--extras", default="", help="setup.py extras to install, e.g. tpu")
  return p


def spec_from(args: argparse.Namespace) -> PodSpec:
  """The PodSpec of parsed `parser()` arguments (also used by launch/sweep.py)."""
  return PodSpec(name=args.name, zone=args.zone, accelerator=args.accelerator,
                 version=args.version, project=args.project, spot=args.spot,
                 num_slices=args.num_slices, keep=args.keep, reuse=args.reuse, logs=args.logs,
                 repo_dir=args.repo_dir, extras=args.extras)


def main(argv: Sequence[str] | None = None) -> int:
  p = parser()
  args, jaxedit_args = common.parse_with_command(p, sys.argv[1:] if argv is None else argv)
  try:
    spec = spec_from(args)
  except ValueError as e:
    p.error(str(e))
  runner = common.Runner(dry_run=args.dry_run)
  try:
    code = run_on_pod(spec, jaxedit_args, runner)
  except common.LaunchError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    return 130
  print(f"{len(runner.history)} commands; jaxedit exit code {code}; "
        f"worker logs in {spec.log_dir}", flush=True)
  return code


if __name__ == "__main__":
  sys.exit(main())
