"""The editor below its trainers: its setup (world, tokenizer, model, mesh), inputs, the
Euler sampler, and evaluation (sample edits, read them with the detector, score the
checklists). Editor SFT, GRPO and OPD, inference and the benchmarks build on it."""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxedit import evaluation, flow, sharding
from jaxedit import codec as codec_lib
from jaxedit import rewards as rewards_lib
from jaxedit.codec import Codec
from jaxedit.config import ConfigError
from jaxedit.data import job as data_job
from jaxedit.data.pipeline import fixed_batches
from jaxedit.models import editor as editor_model
from jaxedit.models.editor import Editor, EditorConfig, editor_config
from jaxedit.text import tokenizer as tokenizer_lib
from jaxedit.train import optimizer as optimizer_lib, records, setup as setup_lib

IMAGE_FIELDS = ("source_image", "target_image")
EVAL_INFO = ("instruction", "checklist", "family", "task")
EVAL_SCENES = ("source_scene", "target_scene")


@dataclasses.dataclass
class Setup(setup_lib.RunSetup):
  model: Editor

  @property
  def text_len(self) -> int:
    return self.config.model.text_max_len

  def sigmas(self, num_steps: int, latent_shape) -> jax.Array:
    """The sampler's num_steps + 1 times, shifted by sample.shift (any latent shape)."""
    if self.config.sample.shift <= 0:
      raise ConfigError("sample.shift must be > 0 (0, the pipeline's shift for each bucket, "
                        "is for runs on edit records)")
    with jax.ensure_compile_time_eval():  # a constant, also when called while tracing
      return flow.sigmas(num_steps, self.config.sample.shift)

  @functools.cached_property
  def codec(self) -> Codec:
    """Pixels <-> the model's input space; a VAE's weights are read on first use (setups
    that only size a run never read them; a dry run sets an abstract codec)."""
    return codec_lib.make_codec(self.config, self.mesh)

  def tokenize(self, record: dict) -> dict:
    ids, mask = tokenizer_lib.encode(self.tokenizer, [record.pop("instruction")], self.text_len)
    record["ids"], record["mask"] = ids[0], mask[0]
    return record


def make_parts(config: ml_collections.ConfigDict, workdir: str, devices=None):
  """What every editor trainer builds first: (world, tokenizer, model, mesh, logical rules,
  batch sharding). The tokenizer is loaded from DIR/tokenizer.json, or trained and saved."""
  if config.model.text_encoder != "shapes":
    raise ConfigError("the shapes dataset carries instructions, not embeddings: "
                      "model.text_encoder must be 'shapes' for this trainer")
  world = data_job.world_from(config)
  tok = tokenizer_lib.load_or_train(os.path.join(workdir, "tokenizer.json"), world,
                                    config.tokenizer.vocab_size,
                                    config.tokenizer.corpus_examples, config.data.seed)
  try:
    model = Editor(editor_config(config.model, world.image_size, tok.get_vocab_size()))
  except ValueError as e:
    raise ConfigError(str(e)) from None
  return (world, tok, model, *setup_lib.mesh_and_rules(config, devices))


def make_setup(config: ml_collections.ConfigDict, workdir: str, devices=None) -> Setup:
  """The editor's setup with the supervised optimizer of the config's `train` section."""
  return setup_lib.assemble(Setup, config, make_parts(config, workdir, devices),
                            optimizer_lib.supervised(config.train), functools.partial(
                                init_state, text_len=config.model.text_max_len))


def dummy_inputs(cfg: EditorConfig, text_len: int, batch: int = 1):
  """(x_t, t, source, text, guidance) of the editor's shapes, for init and eval_shape."""
  img = jnp.zeros((batch, cfg.image_size, cfg.image_size, cfg.channels), jnp.float32)
  if cfg.text is None:
    text = {"context": jnp.zeros((batch, text_len, cfg.flux.joint_attention_dim)),
            "pooled": jnp.zeros((batch, cfg.flux.pooled_projection_dim))}
  else:
    text = {"ids": jnp.zeros((batch, text_len), jnp.int32),
            "mask": jnp.ones((batch, text_len), bool)}
  guidance = jnp.ones((batch,)) if cfg.flux.guidance_embeds else None
  return img, jnp.zeros((batch,)), img, text, guidance


def init_state(rng, *, model, tx, text_len) -> setup_lib.TrainState:
  """A fresh editor's train state (`setup.assemble`'s init_state_fn)."""
  return setup_lib.fresh_state(
      editor_model.init_params(model, rng, *dummy_inputs(model.cfg, text_len)), tx)


