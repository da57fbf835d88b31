"""Records of your own edits for the FLUX trainers: `jaxedit data --config configs/edit_data.py
--workdir RECORDS --config.data.train=path/to/train_metadata.jsonl`.

The formats read (Edit-R1 / flow_grpo, DanceGRPO, EditScore, or a field map) and the checks on
every row are in jaxedit/data/edit_rows.py; the records' layout in jaxedit/data/edit_records.py.
Arg `tiny`: one 64x64 bucket and small shards, for a tiny pipeline folder.
"""

from jaxedit import schema


def get_config(arg=None):
  config = schema.edit_dataset()
  if arg == "tiny":
    config.data.buckets = ((64, 64),)
    config.data.records_per_shard = 4
  elif arg:
    raise ValueError(f"unknown config arg {arg!r}; use 'tiny' or nothing")
  return config.lock()
