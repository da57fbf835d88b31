"""`jaxedit train ... --dry_run`: what a run would cost, compiled on the run's own mesh but
never executed: parameter count, matmul FLOPs per step (`jaxedit.flops`: XLA's cost
analysis counts a scanned layer stack once), bytes per device of
parameters and optimizer state, and the compiled step's memory analysis (arguments, outputs,
temporaries). Nothing is allocated beyond compilation; no data is read.
"""

from __future__ import annotations

import json
import math
import os
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from jaxedit import codec as codec_lib
from jaxedit import editing, flops, hparams, overlap, registry, sharding
from jaxedit.config import ConfigError
from jaxedit.interop import pretrained

GiB = 2.0 ** 30


def _abstract(shape, dtype, sharding_):
  return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding_)


def _program(name: str, jitted, setup, args) -> dict:
  """Matmul FLOPs (whole program) and compiled memory (per device) of one step program."""
  with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
    count = flops.count(jitted, *args)
    memory = jitted.lower(*args).compile().memory_analysis()
  fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
            "alias_size_in_bytes", "generated_code_size_in_bytes")
  out = {"program": name, "flops": count, "devices": setup.mesh.size}
  if memory is not None:
    out.update({f.removesuffix("_in_bytes"): int(getattr(memory, f, 0)) for f in fields})
    out["peak_estimate"] = (out["argument_size"] + out["output_size"] + out["temp_size"]
                            - out["alias_size"])
  return out


def _editor_sft(setup):
  from jaxedit.trainers import editor_sft

  c, bs = setup.config, setup.batch_sharding
  n, size = c.train.batch_size, setup.world.image_size
  batch = {"source_image": _abstract((n, size, size, 3), jnp.uint8, bs),
           "target_image": _abstract((n, size, size, 3), jnp.uint8, bs),
           "ids": _abstract((n, c.model.text_max_len), jnp.int32, bs),
           "mask": _abstract((n, c.model.text_max_len), jnp.bool_, bs)}
  step = editor_sft.make_train_step(setup)
  return [("train_step", step.unbound.jitted,
           (setup.codec, setup.abstract_state, batch, step.hparams))]


def _planner_sft(setup):
  from jaxedit.trainers import planner_sft

  c, bs = setup.config, setup.batch_sharding
  n, size, p = c.train.batch_size, setup.world.image_size, c.prompt
  batch = {"source_image": _abstract((n, size, size, 3), jnp.uint8, bs),
           "prompt": _abstract((n, p.max_prompt_len), jnp.int32, bs),
           "prompt_valid": _abstract((n, p.max_prompt_len), jnp.bool_, bs),
           "plan": _abstract((n, p.max_plan_len), jnp.int32, bs),
           "plan_valid": _abstract((n, p.max_plan_len), jnp.bool_, bs)}
  step = planner_sft.make_train_step(setup)
  return [("train_step", step.unbound.jitted, (setup.abstract_state, batch, step.hparams))]


def _editor_grpo(setup, rollout_setup=None):
  """The rollout on `rollout_setup`'s mesh (its own devices with grpo.rollout_devices), the
  update on `setup`'s."""
  from jaxedit.trainers import editor_grpo

  rollout_setup = rollout_setup or setup
  c, bs, g = setup.config, rollout_setup.batch_sharding, setup.rollouts
  n, size = g.prompts_per_step * g.group_size // g.rollout_chunks, setup.world.image_size
  chunk = {"source_image": _abstract((n, size, size, 3), jnp.uint8, bs),
           "ids": _abstract((n, c.model.text_max_len), jnp.int32, bs),
           "mask": _abstract((n, c.model.text_max_len), jnp.bool_, bs)}
  levels, trained = setup.levels_and_steps(1)
  rollout = editor_grpo.make_rollout(rollout_setup)
  rs, key = rollout_setup.abstract_state, jax.random.key(0)
  args = (rollout_setup.codec, rs.params, rs.frozen, chunk, levels, key)
  with jax.set_mesh(rollout_setup.mesh), nn.logical_axis_rules(rollout_setup.rules):
    out = jax.eval_shape(rollout.jitted, *args)
  on_update = lambda x: _abstract(x.shape, x.dtype, jax.sharding.NamedSharding(
      setup.mesh, x.sharding.spec))  # as overlap.to_mesh moves them
  chunk = {**chunk, **{k: out[k] for k in ("source", "latents", "log_probs")},
           "rewards": _abstract((n,), jnp.float32, bs)}
  chunks = [jax.tree.map(on_update, chunk)] * g.rollout_chunks
  update = editor_grpo.make_update(setup)
  return [("rollout", rollout.jitted, args, rollout_setup),
          ("update", update.unbound.jitted,
           (setup.abstract_state, chunks, levels, trained, update.hparams))]


