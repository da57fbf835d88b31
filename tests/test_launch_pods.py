"""The pod launchers (launch/tpu_vm.py, launch/xpk.py) against fake `gcloud` and `xpk` executables.

The fakes are first on PATH and log each argv as a JSON line, so the tests see the exact commands,
in order, that a real run would issue; an environment variable makes the call whose arguments
contain a given text fail. No network, no cloud.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tarfile

import pytest

from launch import common, tpu_vm, xpk

FAKE_CLI = """#!{python} -S
import json, os, sys
argv = [os.path.basename(sys.argv[0])] + sys.argv[1:]
log = os.environ["FAKE_CLI_LOG"]
with open(log, "a") as f:
  f.write(json.dumps(argv) + "\\n")
for arg in argv:  # keep the shipped tarball: the launcher deletes its temporary copy
  if arg.endswith(".tar.gz") and os.path.exists(arg):
    with open(arg, "rb") as src:
      shipped = src.read()
    with open(os.path.join(os.path.dirname(log), "shipped.tar.gz"), "wb") as dst:
      dst.write(shipped)
if argv[4:5] == ["scp"] and argv[5].endswith("worker.log"):  # a worker's log, copied back
  with open(os.path.join(argv[6], "worker.log"), "w") as f:
    f.write(" ".join(argv))
if "describe" in argv:
  print(os.environ.get("FAKE_CLI_STATE", "ACTIVE"))
fail = os.environ.get("FAKE_CLI_FAIL")
if fail and fail in " ".join(argv):
  sys.stderr.write("fake failure\\n")
  sys.exit(int(os.environ.get("FAKE_CLI_RC", "3")))
