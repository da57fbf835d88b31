"""The `jaxedit` command: one entry point, a subcommand per job.

    jaxedit data --config configs/shapes_data.py --workdir DIR [--config.key=value ...]
"""

from __future__ import annotations

import argparse
import logging
import sys

from jaxedit.config import ConfigError, load
from jaxedit.data.pipeline import CorruptRecordError
from jaxedit.shapes.world import SceneError

CONFIG_PREFIX = "--config."


def _data(config, workdir):
  from jaxedit.data import job

  return job.run(config, workdir)


def _data_reference():
  from jaxedit.data import job

  return job.reference_config()


# subcommand -> (help, reference config, job)
COMMANDS = {
    "data": ("build the shapes dataset, print its statistics, write contact sheets",
             _data_reference, _data),
}


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="jaxedit", description=__doc__.split("\n")[0])
  sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
  for name, (help_text, _, _) in COMMANDS.items():
    c = sub.add_parser(name, help=help_text,
                       epilog="Override any config key with --config.KEY=VALUE.")
    c.add_argument("--config", required=True, help="config file, as path/to/file.py[:arg]")
    c.add_argument("--workdir", required=True, help="folder for outputs")
  return p


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  p = parser()
  args, rest = p.parse_known_args(argv)
  unknown = [a for a in rest if not a.startswith(CONFIG_PREFIX)]
  if unknown:
    p.error(f"unrecognized arguments: {' '.join(unknown)}")
  overrides = [a[len(CONFIG_PREFIX):] for a in rest]
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  _, reference, job = COMMANDS[args.command]
  try:
    config = load(args.config, overrides, reference=reference())
    job(config, args.workdir)
  except (ConfigError, SceneError, CorruptRecordError) as e:
    print(f"jaxedit {args.command}: error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
