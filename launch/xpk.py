"""Run a jaxedit job as an xpk workload on a GKE cluster of TPU slices.

    python launch/xpk.py --cluster C --workload W --tpu_type v5p-256 --docker_image IMG \\
        [--num_slices N] [--project P] [--zone Z] [--delete] \\
        -- train --config configs/X.py --workdir gs://bucket/run [--config.key=value ...]

Everything after `--` is the jaxedit command. The image must have jaxedit installed (with
jax[tpu]); the command runs in --repo_dir inside it (default: the image's working directory),
with JAXEDIT_DISTRIBUTED=1 on every VM of every slice. The launcher creates the workload, waits
for it to finish (`xpk workload list --wait-for-job-completion`), reports how it ended and, with
--delete, deletes it (also when the wait fails or is interrupted). The exit code is the wait's:
0 the workload completed, 125 it failed, 124 --timeout passed first, 1 any other xpk failure.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
from typing import Sequence

if __package__ in (None, ""):  # run as `python launch/xpk.py`: make `launch` importable
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from launch import common  # noqa: E402

WAIT_CODES = {0: "completed", 124: "still running when --timeout passed",
              125: "finished without completing (failed)"}


@dataclasses.dataclass(frozen=True)
class WorkloadSpec:
  """An xpk workload on an existing cluster and what to do with it around a run."""
  cluster: str
  workload: str
  tpu_type: str
  docker_image: str
  num_slices: int = 1
  project: str | None = None
  zone: str | None = None
  repo_dir: str | None = None  # in the image; None: its working directory
  timeout_s: int | None = None  # of the wait; None: xpk's (a week)
  delete: bool = False


def _xpk(spec: WorkloadSpec, *args: str) -> list[str]:
  """`xpk workload ARGS --cluster C`, project and zone added when given."""
  cmd = ["xpk", "workload", *args, f"--cluster={spec.cluster}"]
  if spec.project:
    cmd.append(f"--project={spec.project}")
  if spec.zone:
    cmd.append(f"--zone={spec.zone}")
  return cmd


def create(runner: common.Runner, spec: WorkloadSpec, jaxedit_args: Sequence[str]) -> None:
  """Submits the workload: `--command` runs in every VM's container, which exits with its status
  (xpk >= 0.7; with the default --max-restarts 0 a failure fails the workload, no restart)."""
  line = common.job_command(jaxedit_args, repo_dir=spec.repo_dir)
  runner.run(_xpk(spec, "create", f"--workload={spec.workload}", f"--tpu-type={spec.tpu_type}",
                  f"--num-slices={spec.num_slices}", f"--docker-image={spec.docker_image}",
                  f"--command={line}"))


def wait(runner: common.Runner, spec: WorkloadSpec) -> int:
  """Follows the workload until it finishes; returns xpk's code (see WAIT_CODES)."""
  timeout = [f"--timeout={spec.timeout_s}"] if spec.timeout_s is not None else []
  return runner.run(_xpk(spec, "list", f"--wait-for-job-completion={spec.workload}", *timeout),
                    check=False).returncode


def delete(runner: common.Runner, spec: WorkloadSpec) -> None:
  runner.run(_xpk(spec, "delete", f"--workload={spec.workload}"))


def run_on_cluster(spec: WorkloadSpec, jaxedit_args: Sequence[str],
                   runner: common.Runner) -> int:
  """Create, wait, report and (with `delete`) delete; returns the wait's exit code. A sweep
  calls this once per point."""
  create(runner, spec, jaxedit_args)
  try:
    code = wait(runner, spec)
    print(f"workload {spec.workload}: "
          f"{WAIT_CODES.get(code, f'xpk could not follow it (exit code {code})')}", flush=True)
    return code
  finally:
    if spec.delete:
      delete(runner, spec)


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0],
      usage="%(prog)s --cluster C --workload W --tpu_type TYPE --docker_image IMG [options] "
            "-- JAXEDIT_COMMAND...",
      epilog="Everything after `--` is the jaxedit command, e.g. "
             "`-- train --config configs/X.py --workdir gs://bucket/run`.")
  p.add_argument("--cluster", required=True)
  p.add_argument("--workload", required=True, help="workload (JobSet) name, unique on the cluster")
  p.add_argument("--tpu_type", required=True, help="e.g. v5p-256")
  p.add_argument("--docker_image", required=True, help="image with jaxedit and jax[tpu] installed")
  p.add_argument("--num_slices", type=int, default=1)
  p.add_argument("--project", help="GCP project (default: gcloud's configured one)")
  p.add_argument("--zone", help="cluster zone (default: gcloud's configured one)")
  p.add_argument("--repo_dir", help="directory in the image to run from (default: its workdir)")
  p.add_argument("--timeout", type=int, help="seconds to wait for the workload (default: a week)")
  p.add_argument("--delete", action="store_true", help="delete the workload afterwards")
  p.add_argument("--dry_run", action="store_true", help="print the commands, run none")
  return p


def spec_from(args: argparse.Namespace) -> WorkloadSpec:
  """The WorkloadSpec of parsed `parser()` arguments (also used by launch/sweep.py)."""
  return WorkloadSpec(cluster=args.cluster, workload=args.workload, tpu_type=args.tpu_type,
                      docker_image=args.docker_image, num_slices=args.num_slices,
                      project=args.project, zone=args.zone, repo_dir=args.repo_dir,
                      timeout_s=args.timeout, delete=args.delete)


def main(argv: Sequence[str] | None = None) -> int:
  p = parser()
  args, jaxedit_args = common.parse_with_command(p, sys.argv[1:] if argv is None else argv)
  spec = spec_from(args)
  runner = common.Runner(dry_run=args.dry_run)
  try:
    return run_on_cluster(spec, jaxedit_args, runner)
  except common.LaunchError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print("interrupted" + ("" if spec.delete else
                           f"; the workload runs on until `xpk workload delete "
                           f"--workload={spec.workload} --cluster={spec.cluster}`"),
          file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