"""

JOB = ["train", "--config", "configs/shapes_editor_sft.py", "--workdir", "gs://bucket/run dir",
       "--config.note=it's $HOME"]


@pytest.fixture
def fake_cli(tmp_path, monkeypatch):
  """Fake gcloud and xpk first on PATH; returns a function giving the argv of every call so far."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for name in ("gcloud", "xpk"):
    (bin_dir / name).write_text(FAKE_CLI.format(python=sys.executable))
    (bin_dir / name).chmod(0o755)
  log = tmp_path / "calls.jsonl"
  monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
  monkeypatch.setenv("FAKE_CLI_LOG", str(log))
  for name in ("FAKE_CLI_FAIL", "FAKE_CLI_RC", "FAKE_CLI_STATE"):
    monkeypatch.delenv(name, raising=False)
  return lambda: [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def phase(call: list[str]) -> str:
  """A call's phase: `create`, `scp tar`, `ssh install`, `ssh run`, `scp log`, `xpk list`..."""
  if call[0] == "xpk":
    return f"xpk {call[2]}"
  assert call[:3] == ["gcloud", "compute", "tpus"], call
  verb = call[4]
  if verb == "scp":
    return "scp tar" if call[5].endswith(".tar.gz") else "scp log"
  if verb == "ssh":
    return "ssh run" if "jaxedit train" in remote_command(call) else "ssh install"
  return verb


def remote_command(call: list[str]) -> str:
  [command] = [arg[len("--command="):] for arg in call if arg.startswith("--command=")]
  return command


def tpu_main(tmp_path, *flags: str, accelerator: str = "v5p-16") -> int:
  return tpu_vm.main(["--name", "pod1", "--zone", "us-east5-a", "--accelerator", accelerator,
                      "--logs", str(tmp_path / "logs"), *flags, "--", *JOB])


@pytest.mark.parametrize("accelerator,hosts", [
    # v5p configurations table (topology: cores, chips, hosts): 2x2x1: 8, 4, 1; 2x2x2: 16, 8, 2;
    # 2x4x4: 64, 32, 8; 4x4x8: 256, 128, 32; 8x8x8: 1024, 512, 128; 16x16x24: 12288, 6144, 1536.
    ("v5p-8", 1), ("v5p-16", 2), ("v5p-64", 8), ("v5p-256", 32), ("v5p-1024", 128),
    ("v5p-12288", 1536),
    # v4 and v2/v3 count TensorCores the same way (4 chips of 2 cores a host).
    ("v4-8", 1), ("v4-16", 2), ("v4-32", 4), ("v2-8", 1), ("v3-32", 4),
    # v5e / v6e count chips: up to 8 on one VM, then 4-chip VMs (xpk: v5litepod-16 -> 4 VMs).
    ("v5litepod-1", 1), ("v5litepod-8", 1), ("v5litepod-16", 4), ("v5litepod-256", 64),
    ("v6e-8", 1), ("v6e-256", 64),
])
def test_hosts_per_slice_matches_published_figures(accelerator, hosts):
  assert tpu_vm.hosts_per_slice(accelerator) == hosts


@pytest.mark.parametrize("accelerator", ["v5p-12", "v5p-0", "v7-8", "tpu7x-64", "v5litepod-18",
                                         "v5p256"])
def test_hosts_per_slice_rejects_unknown_types(accelerator):
  with pytest.raises(ValueError):
    tpu_vm.hosts_per_slice(accelerator)


def test_job_command_runs_jaxedit_with_its_arguments_env_and_exit_code(tmp_path):
  """The line, run by a real bash, passes every argument through intact (spaces, quotes, `$`),
  sets JAXEDIT_DISTRIBUTED=1, runs in the repo dir, logs stdout and stderr, and exits with
  jaxedit's code rather than tee's."""
  home, bin_dir = tmp_path / "home", tmp_path / "bin"
  (home / "jaxedit").mkdir(parents=True)
  bin_dir.mkdir()
  (bin_dir / "python3").write_text(
      f"#!{sys.executable}\nimport json, os, sys\n"
      "print(json.dumps([sys.argv[1:], os.environ.get('JAXEDIT_DISTRIBUTED'), os.getcwd()]))\n"
      "sys.stderr.write('to stderr\\n')\nsys.exit(5)\n")
  (bin_dir / "python3").chmod(0o755)
  line = common.job_command(JOB, repo_dir="jaxedit", log_file="jaxedit_logs/worker.log")
  env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
  result = subprocess.run(["bash", "-c", line], cwd=home, env=env, capture_output=True, text=True)
  assert result.returncode == 5
  logged = (home / "jaxedit_logs" / "worker.log").read_text().splitlines()
  assert json.loads(logged[0]) == [["-m", "jaxedit", *JOB], "1", str(home / "jaxedit")]
  assert "to stderr" in logged
  assert result.stdout.splitlines() == logged


def test_job_command_without_log_and_remote_env():
  line = common.job_command(["eval", "--workdir", "w"], env={})
  assert line == "python3 -m jaxedit eval --workdir w"
  assert common.remote_env({"A": "x y", "B": "1"}) == "A='x y' B=1"
  with pytest.raises(ValueError):
    common.remote_env({"A;rm": "1"})
  with pytest.raises(ValueError):
    common.job_command([])


def test_runner_error_names_command_exit_code_and_stderr_tail():
  runner = common.Runner()
  cmd = [sys.executable, "-c", "import sys; sys.stderr.write('first\\nlast words\\n'); sys.exit(4)"]
  with pytest.raises(common.LaunchError) as error:
    runner.run(cmd)
  message = str(error.value)
  assert "exit code 4" in message and shlex.join(cmd) in message and "last words" in message
  assert runner.run(cmd, check=False).returncode == 4
  assert runner.run([sys.executable, "-c", "print('out')"], capture=True).stdout == "out\n"
  assert runner.history == [cmd, cmd, [sys.executable, "-c", "print('out')"]]
  with pytest.raises(common.LaunchError, match="cannot start"):
    runner.run(["/nonexistent/gcloud"])


def test_pack_repo_ships_tracked_files_as_in_the_working_tree(tmp_path):
  root = tmp_path / "repo"
  (root / "pkg").mkdir(parents=True)
  (root / "setup.py").write_text("committed")
  (root / "pkg" / "mod.py").write_text("x = 1")
  (root / "gone.py").write_text("deleted later")
  (root / ".gitignore").write_text("build/\n")
  subprocess.run(["git", "init", "-q", str(root)], check=True)
  subprocess.run(["git", "-C", str(root), "add", "."], check=True)
  (root / "setup.py").write_text("edited, not committed")
  (root / "gone.py").unlink()
  (root / "junk.txt").write_text("untracked")
  (root / "build").mkdir()
  (root / "build" / "out.bin").write_text("ignored")
  tarball = tpu_vm.pack_repo(common.Runner(), root, str(tmp_path / "x.tar.gz"))
  with tarfile.open(tarball) as tar:
    assert sorted(tar.getnames()) == [".gitignore", "pkg/mod.py", "setup.py"]
    assert tar.extractfile("setup.py").read() == b"edited, not committed"


def test_tpu_vm_phases_flags_logs_and_tarball(fake_cli, tmp_path):
  assert tpu_main(tmp_path) == 0
  calls = fake_cli()
  assert [phase(c) for c in calls] == ["create", "scp tar", "ssh install", "ssh run", "scp log",
                                       "scp log", "delete"]
  create, scp_tar, install, run, log0, log1, delete = calls
  assert create[3:6] == ["tpu-vm", "create", "pod1"]
  assert {"--accelerator-type=v5p-16", "--version=v2-alpha-tpuv5"} <= set(create)
  assert "--spot" not in create
  assert all("--zone=us-east5-a" in c for c in calls)
  assert all("--project" not in " ".join(c) for c in calls)
  for call in (scp_tar, install, run):
    assert "--worker=all" in call
  assert scp_tar[6] == "pod1:"
  assert remote_command(install).endswith("&& python3 -m pip install -e ./jaxedit")
  command = remote_command(run)
  assert "cd jaxedit && JAXEDIT_DISTRIBUTED=1 python3 -m jaxedit train --config" in command
  assert command.endswith("2>&1 | tee jaxedit_logs/worker.log")
  assert {"gs://bucket/run dir", "--config.note=it's $HOME"} <= set(shlex.split(command))
  assert log0[4:8] == ["scp", "pod1:jaxedit_logs/worker.log",
                       str(tmp_path / "logs" / "worker_0") + os.sep, "--worker=0"]
  assert log1[7] == "--worker=1"
  for worker in (0, 1):
    copied = tmp_path / "logs" / f"worker_{worker}" / "worker.log"
    assert f"--worker={worker}" in copied.read_text()
  assert delete[3:6] == ["tpu-vm", "delete", "pod1"] and "--quiet" in delete
  tracked = subprocess.run(["git", "-C", str(tpu_vm.REPO_ROOT), "ls-files", "-z"], check=True,
                           capture_output=True, text=True).stdout.split("\0")
  with tarfile.open(tmp_path / "shipped.tar.gz") as tar:
    shipped = set(tar.getnames())
  assert {"setup.py", "jaxedit/cli.py"} <= shipped
  assert shipped == {name for name in tracked if name and (tpu_vm.REPO_ROOT / name).exists()}


def test_tpu_vm_failed_run_still_collects_logs_deletes_and_returns_its_code(fake_cli, tmp_path,
                                                                            monkeypatch):
  monkeypatch.setenv("FAKE_CLI_FAIL", "jaxedit train")
  monkeypatch.setenv("FAKE_CLI_RC", "7")
  assert tpu_main(tmp_path) == 7
  assert [phase(c) for c in fake_cli()] == ["create", "scp tar", "ssh install", "ssh run",
                                            "scp log", "scp log", "delete"]


def test_tpu_vm_failed_install_deletes_without_collecting_logs(fake_cli, tmp_path, monkeypatch):
  monkeypatch.setenv("FAKE_CLI_FAIL", "pip install")
  assert tpu_main(tmp_path) == 1
  assert [phase(c) for c in fake_cli()] == ["create", "scp tar", "ssh install", "delete"]


def test_tpu_vm_failed_create_deletes_nothing(fake_cli, tmp_path, monkeypatch):
  """A create that fails (a name already taken, no capacity) must not delete anything."""
  monkeypatch.setenv("FAKE_CLI_FAIL", "tpu-vm create")
  assert tpu_main(tmp_path) == 1
  assert [phase(c) for c in fake_cli()] == ["create"]


def test_tpu_vm_a_log_that_cannot_be_copied_is_skipped(fake_cli, tmp_path, monkeypatch, capsys):
  monkeypatch.setenv("FAKE_CLI_FAIL", "--worker=0")
  assert tpu_main(tmp_path) == 0
  assert [phase(c) for c in fake_cli()][-3:] == ["scp log", "scp log", "delete"]
  assert "warning: no log copied to" in capsys.readouterr().err


@pytest.mark.parametrize("flag,skipped", [("--keep", "delete"), ("--reuse", "create")])
def test_tpu_vm_keep_skips_delete_and_reuse_skips_create(fake_cli, tmp_path, flag, skipped):
  assert tpu_main(tmp_path, flag) == 0
  phases = ["create", "scp tar", "ssh install", "ssh run", "scp log", "scp log", "delete"]
  phases.remove(skipped)
  assert [phase(c) for c in fake_cli()] == phases


def test_tpu_vm_project_spot_and_extras(fake_cli, tmp_path):
  assert tpu_main(tmp_path, "--project", "proj", "--spot", "--extras", "tpu,torch",
                  accelerator="v4-8") == 0
  calls = fake_cli()
  assert [phase(c) for c in calls] == ["create", "scp tar", "ssh install", "ssh run", "scp log",
                                       "delete"]
  assert all("--project=proj" in c for c in calls)
  assert "--spot" in calls[0]
  assert remote_command(calls[2]).endswith("python3 -m pip install -e './jaxedit[tpu,torch]'")


def test_tpu_vm_dry_run_starts_no_process(fake_cli, tmp_path, monkeypatch, capsys):
  def no_process(*args, **kwargs):
    raise AssertionError(f"a dry run started {args}")

  monkeypatch.setattr(common.subprocess, "Popen", no_process)
  assert tpu_main(tmp_path, "--dry_run", "--num_slices", "2") == 0
  assert fake_cli() == []
  assert not (tmp_path / "logs").exists()
  out = capsys.readouterr().out
  assert "[dry run] gcloud compute tpus queued-resources create pod1" in out
  assert "[dry run] gcloud compute tpus queued-resources delete pod1" in out


def test_tpu_vm_multislice_uses_a_queued_resource(fake_cli, tmp_path):
  assert tpu_main(tmp_path, "--num_slices", "2", accelerator="v5p-8") == 0
  calls = fake_cli()
  assert [phase(c) for c in calls] == ["create", "describe", "scp tar", "ssh install", "ssh run",
                                       "scp log", "scp log", "delete"]
  assert all(c[3] == "queued-resources" for c in calls)
  assert {"--accelerator-type=v5p-8", "--runtime-version=v2-alpha-tpuv5", "--node-count=2",
          "--node-prefix=pod1"} <= set(calls[0])
  assert "--format=value(state.state)" in calls[1]
  for call in calls[2:5]:
    assert {"--worker=all", "--node=all"} <= set(call)
  assert {"--node=1", "--worker=0"} <= set(calls[6])
  assert (tmp_path / "logs" / "slice_1" / "worker_0" / "worker.log").exists()
  assert {"--force", "--quiet"} <= set(calls[-1])


def test_tpu_vm_multislice_request_that_fails_is_deleted(fake_cli, tmp_path, monkeypatch):
  monkeypatch.setenv("FAKE_CLI_STATE", "FAILED")
  assert tpu_main(tmp_path, "--num_slices", "2") == 1
  assert [phase(c) for c in fake_cli()] == ["create", "describe", "delete"]


def test_run_on_pod_for_a_sweep(fake_cli, tmp_path):
  spec = tpu_vm.PodSpec(name="sweep-3", zone="z", accelerator="v5litepod-16",
                        logs=str(tmp_path / "logs"), keep=True)
  assert tpu_vm.run_on_pod(spec, ["train", "--workdir", "w3"], common.Runner()) == 0
  assert [phase(c) for c in fake_cli()].count("scp log") == 4
  with pytest.raises(ValueError):
    tpu_vm.PodSpec(name="x", zone="z", accelerator="v5p-8", repo_dir="../elsewhere")


def xpk_main(*flags: str) -> int:
  return xpk.main(["--cluster", "c1", "--workload", "w1", "--tpu_type", "v5p-256",
                   "--docker_image", "gcr.io/p/jaxedit:1", *flags, "--", *JOB])


def test_xpk_create_then_wait(fake_cli):
  assert xpk_main("--num_slices", "2", "--project", "p", "--zone", "z", "--timeout", "600") == 0
  calls = fake_cli()
  assert [phase(c) for c in calls] == ["xpk create", "xpk list"]
  create, wait = calls
  assert {"--cluster=c1", "--workload=w1", "--tpu-type=v5p-256", "--num-slices=2",
          "--docker-image=gcr.io/p/jaxedit:1", "--project=p", "--zone=z"} <= set(create)
  assert len(create) == 3 + 8  # `xpk workload create` and exactly these flags and --command
  assert shlex.split(remote_command(create)) == ["JAXEDIT_DISTRIBUTED=1", *common.JAXEDIT, *JOB]
  assert {"--cluster=c1", "--wait-for-job-completion=w1", "--timeout=600", "--project=p",
          "--zone=z"} <= set(wait)


def test_xpk_failed_workload_is_reported_deleted_and_its_code_returned(fake_cli, monkeypatch,
                                                                      capsys):
  monkeypatch.setenv("FAKE_CLI_FAIL", "--wait-for-job-completion")
  monkeypatch.setenv("FAKE_CLI_RC", "125")
  assert xpk_main("--delete", "--repo_dir", "/app") == 125
  calls = fake_cli()
  assert [phase(c) for c in calls] == ["xpk create", "xpk list", "xpk delete"]
  assert remote_command(calls[0]).startswith("cd /app && JAXEDIT_DISTRIBUTED=1 python3 -m jaxedit")
  assert {"--workload=w1", "--cluster=c1"} <= set(calls[2])
  assert "failed" in capsys.readouterr().out


def test_xpk_dry_run_starts_no_process(fake_cli, monkeypatch, capsys):
  def no_process(*args, **kwargs):
    raise AssertionError(f"a dry run started {args}")

  monkeypatch.setattr(common.subprocess, "Popen", no_process)
  assert xpk_main("--dry_run", "--delete") == 0
  assert fake_cli() == []
  out = capsys.readouterr().out
  assert "[dry run] xpk workload create" in out and "[dry run] xpk workload delete" in out
