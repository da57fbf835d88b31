"""The shapes-world dataset: `jaxedit data --config configs/shapes_data.py --workdir DIR`.

Arg `small` builds a few hundred examples per split (seconds), for a quick look.
"""

from jaxedit import schema


def get_config(arg=None):
  config = schema.dataset()
  if arg == "small":
    for split, (atomic, abstract) in {"train": (400, 440), "validation": (50, 55),
                                      "test": (100, 110)}.items():
      config.data.splits[split].atomic = atomic
      config.data.splits[split].abstract = abstract
    config.report.detector_check_scenes = 500
  elif arg:
    raise ValueError(f"unknown config arg {arg!r}; use 'small' or nothing")
  return config.lock()
