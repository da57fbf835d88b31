"""Simulates a pod on one machine: N processes of one `jaxedit` command, joined by
`jax.distributed` over localhost (gloo collectives on CPU), as the tests do (docs/design.md 8).

    python launch/local.py --num_processes 2 --devices_per_process 4 --logdir /tmp/logs -- \
        train --config configs/shapes_editor_sft.py:demo --workdir /tmp/pod_run

Each process writes LOGDIR/process_I.log; process 0's is echoed as it goes. When one process
fails, the others are stopped (SIGTERM first, so they save) and its exit code is returned.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from launch import common  # noqa: E402


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def process_env(index: int, count: int, port: int, devices_per_process: int | None,
                base: dict | None = None) -> dict:
  """The environment of process `index`: jaxedit's coordinator variables
  (jaxedit.distributed) and, for CPU devices, how many fake devices it has."""
  env = dict(os.environ if base is None else base)
  env.update({"JAXEDIT_COORDINATOR_ADDRESS": f"localhost:{port}",
              "JAXEDIT_NUM_PROCESSES": str(count), "JAXEDIT_PROCESS_ID": str(index)})
  if devices_per_process:
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = (f"{flags} --xla_force_host_platform_device_count="
                        f"{devices_per_process}").strip()
    env["JAX_PLATFORMS"] = "cpu"
  return env


def _echo(path: str, proc: subprocess.Popen) -> None:
  """Follows process 0's log on stdout until it exits."""
  with open(path) as f:
    while True:
      line = f.readline()
      if line:
        sys.stdout.write(line)
        continue
      if proc.poll() is not None:
        sys.stdout.write(f.read())
        return
      time.sleep(0.2)


def run(jaxedit_args: list[str], num_processes: int, devices_per_process: int | None = None,
        logdir: str = "local_pod_logs", timeout: float | None = None, echo: bool = True,
        env: dict | None = None, program: list[str] | None = None) -> int:
  """Runs `jaxedit JAXEDIT_ARGS` (or `program`, e.g. a Python script that calls the
  trainers after `jaxedit.distributed.initialize`) as `num_processes` joined processes;
  the first non-zero exit code, or 0. `timeout` (seconds) stops them all and returns 124."""
  program = program or [sys.executable, "-m", "jaxedit", *jaxedit_args]
  os.makedirs(logdir, exist_ok=True)
  port = free_port()
  procs, logs = [], []
  for i in range(num_processes):
    logs.append(os.path.join(logdir, f"process_{i}.log"))
    with open(logs[i], "w") as log:
      procs.append(subprocess.Popen(
          program, stdout=log,
          stderr=subprocess.STDOUT,
          env=process_env(i, num_processes, port, devices_per_process, env)))
  follower = threading.Thread(target=_echo, args=(logs[0], procs[0]), daemon=True)
  if echo:
    follower.start()
  start, code = time.time(), 0
  try:
    while any(p.poll() is None for p in procs):
      failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
      if failed or (timeout and time.time() - start > timeout):
        code = failed[0] if failed else 124
        break
      time.sleep(0.2)
  finally:
    _stop(procs)
  if echo:
    follower.join(timeout=5)
  code = code or next((p.returncode for p in procs if p.returncode), 0)
  if code:
    for i, p in enumerate(procs):
      if p.returncode not in (0, None):
        tail = open(logs[i]).read()[-3000:]
        print(f"process {i} exited with {p.returncode}; the end of {logs[i]}:\n{tail}",
              file=sys.stderr)
        break
  return code


def _stop(procs, grace: float = 30.0) -> None:
  """SIGTERM the processes still running (jaxedit saves a checkpoint), then SIGKILL."""
  for p in procs:
    if p.poll() is None:
      p.send_signal(signal.SIGTERM)
  deadline = time.time() + grace
  for p in procs:
    try:
      p.wait(timeout=max(0.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
      p.kill()
      p.wait()


def main(argv=None) -> int:
  own, rest = common.split_at_dashes(sys.argv[1:] if argv is None else argv)
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                              usage="%(prog)s [options] -- JAXEDIT_SUBCOMMAND [ARGS ...]")
  p.add_argument("--num_processes", type=int, default=2)
  p.add_argument("--devices_per_process", type=int, default=4,
                 help="fake CPU devices per process (0: use the real devices)")
  p.add_argument("--logdir", default="local_pod_logs")
  p.add_argument("--timeout", type=float, default=None, help="seconds")
  args = p.parse_args(own)
  if not rest:
    p.error("give the jaxedit command after --, e.g. -- train --config ... --workdir ...")
  return run(rest, args.num_processes, args.devices_per_process or None, args.logdir,
             args.timeout)


if __name__ == "__main__":
  sys.exit(main())
