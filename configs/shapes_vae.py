"""A shapes-world VAE for the editor's latent path (jaxedit/trainers/vae.py).

    jaxedit train --config configs/shapes_vae.py --workdir VAE_DIR   # writes VAE_DIR/diffusers
    jaxedit eval  --config configs/shapes_vae.py --workdir VAE_DIR
    jaxedit train --config configs/shapes_editor_sft.py:latent --workdir DIR \
        --config.model.vae.init_from=VAE_DIR/diffusers

32x32 images to 16x16x4 latents (2x downsampling, 3x fewer numbers), the architecture the
`:latent` editor config expects.
"""

from jaxedit import schema


def get_config(arg=None):
  if arg is not None:
    raise ValueError(f"unknown config arg {arg!r}")
  config = schema.vae()
  config.data.splits.train.abstract = 0  # atomic pairs: every image kind the editor sees
  return config.lock()
