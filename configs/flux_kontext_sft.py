"""Editor SFT of a FLUX.1-Kontext pipeline on your own edit records (rows with target images),
full fine-tuning in bf16 compute with FSDP.

    jaxedit data  --config configs/edit_data.py --workdir RECORDS \
        --config.data.train=pairs.jsonl --config.encode.pipeline=PIPELINE
    jaxedit train --config configs/flux_kontext_sft.py --workdir SFT \
        --config.init_from=PIPELINE --config.data.records=RECORDS

The architecture is FLUX.1-Kontext-dev's (19 double and 38 single blocks; checked against
PIPELINE's config.json on loading); `:tiny` reads it from the folder (model.architecture =
'init_from'), so any FLUX.1(-Kontext) pipeline trains without shape flags. The
records hold the VAE latents and T5 / CLIP embeddings (jaxedit.data.edit_cache). Arg `tiny`:
a few steps on one CPU, for a tiny pipeline folder (tests/tiny_flux.py).
`--config.model.lora_rank=R` trains LoRA adapters over the frozen pipeline instead (the export
merges them).
"""

from jaxedit import schema


def get_config(arg=None):
  config = schema.on_edit_records(schema.editor_sft())
  t = config.train
  if arg == "tiny":
    t.batch_size, t.num_steps, t.warmup_steps, t.lr = 8, 6, 0, 1e-3
    t.log_every, t.eval_every, t.checkpoint_every, t.sample_every = 2, 6, 3, 6
    schema.smoke_test(config)
    return config.lock()
  if arg:
    raise ValueError(f"unknown config arg {arg!r}; use 'tiny' or nothing")
  schema.flux_kontext_dev(config)
  config.mesh.shape = (1, -1, 1)  # FSDP over every chip of the slice
  t.batch_size, t.num_steps, t.lr, t.warmup_steps = 64, 2000, 1e-5, 100
  t.ema_decay, t.weight_decay = 0.999, 1e-4
  t.eval_every = t.checkpoint_every = t.sample_every = 250
  config.eval.batch_size = 64
  return config.lock()
