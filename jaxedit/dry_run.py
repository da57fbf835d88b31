"""`jaxedit train ... --dry_run`: what a run would cost, compiled on the run's own mesh but
never executed: parameter count, matmul FLOPs per step (`jaxedit.flops`: XLA's cost
analysis counts a scanned layer stack once), bytes per device of
parameters and optimizer state, and the compiled step's memory analysis (arguments, outputs,
temporaries). Nothing is allocated beyond compilation; no data is read.

A mesh of more devices than exist here (a pod's config on fake CPU devices) is compiled on a
reduced mesh, each axis divided down until it fits (`reduced_mesh`); the bytes per device are
still the run's mesh's, from the state's shardings on its abstract mesh (as
`jaxedit.model_report`), and the programs' memory is per device of the reduced mesh. Runs on
edit records are sized from the config (`flux_editing.sized_from_config`): no records, no
pipeline weights.
"""

from __future__ import annotations

import copy
import json
import math
import os
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from jaxedit import codec as codec_lib
from jaxedit import editing, flops, flux_editing, hparams, model_report, opd, overlap, registry
from jaxedit import sharding
from jaxedit.interop import pretrained
from jaxedit.models import editor as editor_model
from jaxedit.rl import editor_policy, planner_policy
from jaxedit.trainers import (editor_opd, editor_sft, planner_grpo, planner_opd,
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


def _records_inputs(setup, n, fields):
  """Abstract model inputs of `n` records of the setup's bucket (runs on edit records), as
  `RecordsSetup.model_inputs` gives them: float32 latents and T5 / CLIP embeddings."""
  cfg, c = setup.model.cfg, setup.config
  (h, w), f = flux_editing.first_bucket(setup.records), editor_model.vae_config(c.model).downscale
  latents = (h // f, w // f, cfg.channels)
  shapes = {"source_latents": latents, "target_latents": latents,
            "context": (c.model.text_max_len, cfg.flux.joint_attention_dim),
            "pooled": (cfg.flux.pooled_projection_dim,)}
  return {k: _abstract((n, *shapes[k]), jnp.float32, setup.batch_sharding) for k in fields}


def _editor_sft(setup):
  if isinstance(setup, flux_editing.RecordsSetup):
    inputs = _records_inputs(setup, setup.config.train.batch_size, flux_editing.CACHED)
    return [("train_step", editor_sft.make_records_step(setup),
             (setup.abstract_state, inputs))]
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
  n = g.prompts_per_step * g.group_size // g.rollout_chunks
  if isinstance(rollout_setup, flux_editing.RecordsSetup):
    chunk = _records_inputs(rollout_setup, n, rollout_setup.device_fields)
  else:
    size = setup.world.image_size
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
  else:  # GRPO and RFT updates take the same rollouts
    update = registry.module(trainer).make_update(setup)
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
    "editor_grpo": _editor_rl, "editor_opd": _editor_rl, "editor_rft": _editor_rl,
    "planner_grpo": lambda setup, _, trainer: _planner_rl(setup, trainer),
    "planner_opd": lambda setup, _, trainer: _planner_rl(setup, trainer),
}


def reduced_mesh(config: ml_collections.ConfigDict, num_devices: int):
  """(config to compile, the run's abstract mesh or None): where the config's whole mesh
  (`mesh.shape` x `mesh.dcn_shape`) needs more than `num_devices`, a copy whose mesh divides
  its largest axis by its smallest factor until the mesh fits `num_devices` (no DCN part: fake
  devices are in no slices), so every axis keeps dividing the batches it divided; else the
  config itself. A -1 axis fills the devices here: that is the run's mesh."""
  if -1 in tuple(config.mesh.shape):
    return config, None
  real = model_report.abstract_mesh(config.mesh)
  if real.size <= num_devices:
    return config, real
  sizes = list(real.axis_sizes)
  while math.prod(sizes) > num_devices or num_devices % math.prod(sizes):
    i = sizes.index(max(sizes))
    sizes[i] //= next(p for p in range(2, sizes[i] + 1) if sizes[i] % p == 0)
  reduced = copy.deepcopy(config)
  reduced.mesh.shape, reduced.mesh.dcn_shape = tuple(sizes), (1,) * len(sizes)
  return reduced, real


def _counts(boxed, state, mesh, rules) -> dict:
  """Parameters (trained; the whole model without adapters) and bytes per device of each
  part of the state, sharded on `mesh` (an abstract mesh: the run's, not the compiled one)."""
  parts = ("params", "ema_params", "opt_state", "base", "reference")
  boxed = boxed if isinstance(boxed, dict) else vars(boxed)
  count = lambda tree: int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))
  model = state.base if getattr(state, "base", None) is not None else state.params
  return {"parameters": count(state.params), "model_parameters": count(model),
          "bytes_per_device": {k: sharding.bytes_per_device(
              nn.unbox(boxed[k]), sharding.logical_shardings(boxed[k], mesh, rules))
              for k in parts if boxed.get(k) is not None}}


