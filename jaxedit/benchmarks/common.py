"""What every benchmark shares (docs/design.md section 12): timing, the machine, a matmul peak
measured in the same run, peak memory, and a Flux editor with random weights on both sides
(jaxedit and diffusers) built from a config file."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import statistics
import time
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxedit import config as config_lib
from jaxedit.interop import flux_diffusers
from jaxedit.models.editor import DTYPES, editor_config
from jaxedit.models.flux import FluxConfig, FluxTransformer, position_ids


def timed(fn: Callable[[], Any], repeats: int) -> list[float]:
  """Wall seconds of `repeats` calls; `fn` must block until its result is ready."""
  out = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    out.append(time.perf_counter() - start)
  return out


def add_device_arguments(p) -> None:
  """`--devices` and `--cpu_devices` of the suites that split their batch (`batch_mesh`)."""
  p.add_argument("--devices", type=int, default=0,
                 help="devices the batch is split over (0: as many as divide it)")
  p.add_argument("--cpu_devices", type=int, default=os.cpu_count(),
                 help="JAX CPU devices to expose, one per core by default (0: JAX's default)")


def batch_mesh(batch: int, devices: int = 0) -> jax.sharding.Mesh:
  """A ("data",) mesh to split a batch over, data parallel: `devices` devices (0: as many
  as divide `batch`). On CPU, with one JAX device per core (`expose_cpu_devices`), both cores
  run a rollout's or decode loop's matmuls."""
  devices = devices or math.gcd(batch, jax.device_count())
  return jax.sharding.Mesh(np.asarray(jax.devices()[:devices]), ("data",))


def devices_label(n: int) -> str:
  return f"{n} device{'s' * (n > 1)}"


def expose_cpu_devices(n: int) -> None:
  """`n` JAX CPU devices (one per core), so that a data-parallel program runs on every core:
  XLA runs a decode loop's small matmuls one after another on one core per device. Call it
  before any JAX operation; 0 keeps JAX's default (XLA_FLAGS, or one device). Programs on
  one device (the editor suites) run as before: their matmuls already use every core."""
  if n:
    jax.config.update("jax_num_cpu_devices", n)


def median(times: Sequence[float]) -> float:
  return statistics.median(times)


def write_json(result, path: str) -> None:
  """The benchmark's result as JSON at `path` (nothing for an empty path)."""
  if path:
    with open(path, "w") as fh:
      json.dump(result, fh, indent=1)


def machine() -> str:
  device = jax.devices()[0]
  cpu = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
  return cpu if device.platform == "cpu" else f"{device.device_kind} ({cpu})"


def matmul_peak(dtype=jnp.float32, n: int | None = None, repeats: int = 10) -> float:
  """FLOP/s of the best square matmul on the default device, measured now: the ceiling MFU
  is quoted against. Inputs rotate over 4 random pairs (not zeros, not one cached pair)."""
  on_cpu = jax.devices()[0].platform == "cpu"
  n = n or (2048 if on_cpu else 8192)
  keys = jax.random.split(jax.random.key(0), 8)
  pairs = [(jax.random.normal(keys[2 * i], (n, n), dtype),
            jax.random.normal(keys[2 * i + 1], (n, n), dtype)) for i in range(4)]
  matmul = jax.jit(jnp.matmul)
  jax.block_until_ready(matmul(*pairs[0]))
  times = []
  for i in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(matmul(*pairs[i % 4]))
    times.append(time.perf_counter() - start)
  return 2 * n**3 / min(times)


def jax_peak_bytes() -> int | None:
  """Peak device memory of this process so far (None where the backend keeps no count)."""
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


@dataclasses.dataclass
class FluxBench:
  """One Flux transformer with the same random weights in jaxedit and diffusers, and random
  inputs: noisy latents, Kontext source tokens, text context and pooled vector."""
  cfg: FluxConfig
  grid: tuple[int, int]
  params: Any  # float32 numpy tree (jaxedit layout)
  inputs: dict  # float32 numpy: x, source, context, pooled
  config: Any  # the ConfigDict, overrides applied
  config_name: str

  @property
  def tokens(self) -> int:
    return 2 * self.grid[0] * self.grid[1] + self.inputs["context"].shape[1]

  @property
  def num_params(self) -> int:
    return int(sum(x.size for x in jax.tree.leaves(self.params)))

  def model(self) -> FluxTransformer:
    return FluxTransformer(self.cfg)

  def velocity(self, params, x, t, source, context, pooled):
    return self.model().apply({"params": params}, x, t, context, pooled, self.grid,
                              source_tokens=source)

  def torch_model(self, device: str = "cpu", params=None):
    import diffusers
    import torch


    model = diffusers.FluxTransformer2DModel(**flux_diffusers.diffusers_config(self.cfg))
    model.load_state_dict({k: torch.from_numpy(v) for k, v in
                           flux_diffusers.to_diffusers(
                               self.params if params is None else params).items()},
                          strict=True)
    return model.to(device)

  def torch_ids(self, device: str = "cpu"):
    import torch

    img = np.concatenate([position_ids(*self.grid, 0), position_ids(*self.grid, 1)])
    return (torch.from_numpy(img.astype(np.float32)).to(device),
            torch.zeros(self.inputs["context"].shape[1], 3, device=device))


def flux_bench(config_path: str, batch: int, overrides: Sequence[str] = (),
               seed: int = 0) -> FluxBench:
  """The editor of `config_path` (with `--config.KEY=VALUE`-style overrides, given as
  KEY=VALUE) as a FluxBench with `batch` samples. The compute dtype comes from the config's
  model.dtype; parameters are float32."""
  config = config_lib.load_file(config_path)
  config_lib.apply_overrides(config, list(overrides))
  editor = editor_config(config.model, config.world.image_size, config.tokenizer.vocab_size)
  cfg = dataclasses.replace(editor.flux, param_dtype=jnp.float32,
                            dtype=DTYPES[config.model.dtype])
  grid = editor.grid
  rng = np.random.default_rng(seed)
  f = lambda *shape: rng.normal(size=shape).astype(np.float32)
  S, L = grid[0] * grid[1], config.model.text_max_len
  inputs = {"x": f(batch, S, cfg.in_channels), "source": f(batch, S, cfg.in_channels),
            "context": f(batch, L, cfg.joint_attention_dim),
            "pooled": f(batch, cfg.pooled_projection_dim)}
  abstract = jax.eval_shape(
      lambda: FluxTransformer(cfg).init(jax.random.key(0), inputs["x"][:1], jnp.ones((1,)),
                                        inputs["context"][:1], inputs["pooled"][:1], grid,
                                        source_tokens=inputs["source"][:1])["params"])
  params = jax.tree.map(lambda s: (rng.normal(size=s.shape) * 0.05).astype(np.float32),
                        nn.unbox(abstract))
  name = config_path + "".join(f" {o}" for o in overrides)
  return FluxBench(cfg, grid, params, inputs, config, name)
