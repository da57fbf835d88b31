"""The `jaxedit` command: one entry point, a subcommand per job.

    jaxedit data  --config configs/shapes_data.py --workdir DIR [--config.key=value ...]
    jaxedit train --config configs/shapes_editor_sft.py --workdir DIR [--dry_run]
    jaxedit eval  --config configs/shapes_editor_sft.py --workdir DIR
    jaxedit edit  --workdir PLANNER_DIR --image IN.png --instruction "..." --out OUT.png
    jaxedit export --workdir DIR --to diffusers|transformers --out OUT [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import os
import logging
import sys


from jaxedit import benchmarks, registry, schema
from jaxedit.config import ConfigError, apply_overrides, load_file, validate
from jaxedit.errors import CorruptRecordError, DatasetError, MappingError
from jaxedit.shapes.world import SceneError

CONFIG_PREFIX = "--config."


def _data_job(config):
  if config.get("data_job") == "edits":  # a lab's own edits (configs/edit_data.py)
    from jaxedit.data import edit_job

    return schema.edit_dataset, edit_job.run
  from jaxedit.data import job

  return schema.dataset, job.run


def _trainer(config):
  return registry.module(config.get("trainer"))


def _reference(config):
  name = registry.get(config.get("trainer")).name  # names the registered ones if not one
  return lambda: schema.reference_config(name)


# subcommand -> (help, config -> (reference config function, job function))
COMMANDS = {
    "data": ("build a dataset: the shapes world's, or records of your own edits "
             "(configs/edit_data.py); print its statistics, write contact sheets",
             _data_job),
    "train": ("train the model a config names (config.trainer), resuming from DIR",
              lambda config: (_reference(config), _trainer(config).train)),
    "eval": ("score the latest checkpoint in DIR; writes DIR/eval/metrics.json",
             lambda config: (_reference(config), _trainer(config).run_eval)),
}


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="jaxedit", description=__doc__.split("\n")[0])
  sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
  for name, (help_text, _) in COMMANDS.items():
    c = sub.add_parser(name, help=help_text,
                       epilog="Override any config key with --config.KEY=VALUE.")
    c.add_argument("--config", required=True, help="config file, as path/to/file.py[:arg]")
    c.add_argument("--workdir", required=True, help="folder for outputs")
    if name == "train":
      c.add_argument("--dry_run", action="store_true", help="compile the step on the run's "
                     "mesh and print parameters, FLOPs and bytes per device; train nothing")
  e = sub.add_parser("edit", help="plan with the planner in DIR, run the plan with an editor; "
                     "writes OUT.png, OUT.plan.json and OUT.step_K.png")
  e.add_argument("--workdir", required=True, help="a planner workdir (SFT or GRPO)")
  e.add_argument("--image", required=True, help="the source image (PNG, the world's size)")
  e.add_argument("--instruction", required=True)
  e.add_argument("--out", required=True, help="where the final image goes")
  e.add_argument("--editor", default="", help="an editor workdir (default: the one the "
                 "planner's config names in 'editor')")
  e.add_argument("--seed", type=int, default=0)
  e.add_argument("--max_steps", type=int, default=8, help="longer plans are refused")
  x = sub.add_parser("export", help="write the model in DIR as a diffusers (editor) or "
                     "transformers (planner) folder of safetensors")
  x.add_argument("--workdir", required=True, help="an editor or planner workdir")
  x.add_argument("--to", required=True, choices=("diffusers", "transformers"))
  x.add_argument("--out", required=True, help="the folder to write")
  x.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
  x.add_argument("--weights", default="eval", choices=("eval", "ema", "raw"),
                 help="EMA or raw parameters (default: those the run's eval uses)")
  b = sub.add_parser("bench", help="benchmark suites against their PyTorch references; "
                     "prints a table, writes JSON")
  benchmarks.add_arguments(b)
  return p


def _quiet_libraries(record: logging.LogRecord) -> bool:
  """Orbax and TFDS log every file operation at INFO; keep their warnings only."""
  noisy = ("orbax", "tensorflow_datasets", "grain")
  return record.levelno >= logging.WARNING or not any(n in record.pathname for n in noisy)


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  p = parser()
  args, rest = p.parse_known_args(argv)
  unknown = [a for a in rest if not a.startswith(CONFIG_PREFIX)]
  if unknown:
    p.error(f"unrecognized arguments: {' '.join(unknown)}")
  overrides = [a[len(CONFIG_PREFIX):] for a in rest]
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  logging.getLogger().setLevel(logging.INFO)  # absl, once imported, would leave it at WARNING
  logging.getLogger("absl").addFilter(_quiet_libraries)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  try:
    if args.command == "edit":
      from jaxedit import inference

      record = inference.edit(args.workdir, args.image, args.instruction, args.out,
                             editor_workdir=args.editor, seed=args.seed,
                             max_steps=args.max_steps)
      print(json.dumps(record, indent=1))
      return 0
    if args.command == "bench":
      from jaxedit import bench

      bench.run(args)
      return 0
    if args.command == "export":
      from jaxedit import export

      manifest = export.export(args.workdir, args.to, args.out, dtype=args.dtype,
                               weights=args.weights)
      print(json.dumps(manifest, indent=1))
      return 0
    config = load_file(args.config)
    reference, job = COMMANDS[args.command][1](config)
    validate(config, reference())
    apply_overrides(config, overrides)
    if "distributed" in config:  # before anything starts a JAX backend
      from jaxedit import distributed

      distributed.initialize(config.distributed)
    if getattr(args, "dry_run", False):
      from jaxedit import dry_run

      job = dry_run.main
    job(config, args.workdir)
  except (ConfigError, SceneError, CorruptRecordError, MappingError, DatasetError) as e:
    print(f"jaxedit {args.command}: error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
