"""Benchmark: one optimiser step of the Flux editor, jaxedit vs diffusers in PyTorch.

    python -m jaxedit.benchmarks.editor_step --suite editor_sft_step|grpo_update|opd_step
        [--config configs/shapes_editor_sft.py] [--batch 32] [--repeats 5] [--set KEY=VALUE]

Three losses over the same Flux transformer (same random weights, same inputs), each a
forward and backward of the trained model plus an AdamW update:
  editor_sft_step  the flow-matching loss (docs/design.md section 4);
  grpo_update      Flow-GRPO's loss of one trained SDE step: clipped log-prob ratio plus the
                   KL to a frozen reference, whose forward runs too (section 5);
  opd_step         on-policy distillation: the closed-form step KL to a frozen teacher's mean
                   (section 7).
The jaxedit side calls the library's own loss functions (flow.sft_loss,
flow_grpo.step_loss, opd.step_kl) inside one jitted step with donated parameters and
optimiser state; the PyTorch side is diffusers' FluxTransformer2DModel with the same
formulas written in torch and torch.optim.AdamW. Both compute in the config's model.dtype
(bf16 through autocast on the PyTorch side) with float32 weights. The first losses are
compared before timing, so both compute the same thing.
"""

from __future__ import annotations

import argparse
import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxedit import flops, flow, flow_grpo, opd
from jaxedit.benchmarks import common
from jaxedit.models.flux import attention_implementation

SUITES = ("editor_sft_step", "grpo_update", "opd_step")
LR, WEIGHT_DECAY = 1e-4, 1e-4
T, T_NEXT, NOISE_LEVEL, CLIP_RANGE, KL_BETA = 0.6, 0.5, 0.7, 0.2, 0.04


def step_inputs(bench: common.FluxBench, seed: int = 1) -> dict:
  """The suite-independent extras: the clean target, noise, timesteps, a trajectory step's
  next latents, old log-probs and advantages (random, like a rollout's)."""
  rng = np.random.default_rng(seed)
  x = bench.inputs["x"]
  n = x.shape[0]
  return {"x0": rng.normal(size=x.shape).astype(np.float32),
          "t": rng.uniform(0.05, 0.95, n).astype(np.float32),
          "x_next": (x + 0.1 * rng.normal(size=x.shape)).astype(np.float32),
          "log_probs": rng.normal(-1.0, 0.1, n).astype(np.float32),
          "advantages": rng.normal(size=n).astype(np.float32)}


# ------------------------------------------------------------------------------------------
# jaxedit
# ------------------------------------------------------------------------------------------
def jax_loss(bench: common.FluxBench, suite: str):
  """(params, frozen, batch) -> scalar loss, with the library's loss functions."""
  def velocity(params, x, t, source, text):
    return bench.velocity(params, x, t, source, *text)

  def loss(params, frozen, b):
    text = (b["context"], b["pooled"])
    if suite == "editor_sft_step":
      x_t = flow.interpolate(b["x0"], b["x"], b["t"])  # b["x"] is the noise here
      return flow.sft_loss(velocity(params, x_t, b["t"], b["source"], text), b["x0"], b["x"])
    if suite == "grpo_update":
      batch = {"latents": jnp.stack([b["x"], b["x_next"]]), "log_probs": b["log_probs"][None],
               "advantages": b["advantages"], "source": b["source"], "text": text}
      ref = lambda x, t, source, text: velocity(frozen, x, t, source, text)
      return flow_grpo.step_loss(velocity, params, ref, batch, jnp.int32(0),
                                 jnp.array([T, T_NEXT]), jnp.array([NOISE_LEVEL]),
                                 sde_type="sde", clip_range=CLIP_RANGE, kl_beta=KL_BETA)[0]
    if suite == "opd_step":
      t = jnp.full((b["x"].shape[0],), T)
      v_student = velocity(params, b["x"], t, b["source"], text)
      v_teacher = velocity(frozen, b["x"], t, b["source"], text)
      return jnp.mean(opd.step_kl(b["x"], v_student, v_teacher, T, T_NEXT, NOISE_LEVEL))
    raise ValueError(f"unknown suite {suite!r}; one of {SUITES}")
  return loss