def text_inputs(batch: dict, keep=None) -> dict:
  """Token ids and mask; where `keep` is False the prompt is emptied (unconditional)."""
  if keep is None:
    return {"ids": batch["ids"], "mask": batch["mask"]}
  return {"ids": jnp.where(keep[:, None], batch["ids"], 0),
          "mask": batch["mask"] & keep[:, None]}


def make_sampler(setup: Setup, num_steps: int, shift: float, guidance_scale: float):
  """jitted (params, batch, rng) -> uint8 edited images, by the Euler ODE (in the codec's
  space, then decoded)."""
  model = setup.model

  def sample(codec, params, batch, rng):
    source = codec.encode(batch["source_image"])
    text = text_inputs(batch)
    empty = text_inputs(batch, jnp.zeros(source.shape[:1], bool))

    def velocity(x, t, cond):
      return model.apply({"params": params}, x, t, source, text if cond else empty)

    x1 = jax.random.normal(rng, source.shape)
    x0 = flow.euler_sample(flow.guided(velocity, guidance_scale), x1,
                           flow.sigmas(num_steps, shift))
    return codec.decode(x0)

  sample = jax.jit(sample, in_shardings=(sharding.replicated(setup.mesh),
                                         setup.param_shardings, setup.batch_sharding, None),
                   out_shardings=setup.batch_sharding)
  return sharding.Program(sample, setup.mesh, setup.rules, (setup.codec,))


def eval_batches(setup, split: str, kinds, num_examples: int, batch_size: int):
  """Fixed batches of a split (padded to `batch_size`) as (arrays, info): `info` holds each
  real example's instruction, checklist, family and task tag, and its source and target
  scenes (for rewards)."""
  fields = IMAGE_FIELDS + EVAL_INFO + EVAL_SCENES
  out = []
  for batch in fixed_batches(setup.source(split), batch_size, num_examples, fields=fields,
                             kinds=kinds):
    info = {k: [str(v) for v in batch[k]] for k in EVAL_INFO}
    info.update({k: np.asarray(batch[k]) for k in EVAL_SCENES})
    ids, mask = tokenizer_lib.encode(setup.tokenizer, info["instruction"], setup.text_len)
    arrays = {"source_image": batch["source_image"], "target_image": batch["target_image"],
              "ids": ids, "mask": mask}
    out.append(({k: sharding.pad_rows(v, batch_size) for k, v in arrays.items()}, info))
  return out


def evaluate(setup, params, batches, sampler, seed: int, reward_fn=None):
  """Scores over `batches`: strict success and checklist score (overall, per family and per
  task), preservation of the untouched cells, and with `reward_fn` (a rewards.Rewards) the
  mean reward and its parts. Returns (summary, first batch's images for a grid)."""
  preservation = rewards_lib.preservation_reward(setup.world)
  scores = {"success": [], "score": [], "preservation": []}
  parts: dict[str, list] = {}
  groups = {"family": [], "task": []}
  first = None
  for i, (arrays, info) in enumerate(batches):
    n = len(info["instruction"])
    edited = sharding.to_host(sampler(
        params, sharding.global_from_full(arrays, setup.batch_sharding),
        jax.random.key(seed + i)))[:n]
    prompts = {**info, "source_image": arrays["source_image"][:n]}
    pending = reward_fn.submit(edited, prompts) if reward_fn is not None else None
    s = evaluation.score_edits(edited, info["checklist"], setup.world)
    s["preservation"] = preservation(edited, prompts)
    for k in scores:
      scores[k].append(s[k])
    if pending is not None:
      total, by_name = pending.result()
      for k, v in {"reward": total, **{f"reward_{k}": v for k, v in by_name.items()}}.items():
        parts.setdefault(k, []).append(v)
    for k in groups:
      groups[k] += info[k]
    if first is None:
      first = (arrays["source_image"][:n], edited, arrays["target_image"][:n],
               info["instruction"], s["success"])
  summary = evaluation.summarize({k: np.concatenate(v) for k, v in scores.items()}, groups)
  summary["preservation"] = float(np.concatenate(scores["preservation"]).mean())
  summary.update({k: float(np.concatenate(v).mean()) for k, v in parts.items()})
  return summary, first


def config_sampler(setup: Setup):
  """The Euler sampler of the config's `sample` section."""
  s = setup.config.sample
  return make_sampler(setup, s.num_steps, s.shift, s.guidance_scale)


def write_grid(writer, workdir: str, step: int, images, limit: int) -> None:
  """`evaluate`'s first batch (sources, edits, targets, texts, success) as a grid."""
  records.write_image(writer, workdir, step, "samples", "step",
                      evaluation.edit_grid(*images, limit))
