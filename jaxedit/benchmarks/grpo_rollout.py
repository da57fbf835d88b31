"""Benchmark: Flow-GRPO rollout throughput, jaxedit vs a PyTorch loop over diffusers.

    python -m jaxedit.benchmarks.grpo_rollout [--config configs/shapes_editor_sft.py]
        [--batch 32] [--steps 8] [--repeats 5] [--out grpo_rollout.json]

Both sides run the same SDE sampling loop (DESIGN.md section 5: the Flow-GRPO mean, noise,
per-step log-prob, the trajectory kept for training) over the same Flux transformer with the
same weights (mapped by jaxedit.interop.flux_diffusers), with Kontext-style source tokens, on
this machine. Times are medians after a warm-up (JAX's compile time is reported apart).
A deterministic (ODE) rollout of both is compared first, so the two compute the same thing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxedit import flow
from jaxedit.config import load_file
from jaxedit.interop import flux_diffusers
from jaxedit.models.editor import editor_config
from jaxedit.models.flux import FluxTransformer, position_ids


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


def timed(fn, repeats: int) -> list[float]:
  out = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    out.append(time.perf_counter() - start)
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default="configs/shapes_editor_sft.py")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--steps", type=int, default=8)
  p.add_argument("--noise_level", type=float, default=0.7)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--out", default="grpo_rollout.json")
  args = p.parse_args(argv)

  import torch
  import diffusers

  torch.set_num_threads(os.cpu_count())
  config = load_file(args.config)
  editor = editor_config(config.model, config.world.image_size, config.tokenizer.vocab_size)
  cfg, grid = editor.flux, editor.grid
  S, L, D = grid[0] * grid[1], config.model.text_max_len, cfg.joint_attention_dim
  rng = np.random.default_rng(0)
  f = lambda *shape: rng.normal(size=shape).astype(np.float32)
  x1, source = f(args.batch, S, cfg.in_channels), f(args.batch, S, cfg.in_channels)
  context, pooled = f(args.batch, L, D), f(args.batch, cfg.pooled_projection_dim)
  params = FluxTransformer(cfg).init(jax.random.key(0), x1[:1], jnp.ones((1,)), context[:1],
                                     pooled[:1], grid, source_tokens=source[:1])["params"]
  # Random weights everywhere (zero-initialised gates would make the model trivial).
  leaves, tree = jax.tree.flatten(jax.tree.map(np.asarray, jax.device_get(
      nn.unbox(params))))
  params = jax.tree.unflatten(tree, [f(*x.shape) * 0.05 for x in leaves])

  model = diffusers.FluxTransformer2DModel(**flux_diffusers.diffusers_config(cfg)).eval()
  model.load_state_dict({k: torch.from_numpy(v) for k, v in
                         flux_diffusers.to_diffusers(params).items()}, strict=True)
  img_ids = torch.from_numpy(np.concatenate([position_ids(*grid, 0),
                                             position_ids(*grid, 1)]).astype(np.float32))
  txt_ids = torch.zeros(L, 3)
  times = np.asarray(flow.sigmas(args.steps, config.sample.shift))
  levels = np.full(args.steps, args.noise_level, np.float32)
  t_in = [torch.from_numpy(a) for a in (x1, source, context, pooled)]
  j_in = [jnp.asarray(a) for a in (x1, source, context, pooled)]

  # ---- Same computation: a deterministic rollout on both sides ----
  ode = jax_rollout(cfg, grid, jnp.asarray(times), jnp.zeros(args.steps))
  ours = np.asarray(ode(params, *j_in, jax.random.key(0))["sample"])
  with torch.no_grad():
    ref = torch_rollout(model, *t_in, img_ids, txt_ids, times, np.zeros(args.steps),
                        None)[0].numpy()
  rel_err = float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))

  # ---- Throughput of the SDE rollout ----
  sde = jax_rollout(cfg, grid, jnp.asarray(times), jnp.asarray(levels))
  start = time.perf_counter()
  jax.block_until_ready(sde(params, *j_in, jax.random.key(1)))
  compile_s = time.perf_counter() - start
  jax_s = timed(lambda: jax.block_until_ready(sde(params, *j_in, jax.random.key(1))),
                args.repeats)
  generator = torch.Generator().manual_seed(0)
  with torch.no_grad():
    torch_rollout(model, *t_in, img_ids, txt_ids, times, levels, generator)  # warm-up
    torch_s = timed(lambda: torch_rollout(model, *t_in, img_ids, txt_ids, times, levels,
                                          generator), args.repeats)

  jax_med, torch_med = statistics.median(jax_s), statistics.median(torch_s)
  result = {
      "suite": "grpo_rollout", "batch": args.batch, "steps": args.steps, "tokens": 2 * S + L,
      "config": args.config, "device": jax.devices()[0].device_kind,
      "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
      "jaxedit_s": jax_med, "reference_s": torch_med, "speedup": torch_med / jax_med,
      "jaxedit_samples_per_s": args.batch / jax_med,
      "reference_samples_per_s": args.batch / torch_med,
      "jax_compile_s": compile_s, "ode_rollout_rel_err": rel_err,
      "jax_times_s": jax_s, "reference_times_s": torch_s,
      "versions": {"jax": jax.__version__, "torch": torch.__version__,
                   "diffusers": diffusers.__version__},
  }
  print(f"GRPO rollout: {args.batch} samples x {args.steps} SDE steps, {2 * S + L} tokens, "
        f"{result['machine']}")
  print(f"{'implementation':<34}{'s / rollout':>12}{'samples/s':>11}")
  print(f"{'jaxedit (jit, lax.scan)':<34}{jax_med:>12.3f}{args.batch / jax_med:>11.1f}")
  print(f"{'PyTorch loop, diffusers Flux':<34}{torch_med:>12.3f}{args.batch / torch_med:>11.1f}")
  print(f"speedup (reference_s / jaxedit_s): {result['speedup']:.2f}x; JAX compile "
        f"{compile_s:.1f} s; ODE rollouts agree to {rel_err:.1e} relative")
  with open(args.out, "w") as fh:
    json.dump(result, fh, indent=1)
  return result


if __name__ == "__main__":
  main()
