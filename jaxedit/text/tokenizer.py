"""A real byte-level BPE tokenizer (HF `tokenizers`) trained on the shapes-world corpus.

Saved as `tokenizer.json`, so the exported planner opens with `AutoTokenizer`. Byte-level
BPE has no unknown token: held-out phrasings tokenise, into smaller pieces.
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Sequence

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from jaxedit import plans
from jaxedit.data.examples import generate
from jaxedit.shapes.world import World

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
SPECIAL_TOKENS = (PAD, BOS, EOS)


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
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"  # per process: every process of a run may train it
  tok.save(tmp)
  os.replace(tmp, path)  # atomic: a crash never leaves half a tokenizer
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
