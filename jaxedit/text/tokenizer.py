"""A real byte-level BPE tokenizer (HF `tokenizers`) trained on the shapes-world corpus, and
the special tokens and chat template of any tokenizer folder (`Specials`).

Saved as `tokenizer.json` beside a `tokenizer_config.json`, so the exported planner opens
with `AutoTokenizer`. Byte-level BPE has no unknown token: held-out phrasings tokenise, into
smaller pieces. A pretrained planner's tokenizer (a transformers folder's, or converted from
a GGUF file) is used as it is: its special tokens and chat template come from its own
`tokenizer_config.json` (and `chat_template.jinja`), as transformers reads them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Iterable, Sequence

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from jaxedit import plans
from jaxedit.data.examples import generate
from jaxedit.shapes.world import World

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"  # the shapes tokenizer's
SPECIAL_TOKENS = (PAD, BOS, EOS)
CONFIG_FILE = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"
FILES = ("tokenizer.json", CONFIG_FILE, TEMPLATE_FILE)  # a tokenizer folder's, as transformers'
# The shapes tokenizer's configuration: prompts start with BOS (written into the prompt text).
SHAPES_CONFIG = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS,
                 "eos_token": EOS, "pad_token": PAD, "add_bos_token": False,
                 "padding_side": "left"}


@dataclasses.dataclass(frozen=True)
class Specials:
  """A tokenizer's special tokens and chat template, read from its folder's configuration.

  A prompt is the chat template rendered around the request, where there is one; else BOS
  (where there is one) then the request. The completion ends with EOS; padding is `pad`
  (EOS where the configuration names no pad token)."""

  bos: str | None
  eos: str
  pad: str
  bos_id: int | None
  eos_id: int
  pad_id: int
  chat_template: str | None

  @classmethod
  def from_folder(cls, folder: str, tok: tokenizers.Tokenizer) -> "Specials":
    """From `folder`'s tokenizer_config.json (and chat_template.jinja); a folder without one
    (a run from before it was written) holds the shapes tokenizer."""
    path = os.path.join(folder, CONFIG_FILE)
    config = SHAPES_CONFIG
    if os.path.exists(path):
      try:
        with open(path) as f:
          config = json.load(f)
      except ValueError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    name = lambda key: (config.get(key) or {}).get("content") if isinstance(
        config.get(key), dict) else config.get(key)
    bos, eos = name("bos_token"), name("eos_token")
    pad = name("pad_token") or eos
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
      template = {t["name"]: t["template"] for t in template}.get("default")
    template_path = os.path.join(folder, TEMPLATE_FILE)
    if template is None and os.path.exists(template_path):
      with open(template_path) as f:
        template = f.read()
    ids = {}
    for key, token in (("eos_token", eos), ("pad_token", pad), ("bos_token", bos)):
      if token is None and key == "bos_token":
        continue
      if token is None or tok.token_to_id(token) is None:
        raise ValueError(f"{path}: {key} {token!r} is not a token of {folder}/tokenizer.json")
      ids[key] = tok.token_to_id(token)
    return cls(bos, eos, pad, ids.get("bos_token"), ids["eos_token"], ids["pad_token"],
               template)

  def prompt(self, request: str, system: str = "") -> str:
    """The prompt text of a request: rendered by the chat template (a user turn, after a
    system turn when `system` is set, then the assistant's header), or BOS + request."""
    if self.chat_template is None:
      return (self.bos or "") + request
    from transformers.utils import chat_template_utils  # pylint: disable=import-outside-toplevel
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": request}]
    rendered, _ = chat_template_utils.render_jinja_template(
        [messages], chat_template=self.chat_template, add_generation_prompt=True,
        bos_token=self.bos or "", eos_token=self.eos, pad_token=self.pad)
    return rendered[0]


def copy_files(src: str, dst: str) -> None:
  """Copies the tokenizer files `src` has into the folder `dst`, each atomically and
  tokenizer.json last: its presence marks a complete copy."""
  os.makedirs(dst, exist_ok=True)
  for name in FILES[1:] + FILES[:1]:
    if os.path.exists(os.path.join(src, name)):
      tmp = os.path.join(dst, f"{name}.tmp{os.getpid()}")  # every process of a run copies
      shutil.copyfile(os.path.join(src, name), tmp)
      os.replace(tmp, os.path.join(dst, name))


def corpus(world: World, num_examples: int, seed: int) -> Iterable[str]:
  """Texts of the train split: instructions, plan steps and scene descriptions."""
  half = num_examples // 2
  for record in generate(world, "train", half, num_examples - half, seed):
    yield record["instruction"]
    yield record["scene_text"]
    yield from json.loads(record["plan_steps"])


def planner_corpus(world: World, num_examples: int, seed: int) -> Iterable[str]:
  """The editor corpus plus plans in the planner's output format and its prompts, so the
  JSON punctuation and the template merge into tokens too."""
  yield from corpus(world, num_examples, seed)
  half = num_examples // 2
  for record in generate(world, "train", half, num_examples - half, seed):
    yield plans.prompt(record["instruction"], record["scene_text"])
    yield record["plan_steps"]


def train(texts: Iterable[str], vocab_size: int) -> tokenizers.Tokenizer:
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(texts, trainer=trainer)
  return tok


def load_or_train(path: str, world: World, vocab_size: int, num_examples: int,
                  seed: int, corpus=corpus) -> tokenizers.Tokenizer:
  """Loads `path` if it exists, else trains on `corpus(world, num_examples, seed)` and saves
  it there."""
  if os.path.exists(path):
    return tokenizers.Tokenizer.from_file(path)
  tok = train(corpus(world, num_examples, seed), vocab_size)
  folder = os.path.dirname(path) or "."
  os.makedirs(folder, exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"  # per process: every process of a run may train it
  config = os.path.join(folder, CONFIG_FILE)
  with open(config + f".tmp{os.getpid()}", "w") as f:
    json.dump(SHAPES_CONFIG, f, indent=1)
  os.replace(config + f".tmp{os.getpid()}", config)
  tok.save(tmp)
  os.replace(tmp, path)  # atomic, and last: a crash never leaves half a tokenizer
  return tok


def encode(tok: tokenizers.Tokenizer, texts: Sequence[str], max_len: int):
  """(ids int32 (B, max_len), mask bool (B, max_len)); raises on a text that does not fit."""
  pad = tok.token_to_id(PAD)
  ids = np.full((len(texts), max_len), pad, np.int32)
  mask = np.zeros((len(texts), max_len), bool)
  for i, enc in enumerate(tok.encode_batch(list(texts))):
    if len(enc.ids) > max_len:
      raise ValueError(f"text of {len(enc.ids)} tokens exceeds max_len {max_len}: {texts[i]!r}")
    ids[i, :len(enc.ids)] = enc.ids
    mask[i, :len(enc.ids)] = True
  return ids, mask
