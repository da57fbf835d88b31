"""A tiny Qwen2-VL model folder, written by transformers `save_pretrained` with random weights
and a tokenizer built here (nothing downloaded): the real layout (config.json, weights,
tokenizer, chat template, image processor) at a size that runs on a CPU in a second, for
`jaxedit.judge_server`'s tests.

    python tests/tiny_qwen2_vl.py OUT        # writes the folder
"""

from __future__ import annotations

import string
import sys

# Qwen2-VL's special tokens; the vision ones are the config's image/vision start/end ids.
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
            "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
WORDS = ["Score", "score", "image", "source", "edited", "edit", "the", "and", "instruction",
         "Rate", "from", "to", "user", "assistant", "system"]
# Qwen2-VL's chat template, short: images become <|vision_start|><|image_pad|><|vision_end|>
# (the processor repeats the pad once per merged patch).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=1024,
            rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})  # head_dim 16 / 2
VISION = dict(depth=1, embed_dim=32, num_heads=2, mlp_ratio=2, hidden_size=32, patch_size=14,
              spatial_merge_size=2, temporal_patch_size=2)
# Images of up to 56 x 56 pixels: at most 16 patches of 14, 4 tokens after the 2 x 2 merge.
PIXELS = dict(min_pixels=28 * 28, max_pixels=56 * 56)


def byte_alphabet() -> list[str]:
  """The 256 characters GPT-2 / Qwen2 byte-level BPE spells the bytes with."""
  keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
  out, extra = {}, 0
  for b in range(256):
    if b in keep:
      out[b] = chr(b)
    else:
      out[b] = chr(256 + extra)
      extra += 1
  return [out[b] for b in range(256)]


def tokenizer():
  """A byte-level BPE over the 256 bytes, a few merged words and digits, with Qwen2-VL's
  special tokens after them; `Qwen2Tokenizer` (transformers 5) or `Qwen2TokenizerFast`."""
  import transformers

  vocab = {c: i for i, c in enumerate(byte_alphabet())}
  merges = []
  for word in WORDS + ["Ġ" + w for w in WORDS]:
    parts = list(word)
    while len(parts) > 1:
      merges.append((parts[0], parts[1]))
      vocab.setdefault(parts[0] + parts[1], len(vocab))
      parts = [parts[0] + parts[1], *parts[2:]]
  merges = list(dict.fromkeys(merges))
  cls = getattr(transformers, "Qwen2TokenizerFast", None) or transformers.Qwen2Tokenizer
  if cls is transformers.Qwen2Tokenizer and hasattr(cls, "model"):  # transformers >= 5
    tok = cls(vocab=vocab, merges=merges, eos_token="<|im_end|>", pad_token="<|endoftext|>",
              unk_token=None)
  else:  # transformers 4: a tokenizers object wrapped in the fast class
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers

    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tok = cls(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
              unk_token=None)
  tok.add_special_tokens({"additional_special_tokens": SPECIALS[1:]})
  tok.add_tokens([t for t in SPECIALS if t not in tok.get_vocab()], special_tokens=True)
  tok.chat_template = CHAT_TEMPLATE
  return tok


def image_processor():
  import transformers

  cls = (getattr(transformers, "Qwen2VLImageProcessorPil", None)
         or transformers.Qwen2VLImageProcessor)  # the default one needs torchvision
  return cls(**PIXELS, size={"shortest_edge": PIXELS["min_pixels"],
                             "longest_edge": PIXELS["max_pixels"]})


def write_model(folder: str, seed: int = 0) -> str:
  """Writes the folder (model and processor); returns `folder`."""
  import torch
  import transformers

  tok = tokenizer()
  ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIALS}
  config = transformers.Qwen2VLConfig(
      text_config=dict(TEXT, vocab_size=len(tok), bos_token_id=ids["<|endoftext|>"],
                       eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]),
      vision_config=VISION, image_token_id=ids["<|image_pad|>"],
      video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
      vision_end_token_id=ids["<|vision_end|>"])
  torch.manual_seed(seed)
  model = transformers.Qwen2VLForConditionalGeneration(config).eval()
  # Random weights at scales that give a peaked next-token distribution (the default init,
  # std 0.02, makes every logit about equal), and a judge of digits: every text token's
  # embedding holds 2 in feature 0, which no layer writes to, and only the digits' output rows
  # read it, so "0".."9" lead the first token's top log-probs (a random model would rank them
  # anywhere among ~400 tokens), in an order the rest of the weights pick.
  with torch.no_grad():
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
      if "norm" not in name:
        scale = 1.0 if "embed_tokens" in name else 0.3 if "lm_head" in name else 0.1
        p.copy_(scale * torch.randn(p.shape, generator=gen))
    text = model.model.language_model
    text.embed_tokens.weight[:, 0] = 2.0
    for layer in text.layers:
      layer.self_attn.o_proj.weight[0] = 0.0
      layer.mlp.down_proj.weight[0] = 0.0
    model.lm_head.weight[:, 0] = 0.0
    model.lm_head.weight[tok.convert_tokens_to_ids(list(string.digits)), 0] = 3.0
  model.generation_config.eos_token_id = ids["<|im_end|>"]
  model.generation_config.pad_token_id = ids["<|endoftext|>"]
  model.save_pretrained(folder, safe_serialization=True)
  # The processor's parts, as a Hub folder holds them: Qwen2VLProcessor itself would want a
  # video processor too, which needs torchvision.
  tok.save_pretrained(folder)
  image_processor().save_pretrained(folder)
  return folder


if __name__ == "__main__":
  print(write_model(sys.argv[1]))
