"""What the pod launchers share: a command runner that logs every command, and the shell line
that runs a jaxedit job on a worker.

The environment contract with jaxedit: the pod launchers set `JAXEDIT_DISTRIBUTED=1`, which makes
jaxedit call `jax.distributed.initialize()` with no arguments, so JAX finds the TPU pod or GKE
job from its own metadata (jaxedit/distributed.py).
"""

from __future__ import annotations

import collections
import re
import shlex
import subprocess
import sys
import threading
from typing import Mapping, Sequence

DISTRIBUTED_ENV = {"JAXEDIT_DISTRIBUTED": "1"}
# `python3 -m jaxedit` rather than the `jaxedit` script: a user-site pip install on a TPU VM puts
# the script in ~/.local/bin, which a non-interactive ssh command does not have on its PATH.
JAXEDIT = ("python3", "-m", "jaxedit")
STDERR_TAIL = 20  # lines of a failed command's stderr that its LaunchError quotes


class LaunchError(RuntimeError):
  """A launcher command failed (or could not start); the message says which and why."""


class Runner:
  """Runs commands one after another, printing each first; `dry_run` only prints them.

  A command's stdout and stderr still reach the terminal as they come (a training run talks for
  hours); the last lines of stderr are kept for the error when it fails. `history` lists every
  command in order, run or only printed, for tests and for the summary at the end.
  """

  def __init__(self, dry_run: bool = False):
    self.dry_run = dry_run
    self.history: list[list[str]] = []

  def run(self, cmd: Sequence[str], *, check: bool = True,
          capture: bool = False) -> subprocess.CompletedProcess:
    """Runs `cmd`; raises LaunchError on a non-zero exit when `check`. With `capture` its stdout
    comes back in `.stdout` instead of reaching the terminal (empty in a dry run)."""
    cmd = [str(part) for part in cmd]
    self.history.append(cmd)
    print(("[dry run] " if self.dry_run else "+ ") + shlex.join(cmd), flush=True)
    if self.dry_run:
      return subprocess.CompletedProcess(cmd, 0, stdout="")
    try:
      proc = subprocess.Popen(cmd, stdout=subprocess.PIPE if capture else None,
                              stderr=subprocess.PIPE, text=True)
    except OSError as e:
      raise LaunchError(f"cannot start {shlex.join(cmd)}: {e}") from e
    tail = collections.deque(maxlen=STDERR_TAIL)
    pump = threading.Thread(target=_tee, args=(proc.stderr, tail), daemon=True)
    pump.start()
    try:
      stdout = proc.stdout.read() if capture else None
      returncode = proc.wait()
    except KeyboardInterrupt:  # the child got the SIGINT too: let it exit before cleanup runs
      proc.wait()
      raise
    pump.join()
    if check and returncode != 0:
      stderr = f"\nlast lines of its stderr:\n{''.join(tail).rstrip()}" if tail else ""
      raise LaunchError(f"command failed with exit code {returncode}: {shlex.join(cmd)}{stderr}")
    return subprocess.CompletedProcess(cmd, returncode, stdout=stdout)


def _tee(stream, tail: collections.deque) -> None:
  for line in stream:
    sys.stderr.write(line)
    tail.append(line)
  sys.stderr.flush()


def split_at_dashes(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """(the launcher's own arguments, the jaxedit command after the first `--`)."""
  argv = list(argv)
  if "--" not in argv:
    return argv, []
  cut = argv.index("--")
  return argv[:cut], argv[cut + 1:]


def parse_with_command(p, argv: Sequence[str]):
  """(the launcher's parsed arguments, the jaxedit command after `--`); a usage error
  when the command is missing."""
  own, jaxedit_args = split_at_dashes(argv)
  args = p.parse_args(own)
  if not jaxedit_args:
    p.error("give the jaxedit command after `--`, e.g. -- train --config configs/X.py ...")
  return args, jaxedit_args


def remote_env(env: Mapping[str, str]) -> str:
  """`K=V ...` to prefix a shell command with, each value quoted."""
  for key in env:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
      raise ValueError(f"not an environment variable name: {key!r}")
  return " ".join(f"{key}={shlex.quote(str(value))}" for key, value in env.items())


def job_command(jaxedit_args: Sequence[str], *, env: Mapping[str, str] = DISTRIBUTED_ENV,
                repo_dir: str | None = None, log_file: str | None = None) -> str:
  """The shell line that runs `jaxedit ARGS...` on a worker, from `repo_dir` when given.

  With `log_file` the output is also written there (`2>&1 | tee`), and `pipefail` keeps the exit
  status jaxedit's rather than tee's. The cd happens in a subshell, so a relative `log_file` is
  relative to where the line starts (the login directory over ssh), not to `repo_dir`.
  """
  if not jaxedit_args:
    raise ValueError("no jaxedit command given (for example: train --config ... --workdir ...)")
  line = shlex.join([*JAXEDIT, *jaxedit_args])
  if env:
    line = f"{remote_env(env)} {line}"
  if repo_dir:
    line = f"cd {shlex.quote(repo_dir)} && {line}"
  if log_file is None:
    return line
  log_dir = log_file.rpartition("/")[0]
  mkdir = f"mkdir -p {shlex.quote(log_dir)} && " if log_dir else ""
  return f"set -o pipefail; {mkdir}( {line} ) 2>&1 | tee {shlex.quote(log_file)}"
