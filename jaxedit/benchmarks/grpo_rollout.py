"""Benchmark: Flow-GRPO rollout throughput, jaxedit vs a PyTorch loop over diffusers.

    python -m jaxedit.benchmarks.grpo_rollout [--config configs/shapes_editor_sft.py]
        [--set KEY=VALUE] [--batch 32] [--steps 8] [--repeats 5] [--out grpo_rollout.json]

Both sides run the same SDE sampling loop (docs/design.md section 5: the Flow-GRPO mean, noise,
per-step log-prob, the trajectory kept for training) over the same Flux transformer with the
same weights (mapped by jaxedit.interop.flux_diffusers), with Kontext-style source tokens, on
this machine. Times are medians after a warm-up (JAX's compile time is reported apart).
jaxedit splits the batch over the devices (on CPU, one JAX device per core: `--cpu_devices`),
as PyTorch spreads its matmuls over the cores' threads.
A deterministic (ODE) rollout of both is compared first, so the two compute the same thing.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxedit import flops, flow
from jaxedit.benchmarks import common
from jaxedit.models.flux import FluxTransformer


def jax_rollout(cfg, grid, times, levels):
  model = FluxTransformer(cfg)

  @jax.jit
  def rollout(params, x1, source, context, pooled, rng):
    velocity = lambda x, t: model.apply({"params": params}, x, t, context, pooled, grid,
                                        source_tokens=source)
    return flow.sde_rollout(velocity, x1, times, rng, levels, keep_trajectory=True)
  return rollout


def torch_rollout(model, x1, source, context, pooled, img_ids, txt_ids, times, levels,
                  generator):
  """The same loop in PyTorch: Flow-GRPO's SDE step, log-prob averaged over dims."""
  import torch

  x, latents, log_probs = x1, [x1], []
  n = x.shape[1]
  for i in range(len(times) - 1):
    t, t_next, level = float(times[i]), float(times[i + 1]), float(levels[i])
    v = model(hidden_states=torch.cat([x, source], dim=1), encoder_hidden_states=context,
              pooled_projections=pooled, timestep=torch.full((x.shape[0],), t),
              img_ids=img_ids, txt_ids=txt_ids, return_dict=False)[0][:, :n]
    dt = t_next - t
    sigma = level * np.sqrt(t / (1 - (t_next if t >= 1 else t)))
    mean = x * (1 + sigma**2 / (2 * t) * dt) + v * (1 + sigma**2 * (1 - t) / (2 * t)) * dt
    std = sigma * np.sqrt(-dt)
    if std > 0:
      x = mean + std * torch.randn(mean.shape, generator=generator)
      log_probs.append((-((x - mean) ** 2) / (2 * std**2) - np.log(std)
                        - 0.5 * np.log(2 * np.pi)).mean(dim=(1, 2)))
    else:
      x = mean
      log_probs.append(torch.zeros(x.shape[0]))
    latents.append(x)
  return x, torch.stack(latents), torch.stack(log_probs)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default="configs/shapes_editor_sft.py")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="config override, e.g. model.num_layers=4 (repeatable)")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--steps", type=int, default=8)
  p.add_argument("--noise_level", type=float, default=0.7)
  p.add_argument("--repeats", type=int, default=5)
  common.add_device_arguments(p)
  p.add_argument("--out", default="grpo_rollout.json")
  args = p.parse_args(argv)
  common.expose_cpu_devices(args.cpu_devices)  # before any JAX operation
  return run(args.config, args.set, args.batch, args.steps, args.noise_level, args.repeats,
             args.out, args.devices)


def run(config: str, overrides, batch: int, steps: int, noise_level: float, repeats: int,
        out: str = "", devices: int = 0) -> dict:
  """`devices`: the batch split over that many devices (`common.batch_mesh`); on one CPU
  device XLA keeps 1.8 of 2 cores busy."""
  import diffusers
  import torch

  torch.set_num_threads(os.cpu_count())
  bench = common.flux_bench(config, batch, overrides)
  cfg, grid, params = bench.cfg, bench.grid, bench.params
  model = bench.torch_model().eval()
  img_ids, txt_ids = bench.torch_ids()
  times = np.asarray(flow.sigmas(steps, bench.config.sample.shift))
  levels = np.full(steps, noise_level, np.float32)
  names = ("x", "source", "context", "pooled")
  t_in = [torch.from_numpy(bench.inputs[k]) for k in names]
  mesh = common.batch_mesh(batch, devices)
  devices = mesh.size
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  j_in = [jax.device_put(bench.inputs[k], rows) for k in names]
  params = jax.device_put(params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))

  # ---- Same computation: a deterministic rollout on both sides ----
  ode = jax_rollout(cfg, grid, jnp.asarray(times), jnp.zeros(steps))
  ours = np.asarray(ode(params, *j_in, jax.random.key(0))["sample"])
  with torch.no_grad():
    ref = torch_rollout(model, *t_in, img_ids, txt_ids, times, np.zeros(steps),
                        None)[0].numpy()
  rel_err = float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))

  # ---- Throughput of the SDE rollout ----
  sde = jax_rollout(cfg, grid, jnp.asarray(times), jnp.asarray(levels))
  model_flops = flops.count(sde, params, *j_in, jax.random.key(1))
  start = time.perf_counter()
  jax.block_until_ready(sde(params, *j_in, jax.random.key(1)))
  compile_s = time.perf_counter() - start
  jax_s = common.timed(lambda: jax.block_until_ready(sde(params, *j_in, jax.random.key(1))),
                       repeats)
  generator = torch.Generator().manual_seed(0)
  with torch.no_grad():
    torch_rollout(model, *t_in, img_ids, txt_ids, times, levels, generator)  # warm-up
    torch_s = common.timed(lambda: torch_rollout(model, *t_in, img_ids, txt_ids, times,
                                                 levels, generator), repeats)

  jax_med, torch_med = common.median(jax_s), common.median(torch_s)
  result = {
      "suite": "grpo_rollout", "batch": batch, "steps": steps, "tokens": bench.tokens,
      "devices": devices,
      "params": bench.num_params, "config": bench.config_name,
      "device": jax.devices()[0].device_kind, "machine": common.machine(),
      "jaxedit_s": jax_med, "reference_s": torch_med, "speedup": torch_med / jax_med,
      "jaxedit_samples_per_s": batch / jax_med, "reference_samples_per_s": batch / torch_med,
      "model_flops": model_flops, "jax_compile_s": compile_s, "ode_rollout_rel_err": rel_err,
      "jax_times_s": jax_s, "reference_times_s": torch_s,
      "versions": {"jax": jax.__version__, "torch": torch.__version__,
                   "diffusers": diffusers.__version__},
  }
  print(f"GRPO rollout: {batch} samples x {steps} SDE steps, {bench.tokens} tokens, "
        f"{result['machine']}")
  print(f"{'implementation':<34}{'s / rollout':>12}{'samples/s':>11}")
  name = f"jaxedit (jit, lax.scan, {common.devices_label(devices)})"
  print(f"{name:<34}{jax_med:>12.3f}{batch / jax_med:>11.1f}")
  print(f"{'PyTorch loop, diffusers Flux':<34}{torch_med:>12.3f}{batch / torch_med:>11.1f}")
  print(f"speedup (reference_s / jaxedit_s): {result['speedup']:.2f}x; JAX compile "
        f"{compile_s:.1f} s; ODE rollouts agree to {rel_err:.1e} relative")
  common.write_json(result, out)
  return result


if __name__ == "__main__":
  main()
