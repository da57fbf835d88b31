"""Benchmark: planner decoding throughput, jaxedit's KV-cache sampler vs transformers
`generate`.

    python -m jaxedit.benchmarks.planner_decode [--config configs/shapes_planner_sft.py]
        [--batch 32] [--prompt 32] [--new 96] [--attend-chunk 32] [--repeats 5]
        [--devices 0] [--cpu_devices N] [--out planner_decode.json]

Both sides run the same Qwen2-layout LM (the config's `model` section, text only) with the
same random weights (mapped by jaxedit.interop.lm_transformers) on the same left-padded
prompts, greedily, for exactly `--new` tokens (no stop token), on this machine. The two
greedy outputs are compared token for token first, so both compute the same thing. Times are
medians after a warm-up; JAX's compile time is reported apart. jaxedit splits the batch over
the devices (on CPU, one JAX device per core: `--cpu_devices`), as transformers spreads its
matmuls over the cores' threads.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics

import flax.linen as nn
import jax
import numpy as np

from jaxedit import sampling, sharding
from jaxedit.benchmarks import common
from jaxedit.config import load_file
from jaxedit.interop import lm_transformers
from jaxedit.models.planner import Planner, PlannerConfig, planner_config


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default="configs/shapes_planner_sft.py")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--prompt", type=int, default=32, help="prompt tokens (some rows padded)")
  p.add_argument("--new", type=int, default=96, help="tokens generated per row")
  p.add_argument("--attend-chunk", type=int, default=sampling.SamplingConfig.attend_chunk,
                 help="decode segment length (0: attend to the whole cache every token)")
  p.add_argument("--repeats", type=int, default=5)
  common.add_device_arguments(p)
  p.add_argument("--out", default="planner_decode.json")
  args = p.parse_args(argv)
  common.expose_cpu_devices(args.cpu_devices)  # before any JAX operation

  import torch
  import transformers

  torch.set_num_threads(os.cpu_count())
  config = load_file(args.config)
  cfg = planner_config(config.model, config.world).lm
  model = Planner(PlannerConfig(cfg, vision=None))
  rng = np.random.default_rng(0)
  # Prompts of different lengths, left-padded (token 0 is padding).
  lengths = rng.integers(args.prompt // 2, args.prompt + 1, args.batch)
  rows = [list(rng.integers(1, cfg.vocab_size, n)) for n in lengths]
  ids, valid = sampling.left_pad(rows, 0, args.prompt)
  params = model.init(jax.random.key(0), ids[:1], valid[:1])["params"]
  leaves, tree = jax.tree.flatten(jax.device_get(nn.unbox(params)))
  params = jax.tree.unflatten(tree, [rng.normal(size=x.shape).astype(np.float32) * 0.1
                                     for x in leaves])

  hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
      **lm_transformers.hf_config(cfg, "qwen2", pad_token_id=0))).eval()
  state = {k: torch.from_numpy(v) for k, v in lm_transformers.to_transformers(params["lm"]).items()}
  missing, unexpected = hf.load_state_dict(state, strict=False)
  if unexpected or set(missing) - {"lm_head.weight"}:
    raise RuntimeError(f"weights did not map: missing {missing}, unexpected {unexpected}")
  hf.tie_weights()

  settings = sampling.SamplingConfig(args.new, stop_ids=(), pad_id=0,
                                     attend_chunk=args.attend_chunk)
  # Data parallel over the devices: on CPU, one per core (XLA runs the decode loop's small
  # matmuls on one core per device).
  mesh = common.batch_mesh(args.batch, args.devices)
  devices = mesh.size
  rules = (("batch", "data"), ("activation_batch", "data"))
  sample = sampling.make_sampler(model, settings, mesh, rules)
  rows = sharding.batch_sharding(mesh, rules)
  j_params = jax.device_put(params, sharding.replicated(mesh))
  j_ids, j_valid = jax.device_put(ids, rows), jax.device_put(valid, rows)
  run_jax = lambda: jax.block_until_ready(sample(j_params, j_ids, j_valid, jax.random.key(0),
                                                 0.0))
  t_ids, t_mask = torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(valid.astype(np.int64))

  def run_torch():
    with torch.no_grad():
      return hf.generate(input_ids=t_ids, attention_mask=t_mask, do_sample=False,
                         max_new_tokens=args.new, min_new_tokens=args.new, pad_token_id=0,
                         eos_token_id=None)

  # ---- Same computation: greedy tokens agree ----
  start = common.timed(run_jax, 1)[0]  # the first call compiles
  ours = np.asarray(run_jax().tokens)
  ref = run_torch()[:, args.prompt:].numpy()
  agree = float((ours == ref).mean())

  # ---- Throughput ----
  jax_s = common.timed(run_jax, args.repeats)
  torch_s = common.timed(run_torch, args.repeats)
  jax_med, torch_med = statistics.median(jax_s), statistics.median(torch_s)
  tokens = args.batch * args.new
  result = {
      "suite": "planner_decode", "batch": args.batch, "prompt_tokens": args.prompt,
      "new_tokens": args.new, "attend_chunk": args.attend_chunk, "devices": devices,
      "config": args.config,
      "params": int(sum(x.size for x in jax.tree.leaves(params["lm"]))),
      "device": jax.devices()[0].device_kind,
      "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
      "jaxedit_s": jax_med, "reference_s": torch_med, "speedup": torch_med / jax_med,
      "jaxedit_tokens_per_s": tokens / jax_med, "reference_tokens_per_s": tokens / torch_med,
      "jax_compile_s": start, "greedy_token_agreement": agree,
      "jax_times_s": jax_s, "reference_times_s": torch_s,
      "versions": {"jax": jax.__version__, "torch": torch.__version__,
                   "transformers": transformers.__version__},
  }
  print(f"planner decode: batch {args.batch}, {args.prompt}-token prompts, {args.new} new "
        f"tokens, {result['params'] / 1e6:.2f}M parameters, {result['machine']}")
  print(f"{'implementation':<38}{'s / batch':>10}{'tokens/s':>10}")
  name = f"jaxedit (KV cache, {common.devices_label(devices)})"
  print(f"{name:<38}{jax_med:>10.3f}{tokens / jax_med:>10.0f}")
  print(f"{'transformers generate (greedy)':<38}{torch_med:>10.3f}{tokens / torch_med:>10.0f}")
  print(f"speedup (reference_s / jaxedit_s): {result['speedup']:.2f}x; JAX first call "
        f"{start:.1f} s; greedy tokens agree {agree:.1%}")
  common.write_json(result, args.out)
  return result


if __name__ == "__main__":
  main()
