"""The planner below its trainers: its setup (world, tokenizer, model, mesh) with the
prompt and plan layout, teacher-forced completion logits, the plan sampler, and evaluation
(decode plans, parse them, score them against the reference checklists).

A sequence is laid out as the sampler lays out a rollout: [image prefix] [prompt,
left-padded] [plan JSON + EOS, right-padded].
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxedit import checkpoint, flow, lora, plans, sampling, sharding
from jaxedit.config import ConfigError, plain
from jaxedit.data import job as data_job
from jaxedit.data.pipeline import fixed_batches
from jaxedit.interop import lm_transformers, pretrained
from jaxedit.models import planner as planner_model
from jaxedit.models.planner import Planner, planner_config
from jaxedit.shapes import checklist as cl
from jaxedit.shapes.world import Scene
from jaxedit.text import tokenizer as tokenizer_lib
from jaxedit.train import optimizer as optimizer_lib, setup as setup_lib
from jaxedit.train.setup import TrainState

VISION_MODULES = ("vision", "cell_head")  # trained at train.vision_lr_factor x the rate
RECORD_FIELDS = ("source_image", "instruction", "scene_text", "plan_steps")
EVAL_INFO = ("instruction", "plan_steps", "checklist", "family", "held_out_family", "task")


@dataclasses.dataclass
class Setup(setup_lib.RunSetup):
  model: Planner
  specials: tokenizer_lib.Specials  # the tokenizer's special tokens and chat template

  @property
  def pad_id(self) -> int:
    return self.specials.pad_id

  @property
  def eos_id(self) -> int:
    return self.specials.eos_id

  def width(self, longest: int, limit: int, trim: bool) -> int:
    """Padded width: `limit`, or with `trim` the longest row rounded up to pad_multiple.
    Several processes must agree on shapes without talking, so they always pad to `limit`."""
    multiple = self.config.prompt.pad_multiple
    if not trim or not multiple or longest > limit or jax.process_count() > 1:
      return limit
    return min(limit, -(-longest // multiple) * multiple)

  def prompt_text(self, instruction: str, scene_text: str | None) -> str:
    """The prompt: the request (plans.prompt) in the tokenizer's chat template, or after
    BOS where it has none."""
    pc = self.config.prompt
    request = plans.prompt(instruction, scene_text if pc.scene_as_text else None)
    if self.specials.chat_template is not None:
      request = request.strip()
    return self.specials.prompt(request, pc.system)

  def prompt_ids(self, instructions, scene_texts,
                 trim: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded (ids, valid) of the prompts."""
    pc = self.config.prompt
    texts = [self.prompt_text(i, s) for i, s in zip(instructions, scene_texts)]
    rows = [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]
    for text, row in zip(texts, rows):
      if len(row) > pc.max_prompt_len:
        raise ValueError(f"prompt of {len(row)} tokens exceeds prompt.max_prompt_len "
                         f"{pc.max_prompt_len}: {text!r}")
    width = self.width(max(map(len, rows)), pc.max_prompt_len, trim)
    return sampling.left_pad(rows, self.pad_id, width)

  def plan_ids(self, plan_texts, trim: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded (ids, valid) of the plan JSON + EOS."""
    encoded = self.tokenizer.encode_batch(list(plan_texts), add_special_tokens=False)
    limit = self.config.prompt.max_plan_len
    n = self.width(max(len(e.ids) + 1 for e in encoded), limit, trim)
    ids = np.full((len(plan_texts), n), self.pad_id, np.int32)
    valid = np.zeros((len(plan_texts), n), bool)
    for i, (text, e) in enumerate(zip(plan_texts, encoded)):
      row = e.ids + [self.eos_id]
      if len(row) > limit:
        raise ValueError(f"plan of {len(row)} tokens exceeds prompt.max_plan_len {limit}: "
                         f"{text!r}")
      ids[i, :len(row)], valid[i, :len(row)] = row, True
    return ids, valid

  def examples(self, batch: dict, trim: bool = False) -> dict:
    """A batch of records -> model inputs; `trim` pads only as far as the batch needs. The
    source scene comes along where the batch has it and the model has a cell head."""
    prompt, prompt_valid = self.prompt_ids(batch["instruction"], batch["scene_text"], trim)
    plan, plan_valid = self.plan_ids(list(batch["plan_steps"]), trim)
    out = {"source_image": np.asarray(batch["source_image"]), "prompt": prompt,
           "prompt_valid": prompt_valid, "plan": plan, "plan_valid": plan_valid}
    if "source_scene" in batch and self.model.cfg.vision and self.model.cfg.vision.cell_classes:
      out["source_scene"] = np.asarray(batch["source_scene"], np.int32)
    return out

  def decode(self, tokens: np.ndarray, valid: np.ndarray) -> list[str]:
    """Sampled plan tokens -> texts (EOS and padding dropped)."""
    keep = np.asarray(valid) & (np.asarray(tokens) != self.eos_id)
    rows = [[int(t) for t in row[ok]] for row, ok in zip(np.asarray(tokens), keep)]
    return self.tokenizer.decode_batch(rows)


def check_config(config: ml_collections.ConfigDict) -> None:
  data_job.check_data_config(config.data)
  for key in ("num_steps", "batch_size", "log_every"):
    if config.train[key] <= 0:
      raise ConfigError(f"config key 'train.{key}' must be > 0")
  for key in ("max_prompt_len", "max_plan_len"):
    if config.prompt[key] <= 0:
      raise ConfigError(f"config key 'prompt.{key}' must be > 0")
  if config.sample.attend_chunk < 0:
    raise ConfigError("config key 'sample.attend_chunk' must be >= 0 (0: one decode segment)")
  if config.train.cell_loss_weight > 0 and not (config.model.vision.enabled
                                                and config.model.vision.cell_head):
    raise ConfigError("config key 'train.cell_loss_weight' > 0 needs a cell head "
                      "(model.vision.enabled and model.vision.cell_head); set it to 0")


def resolve_model(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` with the model's architecture keys (lm_transformers.ARCHITECTURE) that are
  None taken from `init_from`: a GGUF file's metadata, a transformers folder's config.json,
  or the saved config of a planner workdir. A key set to a value a pretrained model
  disagrees with is an error naming it."""
  model = config.model
  unset = [k for k in lm_transformers.ARCHITECTURE if model[k] is None]
  source = pretrained.lm_architecture(config.init_from) if config.init_from else None
  if source is None and unset and config.init_from:
    mngr, step = checkpoint.latest_step(config.init_from, "a planner workdir")
    source = {k: checkpoint.saved_config(mngr, step)["model"][k]
              for k in lm_transformers.ARCHITECTURE}
  elif source is not None:
    wrong = [f"model.{k} = {model[k]!r} here, {source[k]!r} in the weights"
             for k in lm_transformers.ARCHITECTURE
             if model[k] is not None and plain(model[k]) != plain(source[k])]
    if wrong:
      raise ConfigError(f"init_from {config.init_from}: " + ", ".join(wrong) + "; leave these "
                        "keys unset (None, as configs/shapes_planner_sft.py:smollm2 does) to "
                        "take them from the weights")
  if not unset:
    return config
  if source is None:
    raise ConfigError(f"config keys {', '.join('model.' + k for k in unset)} are unset (None): "
                      "set them, or set init_from to a pretrained LM (a GGUF file or a "
                      "transformers folder) or a planner workdir to take them from")
  resolved = ml_collections.ConfigDict(config.to_dict())
  for k in unset:
    resolved.model[k] = source[k]
  return resolved


def make_parts(config: ml_collections.ConfigDict, workdir: str, devices=None):
  """(world, tokenizer, model, mesh, logical rules, batch sharding); the tokenizer is loaded
  from DIR/tokenizer.json, or trained on the planner corpus and saved there."""
  world = data_job.world_from(config)
  tok = tokenizer_lib.load_or_train(os.path.join(workdir, "tokenizer.json"), world,
                                    config.tokenizer.vocab_size,
                                    config.tokenizer.corpus_examples, config.data.seed,
                                    corpus=tokenizer_lib.planner_corpus)
  if tok.get_vocab_size() > config.model.vocab_size:
    raise ConfigError(f"model.vocab_size {config.model.vocab_size} is smaller than the "
                      f"{tok.get_vocab_size()} tokens of {workdir}/tokenizer.json")
  try:
    model = Planner(planner_config(config.model, world))
  except ValueError as e:
    raise ConfigError(f"config model: {e}") from None
  return (world, tok, model, *setup_lib.mesh_and_rules(config, devices))


def specials(workdir: str, tok) -> tokenizer_lib.Specials:
  try:
    return tokenizer_lib.Specials.from_folder(workdir, tok)
  except ValueError as e:
    raise ConfigError(f"tokenizer: {e}") from None


def make_setup(config: ml_collections.ConfigDict, workdir: str, devices=None) -> Setup:
  """A checked planner config's setup (architecture keys resolved from `init_from`), with
  the supervised optimizer of its `train`."""
  config = resolve_model(config)
  check_config(config)
  parts = make_parts(config, workdir, devices)
  factor = config.train.vision_lr_factor
  optimizer = optimizer_lib.supervised(config.train, tuple(
      (module, factor) for module in VISION_MODULES if factor != 1.0))
  setup = setup_lib.assemble(Setup, config, parts, optimizer,
                             functools.partial(init_state, image_size=parts[0].image_size,
                                               prompt_len=config.prompt.max_prompt_len),
                             specials=specials(workdir, parts[1]))
  if config.model.lora_rank:
    try:
      lora.check_targets(setup.abstract_state.params, config.model.lora_targets)
    except ValueError as e:
      raise ConfigError(f"config key 'model.lora_targets': {e}") from None
  return setup


def init_state(rng, *, model: Planner, tx, image_size: int, prompt_len: int) -> TrainState:
  """A fresh state; with LoRA (model.lora_rank) the LM's weights are its frozen `base` and
  its adapters train, beside the whole vision prefix."""
  image = jnp.zeros((1, image_size, image_size, 3)) if model.cfg.vision else None
  ids = jnp.zeros((1, prompt_len), jnp.int32)
  valid = jnp.ones((1, model.cfg.prefix_len + prompt_len), bool)
  params = planner_model.init_params(model, rng, ids, valid, image=image)
  base = None
  if model.cfg.lm.lora_rank:
    params, base = lora.split(params, within=("lm",))
  return setup_lib.fresh_state(params, tx, base=base)


def abstract_whole(setup: Setup):
  """The abstract arrays of the whole model (adapters, base and vision prefix)."""
  return lora.whole(setup.abstract_state.params, setup.abstract_state.base)


def completion_logits(params, model: Planner, batch: dict, with_cells: bool = False):
  """Logits (B, N, V) predicting each completion token (teacher forcing), laid out as the
  sampler lays out a rollout; `with_cells` also returns the cell head's logits
  (B, cells, sum(cell_classes))."""
  image = flow.to_model_space(batch["source_image"]) if model.cfg.vision else None
  ids = jnp.concatenate([batch["prompt"], batch["plan"]], axis=1)
  b, p = batch["prompt"].shape
  valid = jnp.concatenate([jnp.ones((b, model.cfg.prefix_len), bool), batch["prompt_valid"],
                           batch["plan_valid"]], axis=1)
  first = model.cfg.prefix_len + p - 1  # the last prompt slot predicts the first plan token
  span = (first, batch["plan"].shape[1])  # the head runs on these positions only
  if not with_cells:
    return model.apply({"params": params}, ids, valid, image=image, head_span=span)
  logits, sown = model.apply({"params": params}, ids, valid, image=image, head_span=span,
                             mutable=["intermediates"])
  return logits, sown["intermediates"]["cell_logits"][0]


def make_plan_sampler(setup: Setup):
  """(params, arrays, rng) -> Samples of plans for a batch of model inputs."""
  sc = setup.config.sample
  settings = sampling.SamplingConfig(setup.config.prompt.max_plan_len, (setup.eos_id,),
                                     setup.pad_id, sc.top_k, sc.top_p,
                                     sc.attend_chunk)
  sample = sampling.make_sampler(setup.model, settings, setup.mesh, setup.rules)
  vision = setup.model.cfg.vision is not None

  def run(params, arrays: dict, rng, temperature=sc.temperature):
    image = flow.to_model_space(arrays["source_image"]) if vision else None
    return sample(params, arrays["prompt"], arrays["prompt_valid"], rng, temperature, image)
  return run


def eval_batches(setup: Setup, split: str, num_examples: int, batch_size: int):
  """Fixed batches of a split's abstract examples (padded to `batch_size`) as (arrays, info)."""
  out = []
  for batch in fixed_batches(setup.source(split), batch_size, num_examples,
                             fields=RECORD_FIELDS + EVAL_INFO[2:] + ("source_scene", "num_steps"),
                             kinds=("abstract",)):
    arrays = setup.examples(batch)
    arrays = {k: sharding.pad_rows(v, batch_size) for k, v in arrays.items()}
    info = {k: [v.item() if hasattr(v, "item") else v for v in batch[k]] for k in EVAL_INFO}
    info["source_scene"] = np.asarray(batch["source_scene"])
    info["num_steps"] = np.asarray(batch["num_steps"])
    out.append((arrays, info))
  return out


def score_plans(texts: list[str], info: dict) -> dict[str, np.ndarray]:
  """Per example: `plan_checklist_score` (plans.plan_score), `plan_exact` (the reference
  steps, exactly) and `plan_parses` (valid JSON whose every step applies)."""
  out = {"plan_checklist_score": [], "plan_exact": [], "plan_parses": []}
  for i, text in enumerate(texts):
    scene = Scene.from_array(info["source_scene"][i])
    checklist = cl.Checklist.from_json(info["checklist"][i])
    out["plan_checklist_score"].append(
        plans.plan_score(text, scene, checklist, int(info["num_steps"][i])))
    try:
      plans.parse_plan(text, scene)
      parses = True
    except plans.PlanError:
      parses = False
    out["plan_parses"].append(parses)
    exact = parses and plans.parse_json(text) == json.loads(info["plan_steps"][i])
    out["plan_exact"].append(exact)
  return {k: np.asarray(v, np.float32) for k, v in out.items()}


def summarize_plans(scores: dict[str, np.ndarray], groups: dict[str, list[str]],
                    held_out: np.ndarray) -> dict:
  """Means over the training families at the top level, and the same under
  `held_out_families` for the families never seen in training. `groups` maps a name
  (`family`, `task`) to one label per example and yields `plan_checklist_score_by_{name}`
  and `plan_exact_by_{name}`."""
  def means(keep):
    s = {k: float(v[keep].mean()) if keep.any() else None for k, v in scores.items()}
    s["num_examples"] = int(keep.sum())
    for name, labels in groups.items():
      labels = np.asarray(labels)
      for metric in ("plan_checklist_score", "plan_exact"):
        s[f"{metric}_by_{name}"] = {
            label: float(scores[metric][keep & (labels == label)].mean())
            for label in sorted(set(labels[keep].tolist()))}
    return s
  summary = means(~held_out)
  if held_out.any():
    summary["held_out_families"] = means(held_out)
  return summary


def plan_texts(setup: Setup, params, batches, sampler, seed: int = 0) -> list[list[str]]:
  """The decoded plan of every real example, per batch."""
  out = []
  for i, (arrays, info) in enumerate(batches):
    n = len(info["instruction"])
    samples = sampler(params, sharding.global_from_full(arrays, setup.batch_sharding),
                      jax.random.key(seed + i))
    out.append(setup.decode(sharding.to_host(samples.tokens)[:n],
                            sharding.to_host(samples.valid)[:n]))
  return out


def evaluate(setup: Setup, params, batches, sampler, seed: int = 0, texts=None,
             extra_scores=None):
  """(summary, [(instruction, plan, reference), ...] of the first batch). `texts` (per batch)
  skips decoding; `extra_scores` (name -> per-example array) are summarised alongside."""
  texts = plan_texts(setup, params, batches, sampler, seed) if texts is None else texts
  scores = [score_plans(t, info) for t, (_, info) in zip(texts, batches)]
  scores = {k: np.concatenate([s[k] for s in scores]) for k in scores[0]}
  scores.update(extra_scores or {})
  groups = {name: [label for _, info in batches for label in info[name]]
            for name in ("family", "task")}
  held_out = np.asarray([bool(h) for _, info in batches for h in info["held_out_family"]])
  first = list(zip(batches[0][1]["instruction"], texts[0], batches[0][1]["plan_steps"]))
  return summarize_plans(scores, groups, held_out), first


def format_samples(samples) -> str:
  return "\n\n".join(f"instruction: {i}\nplan:      {p}\nreference: {r}" for i, p, r in samples)


def write_samples(writer, workdir: str, step: int, samples) -> None:
  """Validation plans beside their references, to TensorBoard and DIR/samples/."""
  writer.write_texts(step, {"plans": format_samples(samples)})
  if jax.process_index() == 0:
    os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
    with open(os.path.join(workdir, "samples", f"plans_{step:07d}.txt"), "w") as f:
      f.write(format_samples(samples) + "\n")