def report(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Compiles the run's step programs on its mesh (or a reduced one, `reduced_mesh`);
  returns (and prints) the figures."""
  trainer = registry.get(config.trainer).name
  module = registry.module(trainer)
  compiled, real = reduced_mesh(flux_editing.sized_from_config(config), jax.device_count())
  with tempfile.TemporaryDirectory() as scratch:
    for source in (workdir, config.get("init_from", "")):  # the run's folder is left untouched
      if source and os.path.exists(os.path.join(source, "tokenizer.json")):
        pretrained.copy_tokenizer(source, scratch)
        break
    if registry.get(trainer).rl:  # the rollouts may have devices of their own
      setup, rollout_setup = overlap.make_setups(module.make_setup, compiled, scratch)
    else:
      setup = rollout_setup = module.make_setup(compiled, scratch)
    if hasattr(type(setup), "codec"):  # editors: the VAE (if any) compiles without weights
      for s in {id(setup): setup, id(rollout_setup): rollout_setup}.values():
        s.codec = codec_lib.abstract_codec(s.config, s.mesh)
    programs = [_program(name, program, args)
                for name, program, args in PROGRAMS[trainer](setup, rollout_setup, trainer)]
  state = setup.abstract_state
  boxed = jax.eval_shape(setup.init, jax.random.key(0))  # the logical axes, for any mesh
  mesh = real if real is not None else setup.mesh
  out = {"trainer": trainer, "mesh": dict(mesh.shape), "devices": mesh.size,
         **_counts(boxed, state, mesh, setup.rules),
         "hparams (traced)": {k: float(v) for k, v in hparams.values(
             config, registry.get(trainer).hparams).items()},
         "programs": programs}
  out["bytes_per_device"]["total"] = sum(out["bytes_per_device"].values())
  if mesh.size != setup.mesh.size:
    out["compiled_mesh"] = dict(setup.mesh.shape)
  if isinstance(setup, flux_editing.RecordsSetup):
    out["bucket"] = list(flux_editing.first_bucket(setup.records))
  if rollout_setup is not setup:
    out["rollout_mesh"] = dict(rollout_setup.mesh.shape)
  print(format_report(out), flush=True)
  return out


def format_report(out: dict) -> str:
  model = out.get("model_parameters", out["parameters"])
  lines = [f"{out['trainer']}: {out['parameters']:,} trained parameters"
           + (f" of {model:,}" if model != out["parameters"] else "")
           + f"; mesh {out['mesh']} = {out['devices']} devices"
           + (f"; rollouts on their own mesh {out['rollout_mesh']}"
              if "rollout_mesh" in out else ""),
           "bytes per device: " + ", ".join(f"{k} {v / GiB:.3f} GiB"
                                            for k, v in out["bytes_per_device"].items())]
  if "compiled_mesh" in out:
    lines.append(f"compiled on a reduced mesh {out['compiled_mesh']} (more devices than exist "
                 "here): the programs' memory is per device of that mesh")
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
