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
from jaxedit import editing, flops, hparams, opd, overlap, registry, sharding
from jaxedit.interop import pretrained
from jaxedit.rl import editor_policy, planner_policy
from jaxedit.trainers import (editor_grpo, editor_opd, editor_sft, planner_grpo, planner_opd,
                              planner_sft, vae)

GiB = 2.0 ** 30


def _abstract(shape, dtype, sharding_):
  return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding_)


def _program(name: str, program: sharding.Program, args) -> dict:
  """Matmul FLOPs (whole program) and compiled memory (per device) of one step program."""
  with jax.set_mesh(program.mesh), nn.logical_axis_rules(program.rules):
    count = flops.count(program.jitted, *program.arguments(*args))
  memory = program.lower(*args).compile().memory_analysis()
  fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
            "alias_size_in_bytes", "generated_code_size_in_bytes")
  out = {"program": name, "flops": count, "devices": program.mesh.size}
  if memory is not None:
    out.update({f.removesuffix("_in_bytes"): int(getattr(memory, f, 0)) for f in fields})
    out["peak_estimate"] = (out["argument_size"] + out["output_size"] + out["temp_size"]
                            - out["alias_size"])
  return out


def _images(n, size, sharding_):
  return _abstract((n, size, size, 3), jnp.uint8, sharding_)


def _editor_sft(setup):
  c, bs = setup.config, setup.batch_sharding
  n, size = c.train.batch_size, setup.world.image_size
  batch = {"source_image": _images(n, size, bs), "target_image": _images(n, size, bs),
           "ids": _abstract((n, c.model.text_max_len), jnp.int32, bs),
           "mask": _abstract((n, c.model.text_max_len), jnp.bool_, bs)}
  return [("train_step", editor_sft.make_train_step(setup), (setup.abstract_state, batch))]


def _planner_batch(setup, n):
  bs, size, p = setup.batch_sharding, setup.world.image_size, setup.config.prompt
  return {"source_image": _images(n, size, bs),
          "prompt": _abstract((n, p.max_prompt_len), jnp.int32, bs),
          "prompt_valid": _abstract((n, p.max_prompt_len), jnp.bool_, bs),
          "plan": _abstract((n, p.max_plan_len), jnp.int32, bs),
          "plan_valid": _abstract((n, p.max_plan_len), jnp.bool_, bs)}


def _planner_sft(setup):
  batch = _planner_batch(setup, setup.config.train.batch_size)
  return [("train_step", planner_sft.make_train_step(setup), (setup.abstract_state, batch))]


def _planner_rl(setup, trainer):
  """The update on P * G sampled plans (rollouts decode with the planner's sampler)."""
  g = setup.config.rollout
  n, bs = g.prompts_per_step * g.group_size, setup.batch_sharding
  batch = _planner_batch(setup, n)
  state = planner_policy.PlannerPolicy.abstract_state(setup)
  if trainer == "planner_opd":
    teachers = [state.reference] * len(opd.teacher_tasks(setup.config.opd.teachers))
    update = planner_opd.make_update(setup, teachers)
    batch["route"] = _abstract((n,), jnp.int32, bs)
  else:
    update = planner_grpo.make_update(setup)
  return [("update", update, (state, batch, _abstract((n,), jnp.float32, bs)))]


def _editor_rl(setup, rollout_setup, trainer):
  """The rollout on `rollout_setup`'s mesh (its own devices with rollout_devices > 0), the
  update on `setup`'s."""
  c, bs, g = setup.config, rollout_setup.batch_sharding, setup.rollouts
  n, size = g.prompts_per_step * g.group_size // g.rollout_chunks, setup.world.image_size
  chunk = {"source_image": _images(n, size, bs),
           "ids": _abstract((n, c.model.text_max_len), jnp.int32, bs),
           "mask": _abstract((n, c.model.text_max_len), jnp.bool_, bs)}
  levels, trained = setup.levels_and_steps(1)
  rollout = editor_policy.make_rollout(rollout_setup)
  rs = rollout_setup.abstract_state
  args = (rs.params, rs.base, chunk, levels, jax.random.key(0))
  out = rollout.eval_shape(*args)
  on_update = lambda x: _abstract(x.shape, x.dtype, jax.sharding.NamedSharding(
      setup.mesh, x.sharding.spec))  # as overlap.to_mesh moves them
  chunk = {**chunk, **{k: out[k] for k in ("source", "latents", "log_probs")},
           "rewards": _abstract((n,), jnp.float32, bs)}
  if trainer == "editor_opd":
    chunk["route"] = _abstract((n,), jnp.int32, bs)
    teachers = [setup.abstract_base] * len(opd.teacher_tasks(c.opd.teachers))
    update = editor_opd.make_update(setup, teachers)
  else:
    update = editor_grpo.make_update(setup)
  chunks = [jax.tree.map(on_update, chunk)] * g.rollout_chunks
  return [("rollout", rollout, args),
          ("update", update, (setup.abstract_state, chunks, levels, trained))]


def _vae(setup):
  bs, n, size = setup.batch_sharding, setup.config.train.batch_size, setup.world.image_size
  batch = {k: _images(n, size, bs) for k in editing.IMAGE_FIELDS}
  return [("train_step", vae.make_train_step(setup), (setup.abstract_state, batch))]


# trainer -> (setup, rollout setup, trainer) -> [(name, program, arguments)]
PROGRAMS = {
    "editor_sft": lambda setup, _, __: _editor_sft(setup),
    "planner_sft": lambda setup, _, __: _planner_sft(setup),
    "vae": lambda setup, _, __: _vae(setup),
    "editor_grpo": _editor_rl, "editor_opd": _editor_rl,
    "planner_grpo": lambda setup, _, trainer: _planner_rl(setup, trainer),
    "planner_opd": lambda setup, _, trainer: _planner_rl(setup, trainer),
}


def report(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Compiles the run's step programs on its mesh; returns (and prints) the figures."""
  trainer = registry.get(config.trainer).name
  module = registry.module(trainer)
  with tempfile.TemporaryDirectory() as scratch:  # the run's folder is left untouched
    for source in (workdir, config.get("init_from", "")):
      if source and os.path.exists(os.path.join(source, "tokenizer.json")):
        pretrained.copy_tokenizer(source, scratch)
        break
    if registry.get(trainer).rl:  # the rollouts may have devices of their own
      setup, rollout_setup = overlap.make_setups(module.make_setup, config, scratch)
    else:
      setup = rollout_setup = module.make_setup(config, scratch)
    if hasattr(type(setup), "codec"):  # editors: the VAE (if any) compiles without weights
      for s in {id(setup): setup, id(rollout_setup): rollout_setup}.values():
        s.codec = codec_lib.abstract_codec(config, s.mesh)
    programs = [_program(name, program, args)
                for name, program, args in PROGRAMS[trainer](setup, rollout_setup, trainer)]
  state = setup.abstract_state
  out = {"trainer": trainer, "mesh": dict(setup.mesh.shape), "devices": setup.mesh.size,
         "parameters": int(sum(math.prod(x.shape) for x in jax.tree.leaves(state.params))),
         "bytes_per_device": {k: sharding.bytes_per_device(getattr(state, k)) for k in
                              ("params", "ema_params", "opt_state", "base", "reference")
                              if getattr(state, k, None) is not None},
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
