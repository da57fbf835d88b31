"""Joining a multi-process run (docs/design.md section 8): `jax.distributed` from config or env.

Every process of a pod runs the same command. How they find each other, in order:
  1. the config's `distributed.coordinator_address` / `num_processes` (shared by all
     processes), with this process's id from `JAXEDIT_PROCESS_ID` (or the config);
  2. `JAXEDIT_COORDINATOR_ADDRESS`, `JAXEDIT_NUM_PROCESSES`, `JAXEDIT_PROCESS_ID`, as the
     local launcher (`launch/local.py`) sets them;
  3. `JAXEDIT_DISTRIBUTED=1` (the pod launchers set it), or `distributed.initialize =
     'always'`: `jax.distributed.initialize()` with no arguments, so JAX detects the TPU
     pod, GKE job or SLURM allocation itself.
Otherwise the run is a single process. On CPU the collectives across processes are gloo's.
"""

from __future__ import annotations

import logging
import os

import jax
import ml_collections

from jaxedit import schema
from jaxedit.config import ConfigError

ENV_ADDRESS = "JAXEDIT_COORDINATOR_ADDRESS"
ENV_COUNT = "JAXEDIT_NUM_PROCESSES"
ENV_ID = "JAXEDIT_PROCESS_ID"
ENV_AUTO = "JAXEDIT_DISTRIBUTED"
MODES = ("auto", "always", "never")


def _env_int(name: str) -> int | None:
  text = os.environ.get(name, "")
  if not text:
    return None
  try:
    return int(text)
  except ValueError:
    raise ConfigError(f"environment variable {name}={text!r} must be an integer") from None


def resolve(cfg: ml_collections.ConfigDict | None) -> dict | None:
  """The keyword arguments for `jax.distributed.initialize`, or None for a single process.
  Pure (reads only `cfg` and the environment), so it is tested without starting anything."""
  cfg = cfg if cfg is not None else schema.distributed()
  mode = cfg.get("initialize", "auto")
  if mode not in MODES:
    raise ConfigError(f"config key 'distributed.initialize' must be one of {MODES}, "
                      f"got {mode!r}")
  if mode == "never":
    return None
  address = cfg.get("coordinator_address", "") or os.environ.get(ENV_ADDRESS, "")
  count = cfg.get("num_processes", 0) or _env_int(ENV_COUNT)
  process_id = _env_int(ENV_ID)
  if process_id is None and cfg.get("process_id", -1) >= 0:
    process_id = cfg.process_id
  timeout = {"initialization_timeout": cfg.get("timeout_s", 300)}
  if address:
    missing = [name for name, value in (("num_processes (or " + ENV_COUNT + ")", count),
                                        ("process_id (or " + ENV_ID + ")", process_id))
               if value is None]
    if missing:
      raise ConfigError(f"distributed: coordinator {address!r} is set but not "
                        f"{' and '.join(missing)}")
    if not 0 <= process_id < count:
      raise ConfigError(f"distributed: process id {process_id} is out of range for "
                        f"{count} processes")
    return {"coordinator_address": address, "num_processes": count,
            "process_id": process_id, **timeout}
  if mode == "always" or os.environ.get(ENV_AUTO, "") not in ("", "0"):
    return timeout  # JAX's cluster detection (TPU VM pods, GKE, SLURM)
  return None


def initialize(cfg: ml_collections.ConfigDict | None) -> bool:
  """Joins the run's processes when the config or environment asks for it; True if it did.
  Must run before anything touches a JAX backend."""
  kwargs = resolve(cfg)
  if kwargs is None or jax.distributed.is_initialized():
    return False
  # CPU processes exchange collectives over gloo; TPU and GPU backends ignore this.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**kwargs)
  logging.info("process %d of %d joined (%d local devices, %d in all)", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  return True
