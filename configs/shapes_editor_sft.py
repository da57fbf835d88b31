"""Editor SFT on single atomic edits of the shapes world.

    jaxedit train --config configs/shapes_editor_sft.py --workdir DIR        # ~12 min, 2 CPU cores
    jaxedit train --config configs/shapes_editor_sft.py:demo --workdir DIR   # ~5 min
    jaxedit eval  --config configs/shapes_editor_sft.py --workdir DIR
    jaxedit train --config configs/shapes_editor_sft.py:latent --workdir DIR \
        --config.model.vae.init_from=VAE_DIR/diffusers   # on configs/shapes_vae.py's latents
"""

from jaxedit import schema


def get_config(arg=None):
  config = schema.editor_sft()
  config.data.splits.train.abstract = 0  # the editor learns atomic edits
  # Two 64-wide heads with most RoPE dims on the row/column axes: with (8, 12, 12) only two
  # frequencies per axis turn noticeably over 8 positions, and "row 2, column 3" (move, add)
  # stayed near 0% while recolor/remove were learnt.
  config.model.num_heads = 2
  config.model.head_dim = 64
  config.model.axes_dims_rope = (8, 28, 28)
  # Sharper attention from the start (logits up to 4 * sqrt(64)): copying the source token
  # at the same position is what tiny models are slowest to learn (flux.FluxConfig).
  config.model.qk_norm_init = 2.0
  config.model.text_max_len = 24  # atomic instructions fit; longer ones raise a clear error
  # Ground instructions on the world's grid: without it, edits that name a cell ("add ... at
  # row 2, column 3", move) stayed at 0% (README, "Where add and move fail").
  config.model.text_layout_grid = config.world.grid_size
  # Weight high noise levels: there the model must read the source tokens.
  config.flow.shift = 3.0
  config.sample.shift = 3.0
  config.sample.num_steps = 8
  # Most pixels of an edit are copies; weight the patches the edit changes.
  config.flow.changed_weight = 10.0
  # Small batches, more steps: on 2 CPU cores images/s hardly depends on the batch size.
  config.train.batch_size = 32
  config.train.lr = 2e-3
  config.train.warmup_steps = 50
  config.train.num_steps = 1100  # ~10 training min on 2 CPU cores (96% test success)
  config.train.eval_every = 250
  config.train.checkpoint_every = 250
  config.train.eval_examples = 128
  if arg == "demo":
    config.data.splits.train.atomic = 8_000
    config.data.splits.validation.abstract = 0
    config.data.splits.test.abstract = 0
    # 480 steps at a peak rate of 4e-3 (~4.5 training minutes on 2 CPU cores). 320 steps
    # ended on the knee of the curve, where the outcome swung from 3% to 31% with the
    # initialisation draw and float rounding (README, "Editor SFT").
    config.train.lr = 4e-3
    config.train.num_steps = 480
    config.train.eval_every = 0  # only at the end
    config.train.sample_every = 0
    config.train.checkpoint_every = 240
    config.eval.num_examples = 256
  elif arg == "latent":
    # On the latents of configs/shapes_vae.py's VAE (set model.vae.init_from=VAE_DIR/diffusers):
    # 16x16x4 latents in 2x2 patches, the same 8x8 tokens as the pixel editor's 4x4 patches.
    v = config.model.vae
    v.enabled, v.latent_channels, v.block_out_channels = True, 4, (16, 32)
    v.layers_per_block, v.norm_num_groups = 1, 8
    config.model.patch_size = 2
  elif arg:
    raise ValueError(f"unknown config arg {arg!r}; use 'demo', 'latent' or nothing")
  return config.lock()