def _vae(setup):
  from jaxedit.trainers import vae

  bs, n, size = setup.batch_sharding, setup.config.train.batch_size, setup.world.image_size
  batch = {k: _abstract((n, size, size, 3), jnp.uint8, bs) for k in editing.IMAGE_FIELDS}
  step = vae.make_train_step(setup)
  return [("train_step", step.unbound.jitted, (setup.abstract_state, batch, step.hparams))]


PROGRAMS = {"editor_sft": _editor_sft, "planner_sft": _planner_sft,
            "editor_grpo": _editor_grpo, "vae": _vae}


def report(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Compiles the run's step programs on its mesh; returns (and prints) the figures."""
  trainer = config.trainer
  if trainer not in PROGRAMS:
    raise ConfigError(f"--dry_run supports {sorted(PROGRAMS)}; for {trainer} use "
                      "`python -m jaxedit.model_report` (sizes without compiling)")
  module = registry.module(trainer)
  with tempfile.TemporaryDirectory() as scratch:  # the run's folder is left untouched
    for source in (workdir, config.get("init_from", "")):
      if source and os.path.exists(os.path.join(source, "tokenizer.json")):
        pretrained.copy_tokenizer(source, scratch)
        break
    if trainer == "editor_grpo":  # the rollouts may have devices of their own
      setup, rollout_setup = overlap.make_setups(module.make_setup, config, "grpo",
                                                 scratch)
    else:
      setup = rollout_setup = module.make_setup(config, scratch)
    if hasattr(type(setup), "codec"):  # editors: the VAE (if any) compiles without weights
      for s in {id(setup): setup, id(rollout_setup): rollout_setup}.values():
        s.codec = codec_lib.abstract_codec(config, s.mesh)
    args = (setup, rollout_setup) if rollout_setup is not setup else (setup,)
    programs = [_program(name, fn, on[0] if on else setup, a)
                for name, fn, a, *on in PROGRAMS[trainer](*args)]
  state = setup.abstract_state
  out = {"trainer": trainer, "mesh": dict(setup.mesh.shape), "devices": setup.mesh.size,
         "parameters": int(sum(math.prod(x.shape) for x in jax.tree.leaves(state.params))),
         "bytes_per_device": {k: sharding.bytes_per_device(getattr(state, k)) for k in
                              ("params", "ema_params", "opt_state", "frozen")
                              if hasattr(state, k)},
         "hparams (traced)": {k: float(v) for k, v in hparams.values(
             config, registry.get(trainer).hparams).items()},
         "programs": programs}
  if rollout_setup is not setup:
    out["rollout_mesh"] = dict(rollout_setup.mesh.shape)
  print(format_report(out), flush=True)
  return out


def format_report(out: dict) -> str:
  lines = [f"{out['trainer']}: {out['parameters']:,} trained parameters; mesh {out['mesh']} "
           f"= {out['devices']} devices" + (f"; rollouts on their own mesh {out['rollout_mesh']}"
                                            if "rollout_mesh" in out else ""),
           "bytes per device: " + ", ".join(f"{k} {v / GiB:.3f} GiB"
                                            for k, v in out["bytes_per_device"].items())]
  for p in out["programs"]:
    line = (f"  {p['program']:<11} {p['flops']:.3e} matmul FLOPs "
            f"({p['flops'] / p['devices']:.3e} per device)")
    if "peak_estimate" in p:
      line += (f"; memory: arguments {p['argument_size'] / GiB:.3f} GiB, outputs "
               f"{p['output_size'] / GiB:.3f}, temporaries {p['temp_size'] / GiB:.3f}, "
               f"peak ~{p['peak_estimate'] / GiB:.3f} GiB")
    lines.append(line)
  return "\n".join(lines)


def main(config: ml_collections.ConfigDict, workdir: str) -> dict:
  out = report(config, workdir)
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "dry_run.json"), "w") as f:
      json.dump(out, f, indent=1)
  return out
