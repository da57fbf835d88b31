"""A tiny FLUX.1-Kontext pipeline folder, written by diffusers / transformers `save_pretrained`
with random weights and tokenizers built here (nothing downloaded): the real folder layout
(model_index.json, transformer/, vae/, text_encoder/, tokenizer/, text_encoder_2/,
tokenizer_2/, scheduler/) at a size that trains on a CPU in seconds.

    python tests/tiny_flux.py OUT        # writes the folder (and a few PNGs: OUT_images/)
"""

from __future__ import annotations

import json
import os
import string
import sys

import numpy as np

CHARS = sorted(set(string.ascii_lowercase + string.digits + "!,.'-?"))
WORDS = ["a", "red", "blue", "green", "circle", "square", "make", "the", "every", "shape",
         "left", "of", "turn", "into", "add", "remove", "sky", "dog", "cat", "hat"]
T5 = dict(d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
          relative_attention_num_buckets=8, relative_attention_max_distance=20,
          feed_forward_proj="gated-gelu", dropout_rate=0.0)
CLIP = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=77, bos_token_id=0, pad_token_id=1)
VAE = dict(latent_channels=4, block_out_channels=(8, 16, 16), layers_per_block=1,
           norm_num_groups=4, shift_factor=0.1, scaling_factor=1.5, use_quant_conv=False,
           use_post_quant_conv=False)
FLUX = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
            pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))


def _randomized(model, seed: int):
  import torch

  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      p.copy_(1 + 0.1 * noise if "norm" in name and name.endswith("weight") else 0.2 * noise)
  return model.eval()


def clip_tokenizer_files(folder: str) -> int:
  """vocab.json, merges.txt, tokenizer_config.json of a byte-level-style BPE over WORDS and
  single characters, as FLUX.1's tokenizer/ holds them; <|endoftext|> has the largest id
  (argmax pooling). Returns the vocabulary size."""
  vocab = {c + end: i for i, (end, c) in enumerate((e, c) for e in ("", "</w>") for c in CHARS)}
  merges = []
  for word in WORDS:
    parts = [*word[:-1], word[-1] + "</w>"]
    while len(parts) > 1:
      merges.append(f"{parts[0]} {parts[1]}")
      vocab.setdefault(parts[0] + parts[1], len(vocab))
      parts = [parts[0] + parts[1], *parts[2:]]
  for special in ("<|startoftext|>", "<|endoftext|>"):
    vocab[special] = len(vocab)
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "vocab.json"), "w") as f:
    json.dump(vocab, f)
  with open(os.path.join(folder, "merges.txt"), "w") as f:
    f.write("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
  with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "CLIPTokenizer", "model_max_length": 77,
               "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
               "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}, f)
  return len(vocab)


def t5_tokenizer():
  import transformers

  pieces = ([("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
            + [("▁" + w, -1.0 - 0.1 * i) for i, w in enumerate(WORDS)]
            + [(c, -5.0) for c in CHARS])
  return transformers.T5TokenizerFast(vocab=pieces, extra_ids=0) if hasattr(
      transformers, "T5TokenizerFast") else transformers.T5Tokenizer(vocab=pieces, extra_ids=0)


def write_pipeline(root: str, seed: int = 0, guidance_embeds: bool = True, t5=None, clip=None,
                   vae=None) -> str:
  """Writes the folder; returns `root`. `t5`, `clip`, `vae`: config keys over the defaults
  above (e.g. transformers' default T5 FFN, feed_forward_proj='relu')."""
  import diffusers
  import torch
  import transformers

  torch.manual_seed(seed)
  clip_vocab = clip_tokenizer_files(os.path.join(root, "_clip_tokenizer"))
  tokenizer = transformers.CLIPTokenizer.from_pretrained(os.path.join(root, "_clip_tokenizer"))
  t5_tok = t5_tokenizer()
  clip = _randomized(transformers.CLIPTextModel(transformers.CLIPTextConfig(
      vocab_size=clip_vocab, eos_token_id=clip_vocab - 1, **{**CLIP, **(clip or {})})), seed)
  t5 = _randomized(transformers.T5EncoderModel(transformers.T5Config(
      vocab_size=len(t5_tok), **{**T5, **(t5 or {})})), seed + 1)
  vae = {**VAE, **(vae or {})}
  blocks = len(vae["block_out_channels"])
  vae = _randomized(diffusers.AutoencoderKL(
      down_block_types=("DownEncoderBlock2D",) * blocks,
      up_block_types=("UpDecoderBlock2D",) * blocks, **vae), seed + 2)
  transformer = _randomized(diffusers.FluxTransformer2DModel(
      guidance_embeds=guidance_embeds, **FLUX), seed + 3)
  scheduler = diffusers.FlowMatchEulerDiscreteScheduler(
      shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
      base_image_seq_len=256, max_image_seq_len=4096)
  pipe = diffusers.FluxKontextPipeline(scheduler=scheduler, vae=vae, text_encoder=clip,
                                       tokenizer=tokenizer, text_encoder_2=t5,
                                       tokenizer_2=t5_tok, transformer=transformer)
  pipe.save_pretrained(root, safe_serialization=True)
  import shutil

  shutil.rmtree(os.path.join(root, "_clip_tokenizer"))
  return root


def write_images(folder: str, sizes=((64, 64), (48, 80), (80, 48), (64, 96), (64, 64),
                                     (72, 72)), seed: int = 0) -> list[str]:
  """A few real PNGs of blocks of colour at several aspect ratios."""
  from PIL import Image

  rng = np.random.default_rng(seed)
  os.makedirs(folder, exist_ok=True)
  paths = []
  for i, (h, w) in enumerate(sizes):
    image = np.full((h, w, 3), rng.integers(0, 255, 3), np.uint8)
    y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
    image[y:y + h // 3, x:x + w // 3] = rng.integers(0, 255, 3)
    paths.append(os.path.join(folder, f"{i}.png"))
    Image.fromarray(image).save(paths[-1])
  return paths


def write_pairs(folder: str) -> str:
  """DanceGRPO-style rows with targets on write_images' PNGs (the target: the source with
  its red channel inverted); returns the JSONL's path."""
  from PIL import Image

  rows = []
  for i, path in enumerate(write_images(os.path.join(folder, "images"))):
    image = np.asarray(Image.open(path)).copy()
    image[..., 0] = 255 - image[..., 0]
    target = path.replace(".png", "_target.png")
    Image.fromarray(image).save(target)
    rows.append({"instruction": f"invert the red {i}", "source_image": path,
                 "target_image": target})
  with open(os.path.join(folder, "pairs.jsonl"), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  return os.path.join(folder, "pairs.jsonl")


def write_edit_r1(folder: str, num_test: int = 2) -> str:
  """An Edit-R1 folder: images/ and train_metadata.jsonl / test_metadata.jsonl."""
  paths = write_images(os.path.join(folder, "images"))
  prompts = ["make the square red", "turn the sky blue", "add a hat", "remove the dog",
             "make every shape green", "turn the cat into a dog"]
  rows = [{"prompt": p, "image": os.path.relpath(path, folder), "requirement": p}
          for p, path in zip(prompts, paths)]
  for name, part in (("train_metadata.jsonl", rows[:-num_test] if num_test else rows),
                     ("test_metadata.jsonl", rows[-num_test:] if num_test else [])):
    if part:
      with open(os.path.join(folder, name), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in part)
  return os.path.join(folder, "train_metadata.jsonl")


if __name__ == "__main__":
  out = sys.argv[1]
  write_pipeline(out)
  print(out, write_edit_r1(out + "_data"))