def jax_step(bench: common.FluxBench, suite: str):
  optimizer = optax.adamw(LR, weight_decay=WEIGHT_DECAY)
  loss_fn = jax_loss(bench, suite)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, opt_state, frozen, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, frozen, batch)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss
  return step, optimizer


# ------------------------------------------------------------------------------------------
# PyTorch (diffusers)
# ------------------------------------------------------------------------------------------
def torch_loss(model, frozen, b, img_ids, txt_ids, suite: str):
  import torch

  n = b["x"].shape[1]

  def velocity(m, x, t):
    return m(hidden_states=torch.cat([x, b["source"]], dim=1), encoder_hidden_states=b["context"],
             pooled_projections=b["pooled"], timestep=t, img_ids=img_ids, txt_ids=txt_ids,
             return_dict=False)[0][:, :n].float()

  def step_mean(x, v):
    dt = T_NEXT - T
    sigma = NOISE_LEVEL * np.sqrt(T / (1 - T))
    mean = x * (1 + sigma**2 / (2 * T) * dt) + v * (1 + sigma**2 * (1 - T) / (2 * T)) * dt
    return mean, sigma * np.sqrt(-dt), sigma

  if suite == "editor_sft_step":
    t = b["t"][:, None, None]
    x_t = (1 - t) * b["x0"] + t * b["x"]
    return ((velocity(model, x_t, b["t"]) - (b["x"] - b["x0"])) ** 2).mean()
  t = torch.full((b["x"].shape[0],), T, device=b["x"].device)
  mean, std, sigma = step_mean(b["x"], velocity(model, b["x"], t))
  with torch.no_grad():
    frozen_mean = step_mean(b["x"], velocity(frozen, b["x"], t))[0]
  if suite == "grpo_update":
    logp = (-((b["x_next"] - mean) ** 2) / (2 * std**2) - np.log(std)
            - 0.5 * np.log(2 * np.pi)).mean(dim=(1, 2))
    ratio = torch.exp(logp - b["log_probs"])
    policy = torch.maximum(-b["advantages"] * ratio,
                           -b["advantages"] * ratio.clamp(1 - CLIP_RANGE, 1 + CLIP_RANGE))
    kl = ((mean - frozen_mean) ** 2).mean(dim=(1, 2)) / (2 * sigma**2)
    return (policy + KL_BETA * kl).mean()
  return (((mean - frozen_mean) ** 2).sum(dim=(1, 2)) / (2 * std**2)).mean()


def frozen_params(bench: common.FluxBench, suite: str, seed: int = 2):
  """The frozen model: GRPO's reference starts equal to the policy; OPD's teacher differs
  (each weight perturbed by 10%), or the distillation loss would be zero."""
  if suite != "opd_step":
    return bench.params
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: (p * (1 + 0.1 * rng.normal(size=p.shape))).astype(np.float32),
                      bench.params)


def time_jax(bench: common.FluxBench, suite: str, host: dict, repeats: int) -> dict:
  """Compiles the step, then times steps threading the donated state."""
  step, optimizer = jax_step(bench, suite)
  params = jax.tree.map(jnp.asarray, bench.params)
  frozen = (None if suite == "editor_sft_step" else  # SFT has no frozen model
            jax.tree.map(jnp.asarray, frozen_params(bench, suite)))
  opt_state = optimizer.init(params)
  batch = {k: jnp.asarray(v) for k, v in host.items()}
  model_flops = flops.count(step, params, opt_state, frozen, batch)
  start = time.perf_counter()
  compiled = step.lower(params, opt_state, frozen, batch).compile()
  compile_s = time.perf_counter() - start
  state = [params, opt_state]

  def run():
    state[0], state[1], loss = compiled(state[0], state[1], frozen, batch)
    return jax.block_until_ready(loss)
  first_loss = float(run())
  times = common.timed(run, repeats)
  return {"times": times, "first_loss": first_loss, "model_flops": model_flops,
          "compile_s": compile_s, "peak_bytes": common.jax_peak_bytes(),
          "temp_bytes": getattr(compiled.memory_analysis(), "temp_size_in_bytes", None)}


