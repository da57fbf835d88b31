"""The planner: a Qwen2-layout decoder LM that sees the source image through a vision prefix.

The image is cut into patches (on the shapes world, one patch per grid cell), embedded,
given learned position embeddings and projected into the LM's embedding space by a two-layer
GELU MLP (the LLaVA projector); these tokens precede the prompt. The LM's parameters sit
under `lm` and export to transformers unchanged; the vision prefix is jaxedit's own.

With `model.vision.cell_head` (one patch per grid cell), a linear head `cell_head` reads each
prefix token's shape and colour (empty included); planner SFT trains it against the source
scene, so the prefix carries what is in each cell from the first steps instead of learning it
only through the plan tokens. Its logits are sown as `intermediates/cell_logits`; it is a
training aid and is not exported.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from jaxedit.models import layers
from jaxedit.models.editor import patchify
from jaxedit.models.layers import dense
from jaxedit.models.lm import DecoderLM, LMConfig
from jaxedit.shapes.world import COLOURS, SHAPES


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  image_size: int = 32
  patch_size: int = 8
  width: int = 128  # patch embedding width before the projector
  # Classes of each cell attribute the cell head predicts (shapes and colours, each with
  # "empty"); () for no cell head.
  cell_classes: tuple[int, ...] = ()

  @property
  def num_tokens(self) -> int:
    return (self.image_size // self.patch_size) ** 2


@dataclasses.dataclass(frozen=True)
class PlannerConfig:
  lm: LMConfig
  vision: VisionConfig | None = None  # None: text only (e.g. scene-as-text prompts)

  @property
  def prefix_len(self) -> int:
    return 0 if self.vision is None else self.vision.num_tokens


class VisionPrefix(nn.Module):
  """(B, H, W, 3) images in [-1, 1] -> (B, num_tokens, hidden) prefix embeddings."""

  cfg: VisionConfig
  lm: LMConfig

  @nn.compact
  def __call__(self, image):
    cfg = self.cfg
    if image.shape[1:] != (cfg.image_size, cfg.image_size, 3):
      raise ValueError(f"planner images must be (B, {cfg.image_size}, {cfg.image_size}, 3), "
                       f"got {image.shape}")
    x = dense(self.lm, cfg.width, ("patch", "embed"), "patch_embed")(
        patchify(image.astype(self.lm.dtype), cfg.patch_size))
    pos = self.param("position_embedding", nn.with_logical_partitioning(
        nn.initializers.normal(0.02), (None, "embed")), (cfg.num_tokens, cfg.width),
        self.lm.param_dtype)
    x = x + pos.astype(x.dtype)
    x = dense(self.lm, self.lm.hidden_size, ("embed", "mlp"), "projector_1")(x)
    return dense(self.lm, self.lm.hidden_size, ("mlp", "embed"), "projector_2")(nn.gelu(x))


class Planner(nn.Module):
  """DecoderLM logits (and cache) for prompts that may start with an image prefix; `image`
  is given on the call that holds the prompt (training, or the sampler's prefill)."""

  cfg: PlannerConfig

  @nn.compact
  def __call__(self, ids, valid, cache=None, index=0, image=None, positions=None,
               last_only: bool = False, head_span: tuple[int, int] | None = None):
    prefix = None
    if image is not None:
      if self.cfg.vision is None:
        raise ValueError("this planner has no vision prefix (model.vision.enabled = False); "
                         "pass image=None")
      prefix = VisionPrefix(self.cfg.vision, self.cfg.lm, name="vision")(image)
      if self.cfg.vision.cell_classes:
        logits = dense(self.cfg.lm, sum(self.cfg.vision.cell_classes), ("embed", None),
                       "cell_head")(prefix).astype(jnp.float32)
        self.sow("intermediates", "cell_logits", logits)
    return DecoderLM(self.cfg.lm, name="lm")(ids, valid, cache=cache, index=index,
                                             prefix=prefix, positions=positions,
                                             last_only=last_only, head_span=head_span)


def init_params(model: Planner, rng, *args, **kwargs) -> dict:
  """The planner's initial parameters (boxed), the same draw with scanned or unrolled layers."""
  cfg = model.cfg
  scanned = model if cfg.lm.scan_layers else Planner(
      dataclasses.replace(cfg, lm=dataclasses.replace(cfg.lm, scan_layers=True)))
  return layers.init_as_scanned(model, scanned, ("layers",), rng, *args, **kwargs)


def planner_config(model: ml_collections.ConfigDict, world) -> PlannerConfig:
  """A PlannerConfig from the config's `model` section and the world (`image_size`,
  `grid_size`: a shapes World or the config's `world` section); bad values raise ValueError."""
  image_size = world.image_size
  lm_keys = {f.name for f in dataclasses.fields(LMConfig)}
  lm = {k: v for k, v in model.items() if k in lm_keys}
  for key in ("dtype", "param_dtype"):
    lm[key] = jnp.dtype(lm[key])
  lm["lora_targets"] = tuple(lm["lora_targets"])
  vision = None
  if model.vision.enabled:
    if image_size % model.vision.patch_size:
      raise ValueError(f"model.vision.patch_size {model.vision.patch_size} does not divide "
                       f"the image size {image_size}")
    cell_classes = ()
    if model.vision.cell_head:
      if image_size // model.vision.patch_size != world.grid_size:
        raise ValueError(f"model.vision.cell_head needs one patch per grid cell: patch_size "
                         f"{model.vision.patch_size} cuts the {image_size}px image into "
                         f"{image_size // model.vision.patch_size} patches a side, the grid "
                         f"is {world.grid_size}")
      cell_classes = (len(SHAPES) + 1, len(COLOURS) + 1)
    vision = VisionConfig(image_size=image_size, patch_size=model.vision.patch_size,
                          width=model.vision.width, cell_classes=cell_classes)
  return PlannerConfig(lm=LMConfig(**lm), vision=vision)
