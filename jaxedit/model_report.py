"""Sizes of a configured run without allocating it: parameter counts, and the bytes each device
holds for parameters, EMA, frozen base or reference, and optimizer state on the configured
mesh (from `jax.eval_shape` and the logical sharding rules on an abstract mesh, so a pod's
mesh is checked on a laptop).

    python -m jaxedit.model_report --config configs/flux_kontext_grpo.py [--json OUT.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import sys

import flax
import flax.linen as nn
import jax
import ml_collections

from jaxedit import editing, lora, planning, sharding
from jaxedit.config import ConfigError, load_file
from jaxedit.registry import EDITORS, PLANNERS
from jaxedit.rl import editor_policy, planner_policy
from jaxedit.models.editor import Editor, editor_config, uses_vae, vae_config
from jaxedit.models.planner import Planner, planner_config
from jaxedit.models.vae import AutoencoderKL
from jaxedit.train import optimizer as optimizer_lib

def abstract_mesh(mesh_config: ml_collections.ConfigDict) -> jax.sharding.AbstractMesh:
  """The whole mesh: each axis is its in-slice size times its across-slices (DCN) size."""
  shape = tuple(mesh_config.shape)
  if -1 in shape:
    raise ConfigError(f"mesh.shape {shape} has a -1: give every axis its size to size a pod")
  dcn = tuple(mesh_config.dcn_shape)
  return jax.sharding.AbstractMesh(tuple(s * d for s, d in zip(shape, dcn)),
                                   tuple(mesh_config.axes))


def _count(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def _bytes_per_device(boxed, mesh, rules) -> int:
  return sharding.bytes_per_device(nn.unbox(boxed),
                                   sharding.logical_shardings(boxed, mesh, rules))


def editor_state(config: ml_collections.ConfigDict):
  """(model, boxed abstract train state) of an editor trainer's config."""
  model = Editor(editor_config(config.model, config.world.image_size,
                               config.tokenizer.vocab_size))
  dummy = editing.dummy_inputs(model.cfg, config.model.text_max_len)
  if config.trainer == "editor_sft":
    tx = optimizer_lib.supervised(config.train).tx
    init = functools.partial(editing.init_state, model=model, tx=tx,
                             text_len=config.model.text_max_len)
  else:
    tx = optimizer_lib.on_policy(config.train, config.rollout.accumulate).tx
    init = functools.partial(editor_policy.initial_state, model=model, tx=tx,
                             use_lora=config.model.lora_rank > 0, dummy=dummy)
  return model, jax.eval_shape(init, jax.random.key(0))


def planner_state(config: ml_collections.ConfigDict):
  """(model, boxed abstract train state) of a planner trainer's config; GRPO and OPD also
  keep the starting parameters as the reference."""
  sft_like = config if config.trainer == "planner_sft" else planner_policy.as_sft_config(config)
  model = Planner(planner_config(config.model, config.world))
  tx = optimizer_lib.supervised(sft_like.train).tx
  state = jax.eval_shape(functools.partial(
      planning.init_state, model=model, tx=tx, image_size=config.world.image_size,
      prompt_len=config.prompt.max_prompt_len), jax.random.key(0))
  if config.trainer != "planner_sft":
    state = {"params": state.params, "ema_params": state.ema_params,
             "opt_state": state.opt_state, "reference": state.params}
  return model, state


def report(config: ml_collections.ConfigDict) -> dict:
  """Parameter counts and per-device bytes of each part of the train state."""
  mesh, rules = abstract_mesh(config.mesh), sharding.rules(config.mesh)
  trainer = config.trainer
  if trainer in EDITORS:
    model, state = editor_state(config)
  elif trainer in PLANNERS:
    model, state = planner_state(config)
  else:
    raise ConfigError(f"config key 'trainer' {trainer!r} is not an editor or planner trainer")
  fields = state if isinstance(state, dict) else {
      f.name: getattr(state, f.name) for f in dataclasses.fields(state)
      if f.name != "step" and getattr(state, f.name) is not None}
  params = fields["params"]
  if "base" in fields:
    params = lora.join(fields["params"], fields["base"])
  flat = flax.traverse_util.flatten_dict(nn.unbox(params))
  base = {k: v for k, v in flat.items() if not lora.is_adapter(k)}
  by_module = {}
  for k, v in base.items():
    by_module[k[0]] = by_module.get(k[0], 0) + math.prod(v.shape)
  out = {"trainer": trainer, "mesh": dict(mesh.shape), "num_devices": mesh.size,
         "params": sum(by_module.values()), "params_by_module": by_module,
         "adapter_params": sum(math.prod(v.shape) for k, v in flat.items()
                               if lora.is_adapter(k)),
         "trained_params": _count(nn.unbox(fields["params"])),
         "bytes_per_device": {name: _bytes_per_device(tree, mesh, rules)
                              for name, tree in fields.items()}}
  out["bytes_per_device"]["total"] = sum(out["bytes_per_device"].values())
  if trainer in EDITORS and uses_vae(config.model):
    vae = AutoencoderKL(vae_config(config.model))
    size = config.world.image_size
    shapes = jax.eval_shape(vae.init, jax.random.key(0),
                            jax.numpy.zeros((1, size, size, 3)))["params"]
    out["vae_params"] = _count(shapes)
    out["bytes_per_device"]["vae (replicated, frozen)"] = sum(
        x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes))
  return out


def format_table(rep: dict) -> str:
  gib = lambda n: f"{n / 2**30:9.3f} GiB"
  lines = [f"{rep['trainer']}: {rep['params']:,} parameters "
           f"({', '.join(f'{k} {v:,}' for k, v in rep['params_by_module'].items())})",
           f"trained: {rep['trained_params']:,} (adapters {rep['adapter_params']:,})"]
  if "vae_params" in rep:
    lines.append(f"VAE: {rep['vae_params']:,} parameters")
  lines.append(f"mesh {rep['mesh']} = {rep['num_devices']} devices; bytes per device:")
  lines += [f"  {name:<26}{gib(n)}" for name, n in rep["bytes_per_device"].items()]
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", required=True, help="config file, as path/to/file.py[:arg]")
  p.add_argument("--json", default="", help="also write the report here")
  args = p.parse_args(argv)
  try:
    rep = report(load_file(args.config))
  except ConfigError as e:
    print(f"model_report: error: {e}", file=sys.stderr)
    return 2
  print(format_table(rep))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rep, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