def time_torch(bench: common.FluxBench, suite: str, host: dict, repeats: int,
               device: str) -> dict:
  """The same step in PyTorch. It runs first, and its GPU memory is freed on return (JAX's
  allocator would keep what it freed, and PyTorch could not have it)."""
  import torch

  model = bench.torch_model(device).train()
  frozen = (None if suite == "editor_sft_step" else
            bench.torch_model(device, frozen_params(bench, suite)).eval())
  optim = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
  img_ids, txt_ids = bench.torch_ids(device)
  batch = {k: torch.from_numpy(v).to(device) for k, v in host.items()}
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  bf16 = bench.cfg.dtype == jnp.bfloat16

  def run():
    with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
      loss = torch_loss(model, frozen, batch, img_ids, txt_ids, suite)
    optim.zero_grad(set_to_none=True)
    loss.backward()
    optim.step()
    sync()
    return loss.detach()
  if device == "cuda":
    torch.cuda.reset_peak_memory_stats()
  first_loss = float(run())
  times = common.timed(run, repeats)
  peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
  return {"times": times, "first_loss": first_loss, "peak_bytes": peak}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--suite", default="editor_sft_step", choices=SUITES)
  p.add_argument("--config", default="configs/shapes_editor_sft.py")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="config override, e.g. model.num_layers=4 (repeatable)")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--out", default="")
  p.add_argument("--no_reference", action="store_true", help="time jaxedit alone")
  args = p.parse_args(argv)
  return run(args.suite, args.config, args.set, args.batch, args.repeats, args.out,
             not args.no_reference)


def run(suite: str, config: str, overrides, batch: int, repeats: int, out: str = "",
        reference: bool = True) -> dict:
  import diffusers
  import torch

  torch.set_num_threads(os.cpu_count())
  bench = common.flux_bench(config, batch, overrides)
  extras = step_inputs(bench)
  host = {**bench.inputs, **extras}
  on_gpu = jax.devices()[0].platform == "gpu"
  device = "cuda" if on_gpu and torch.cuda.is_available() else "cpu"
  if device == "cuda":  # JAX's default float32 matmul on GPU is TF32; let PyTorch match
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

  torch_out = (time_torch(bench, suite, host, repeats, device) if reference else
               {"times": [float("nan")], "first_loss": float("nan"), "peak_bytes": None})
  if device == "cuda":
    torch.cuda.empty_cache()  # the step's memory, freed on return
  jax_out = time_jax(bench, suite, host, repeats)
  torch_s, first_loss_torch, torch_peak = (torch_out["times"], torch_out["first_loss"],
                                           torch_out["peak_bytes"])
  jax_s, first_loss_jax, model_flops = (jax_out["times"], jax_out["first_loss"],
                                         jax_out["model_flops"])
  jax_med, torch_med = common.median(jax_s), common.median(torch_s)
  result = {
      "suite": suite, "config": bench.config_name, "batch": batch, "tokens": bench.tokens,
      "params": bench.num_params, "dtype": jnp.dtype(bench.cfg.dtype).name,
      "attention": attention_implementation(bench.cfg.attention, bench.cfg.dtype) or "xla",
      "device": jax.devices()[0].device_kind, "machine": common.machine(),
      "torch_device": device,
      "jaxedit_s": jax_med, "reference_s": torch_med, "speedup": torch_med / jax_med,
      "model_flops": model_flops, "jax_compile_s": jax_out["compile_s"],
      "jax_peak_bytes": jax_out["peak_bytes"], "reference_peak_bytes": torch_peak,
      "jax_compiled_temp_bytes": jax_out["temp_bytes"],
      "first_loss_jaxedit": first_loss_jax, "first_loss_reference": first_loss_torch,
      "first_loss_rel_err": abs(first_loss_jax - first_loss_torch) / abs(first_loss_torch),
      "jax_times_s": jax_s, "reference_times_s": torch_s,
      "versions": {"jax": jax.__version__, "torch": torch.__version__,
                   "diffusers": diffusers.__version__},
  }
  print(f"{suite}: batch {batch}, {bench.tokens} tokens, {bench.num_params / 1e6:.1f}M "
        f"parameters, {result['dtype']}, {result['attention']} attention, {result['machine']}")
  print(f"  jaxedit {jax_med:.4f} s, PyTorch ({device}) {torch_med:.4f} s: "
        f"{result['speedup']:.2f}x; {model_flops / 1e9:.1f} GFLOP per step; first losses "
        f"agree to {result['first_loss_rel_err']:.1e}")
  common.write_json(result, out)
  return result


if __name__ == "__main__":
  main()
