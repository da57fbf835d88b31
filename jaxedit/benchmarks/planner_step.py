"""Benchmark: where a pretrained planner's SFT step goes, and what each option saves.

    python -m jaxedit.benchmarks.planner_step [--config configs/shapes_planner_sft.py:smollm2]
        [--batch 16] [--repeats 3] [--variants all] [--out planner_step.json]

One real batch of the shapes world (the config's prompt layout, padded as training pads it) is
trained on by each variant of the step, side by side in one run: full fine-tuning with the
output head on every position (the step before `head_span`), then the head on the plan
positions only, LoRA, remat, unrolled layers, bfloat16 compute. Weights are random (time does
not depend on them); the architecture is read from the config's `init_from` (SmolLM2-135M's
GGUF metadata for `:smollm2`). Reported: the median step time after a compiling call, the
tokens per second, the model FLOPs per step (6 N per token trained, 4 N frozen, plus the head)
and their share of a matmul peak measured in the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile

import jax
import jax.numpy as jnp
import ml_collections
import optax

from jaxedit import config as config_lib, flow, lora, planning, sharding
from jaxedit.benchmarks import common
from jaxedit.data.pipeline import make_dataset
from jaxedit.interop import pretrained
from jaxedit.train import setup as setup_lib

# name -> (config overrides, head on every position)
VARIANTS = {
    "full FT, head on all positions": ({}, True),
    "full FT": ({}, False),
    "LoRA r16": ({"model.lora_rank": 16, "model.lora_alpha": 16.0}, False),
    "LoRA r16, remat": ({"model.lora_rank": 16, "model.lora_alpha": 16.0,
                         "model.remat_policy": "full"}, False),
    "LoRA r16, unrolled layers": ({"model.lora_rank": 16, "model.lora_alpha": 16.0,
                                   "model.scan_layers": False}, False),
    "LoRA r16, bfloat16 compute": ({"model.lora_rank": 16, "model.lora_alpha": 16.0,
                                    "model.dtype": "bfloat16"}, False),
}


def step_fn(setup, all_positions: bool):
  """A jitted SFT step (plan cross-entropy, AdamW): the trainer's, or with the head on every
  position."""
  model = setup.model

  def loss(params, base, batch):
    whole = lora.whole(params, base)
    if all_positions:  # the forward before head_span: logits everywhere, then sliced
      image = flow.to_model_space(batch["source_image"])
      ids = jnp.concatenate([batch["prompt"], batch["plan"]], axis=1)
      b, p = batch["prompt"].shape
      valid = jnp.concatenate([jnp.ones((b, model.cfg.prefix_len), bool), batch["prompt_valid"],
                               batch["plan_valid"]], axis=1)
      first = model.cfg.prefix_len + p - 1
      logits = model.apply({"params": whole}, ids, valid, image=image)[
          :, first:first + batch["plan"].shape[1]]
    else:
      logits = planning.completion_logits(whole, model, batch)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["plan"])
    mask = batch["plan_valid"].astype(jnp.float32)
    return (nll * mask).sum() / mask.sum()

  def step(state, batch):
    value, grads = jax.value_and_grad(loss)(state.params, state.base, batch)
    params, ema, opt_state, _ = setup.optimizer.update(
        {"lr": jnp.float32(1e-4)}, state.params, state.ema_params, state.opt_state, grads,
        state.step)
    return state.replace(step=state.step + 1, params=params, ema_params=ema,
                         opt_state=opt_state), value

  fn = jax.jit(step, in_shardings=(setup.state_shardings, setup.batch_sharding),
               donate_argnums=0)
  return sharding.Program(fn, setup.mesh, setup.rules)


def model_flops(setup, batch) -> float:
  """6 N per trained token position (forward, input and weight gradients), 4 N where the
  weights are frozen (LoRA: no weight gradients), with N the LM's matmul parameters; the head
  counted on the plan positions."""
  lm = setup.model.cfg.lm
  per_layer = (lm.hidden_size * (lm.num_heads + 2 * lm.num_kv_heads) * lm.head_dim
               + lm.num_heads * lm.head_dim * lm.hidden_size
               + 3 * lm.hidden_size * lm.intermediate_size)
  body = per_layer * lm.num_layers
  head = lm.hidden_size * lm.vocab_size
  b = batch["prompt"].shape[0]
  tokens = b * (setup.model.cfg.prefix_len + batch["prompt"].shape[1] + batch["plan"].shape[1])
  plan = b * batch["plan"].shape[1]
  factor = 4 if lm.lora_rank else 6
  return factor * body * tokens + factor * head * plan


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default="configs/shapes_planner_sft.py:smollm2")
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--variants", default="all", help="names separated by ';', or all")
  p.add_argument("--out", default="planner_step.json")
  args = p.parse_args(argv)
  names = list(VARIANTS) if args.variants == "all" else args.variants.split(";")
  base_config = config_lib.load_file(args.config)
  peak = common.matmul_peak()
  rows, batch_np = [], None
  workdir = tempfile.mkdtemp(prefix="planner_step_")
  pretrained.copy_tokenizer(base_config.init_from, workdir)
  for name in names:
    overrides, all_positions = VARIANTS[name]
    config = ml_collections.ConfigDict(base_config.to_dict())
    config_lib.apply_overrides(config, [f"{k}={v}" for k, v in overrides.items()]
                               + [f"train.batch_size={args.batch}", "mesh.shape=(1, 1, 1)"])
    setup = planning.make_setup(config, workdir, devices=jax.devices()[:1])
    if batch_np is None:  # one batch for every variant
      records = next(iter(make_dataset(setup.source("train"), args.batch, seed=0,
                                       fields=planning.RECORD_FIELDS,
                                       kinds=config.train.example_kinds)))
      batch_np = setup.examples(records, trim=True)
    batch = sharding.global_batch(batch_np, setup.batch_sharding)
    state = setup_lib.init_state(setup)
    step = step_fn(setup, all_positions)
    holder = {"state": state}

    def run(step=step, holder=holder, batch=batch):
      holder["state"], value = step(holder["state"], batch)
      jax.block_until_ready(value)

    compile_s = common.timed(run, 1)[0]
    times = common.timed(run, args.repeats)
    med = common.median(times)
    flops = model_flops(setup, batch_np)
    tokens = batch_np["prompt"].size + batch_np["plan"].size + args.batch * (
        setup.model.cfg.prefix_len)
    rows.append({"variant": name, "step_s": med, "first_call_s": compile_s,
                 "tokens_per_s": tokens / med, "model_flops": flops,
                 "flops_share_of_peak": flops / med / peak, "times_s": times,
                 "overrides": overrides, "head_on_all_positions": all_positions})
    del holder, state
  base = rows[0]["step_s"]
  for row in rows:
    row["speedup_vs_first"] = base / row["step_s"]
  lm = dataclasses.asdict(setup.model.cfg.lm)
  result = {"suite": "planner_step", "config": args.config, "batch": args.batch,
            "prompt_tokens": int(batch_np["prompt"].shape[1]),
            "plan_tokens": int(batch_np["plan"].shape[1]),
            "real_plan_tokens": int(batch_np["plan_valid"].sum()),
            "prefix_tokens": setup.model.cfg.prefix_len, "machine": common.machine(),
            "matmul_peak_flops": peak, "lm": {k: str(v) for k, v in lm.items()},
            "variants": rows}
  print(f"planner SFT step: {args.config}, batch {args.batch} ({result['prefix_tokens']} image"
        f" + {result['prompt_tokens']} prompt + {result['plan_tokens']} plan positions), "
        f"{result['machine']}, matmul peak {peak / 1e9:.0f} GFLOP/s")
  print(f"{'variant':<34}{'s/step':>8}{'first call':>12}{'tokens/s':>10}{'of peak':>9}"
        f"{'speedup':>9}")
  for row in rows:
    print(f"{row['variant']:<34}{row['step_s']:>8.2f}{row['first_call_s']:>12.1f}"
          f"{row['tokens_per_s']:>10.0f}{row['flops_share_of_peak']:>9.1%}"
          f"{row['speedup_vs_first']:>8.2f}x")
  common.write_json(result, args.out)
  return result


if __name__ == "__main__":
  main()
