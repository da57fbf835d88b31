"""Benchmark: population mode (K learning rates in one vmapped program) against K sequential
runs, on the editor SFT step.

    python -m jaxedit.benchmarks.population [--config configs/shapes_editor_sft.py]
        [--members 4] [--batch 32] [--repeats 10] [--out population.json]

Both sides train the same model on the same batches on this machine's devices: K runs
(one compiled step, called once per member per step, as K runs one after another would) and
one population step over K members. Times are medians after warm-up; the figure that
matters is member-steps per second, and its ratio.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time

import jax
import numpy as np

from jaxedit import population, sharding
from jaxedit.train import setup as setup_lib
from jaxedit.config import load_file
from jaxedit.trainers import editor_sft


def fake_batch(setup, n: int, seed: int = 0) -> dict:
  """Random images and token ids of the step's shapes (no dataset needed)."""
  rng = np.random.default_rng(seed)
  size, length = setup.world.image_size, setup.config.model.text_max_len
  batch = {"source_image": rng.integers(0, 256, (n, size, size, 3), np.uint8),
           "target_image": rng.integers(0, 256, (n, size, size, 3), np.uint8),
           "ids": rng.integers(0, setup.tokenizer.get_vocab_size(), (n, length), np.int32),
           "mask": np.ones((n, length), bool)}
  return sharding.global_batch(batch, setup.batch_sharding)


def median_seconds(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default="configs/shapes_editor_sft.py")
  p.add_argument("--members", type=int, default=4)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--repeats", type=int, default=10)
  p.add_argument("--out", default="population.json")
  args = p.parse_args(argv)

  config = load_file(args.config)
  with config.unlocked():
    config.train.batch_size = config.eval.batch_size = args.batch
  k = args.members
  rates = [float(config.train.lr) * 2.0 ** (i - k // 2) for i in range(k)]
  with tempfile.TemporaryDirectory() as scratch:
    setup = editor_sft.make_setup(config, scratch)
  batch = fake_batch(setup, args.batch)
  one = setup_lib.init_state(setup)

  # ---- K sequential runs: one compiled step, K states ----
  step = editor_sft.make_train_step(setup)
  states = [jax.tree.map(lambda x: x.copy(), one) for _ in range(k)]
  hps = [{"lr": np.float32(r)} for r in rates]

  def sequential():
    for i in range(k):
      states[i], metrics = step.with_hparams(hps[i])(states[i], batch)
    return metrics
  start = time.perf_counter()
  jax.block_until_ready(sequential())
  sequential_compile = time.perf_counter() - start

  # ---- One population step over K members ----
  pop_step = population.make_step(setup, editor_sft.train_step_fn(setup))
  stacked = population.replicate_members(one, k, setup)
  hp = {"lr": np.asarray(rates, np.float32)}
  box = [stacked]

  def together():
    box[0], metrics = pop_step(box[0], batch, hp)
    return metrics
  start = time.perf_counter()
  jax.block_until_ready(together())
  population_compile = time.perf_counter() - start

  seq_s = median_seconds(sequential, args.repeats)
  pop_s = median_seconds(together, args.repeats)
  n_params = sum(x.size for x in jax.tree.leaves(one.params))
  result = {"config": args.config, "members": k, "batch": args.batch, "parameters": n_params,
            "devices": jax.device_count(), "platform": platform.processor() or platform.machine(),
            "sequential_s_per_step": seq_s, "population_s_per_step": pop_s,
            "sequential_member_steps_per_s": k / seq_s, "population_member_steps_per_s": k / pop_s,
            "speedup": seq_s / pop_s, "sequential_compile_s": sequential_compile,
            "population_compile_s": population_compile, "learning_rates": rates}
  print(f"editor SFT step, {n_params / 1e6:.2f}M parameters, batch {args.batch}, "
        f"{k} members, {jax.device_count()} device(s)")
  print(f"{'mode':<30}{'s / step (all K)':>18}{'member-steps/s':>16}")
  print(f"{'K sequential runs':<30}{seq_s:>18.3f}{k / seq_s:>16.2f}")
  print(f"{'population (one vmapped step)':<30}{pop_s:>18.3f}{k / pop_s:>16.2f}")
  print(f"population speedup: {result['speedup']:.2f}x (compile: sequential "
        f"{sequential_compile:.1f} s, population {population_compile:.1f} s)")
  with open(args.out, "w") as fh:
    json.dump(result, fh, indent=1)
  return result


if __name__ == "__main__":
  main()
