"""Tiny Llama / Qwen2 GGUF files written here with the `gguf` package, as llama.cpp's converter
writes them: the Llama q/k rows interleaved per head, each tensor in a chosen block type."""

from __future__ import annotations

import einops
import gguf
import numpy as np

SHAPE = dict(vocab_size=64, hidden_size=256, intermediate_size=256, num_hidden_layers=2,  # K-quants: 256-wide rows
             num_attention_heads=4, num_key_value_heads=2, rope_theta=10_000.0,
             rms_norm_eps=1e-5)


def random_state_dict(arch: str, seed: int = 0, tied: bool = True) -> dict[str, np.ndarray]:
  """A transformers-named state dict of the tiny model (rotate-half q/k rows)."""
  rng = np.random.default_rng(seed)
  h, f, v = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["vocab_size"]
  kv = h // SHAPE["num_attention_heads"] * SHAPE["num_key_value_heads"]
  w = lambda *shape: rng.normal(0, 0.1, shape).astype(np.float32)
  out = {"model.embed_tokens.weight": w(v, h), "model.norm.weight": 1 + w(h) / 5}
  if not tied:
    out["lm_head.weight"] = w(v, h)
  for i in range(SHAPE["num_hidden_layers"]):
    p = f"model.layers.{i}."
    out.update({p + "self_attn.q_proj.weight": w(h, h), p + "self_attn.k_proj.weight": w(kv, h),
                p + "self_attn.v_proj.weight": w(kv, h), p + "self_attn.o_proj.weight": w(h, h),
                p + "mlp.gate_proj.weight": w(f, h), p + "mlp.up_proj.weight": w(f, h),
                p + "mlp.down_proj.weight": w(h, f), p + "input_layernorm.weight": 1 + w(h) / 5,
                p + "post_attention_layernorm.weight": 1 + w(h) / 5})
    if arch == "qwen2":
      out.update({p + "self_attn.q_proj.bias": w(h), p + "self_attn.k_proj.bias": w(kv),
                  p + "self_attn.v_proj.bias": w(kv)})
  return out


_GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
               "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def gguf_name(name: str) -> str:
  top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight":
         "output_norm.weight", "lm_head.weight": "output.weight"}
  if name in top:
    return top[name]
  _, _, i, *module, leaf = name.split(".")
  return f"blk.{i}.{_GGUF_NAMES['.'.join(module)]}.{leaf}"


def permute(rows: np.ndarray, heads: int) -> np.ndarray:
  """llama.cpp's converter: each head's rotate-half rows interleaved."""
  return einops.rearrange(rows, "(h two d) ... -> (h d two) ...", h=heads, two=2)


def write(path: str, state: dict[str, np.ndarray], arch: str = "llama",
          qtype: str = "F32", raw: dict[str, str] | None = None) -> dict[str, np.ndarray]:
  """Writes `state` as a GGUF file of architecture `arch`, 2-D weights quantized to `qtype`
  (1-D ones stay F32); `raw` names tensors (GGUF names) written as bytes of another block
  type, unread. Returns what a faithful reader gives back: each tensor dequantized."""
  writer = gguf.GGUFWriter(path, arch)
  writer.add_block_count(SHAPE["num_hidden_layers"])
  writer.add_context_length(256)
  writer.add_embedding_length(SHAPE["hidden_size"])
  writer.add_feed_forward_length(SHAPE["intermediate_size"])
  writer.add_head_count(SHAPE["num_attention_heads"])
  writer.add_head_count_kv(SHAPE["num_key_value_heads"])
  writer.add_rope_freq_base(SHAPE["rope_theta"])
  writer.add_layer_norm_rms_eps(SHAPE["rms_norm_eps"])
  writer.add_vocab_size(SHAPE["vocab_size"])
  expected = {}
  rng = np.random.default_rng(1)
  for name, value in state.items():
    stored = value
    if arch == "llama" and (".q_proj." in name or ".k_proj." in name):
      heads = SHAPE["num_attention_heads" if ".q_proj." in name else "num_key_value_heads"]
      stored = permute(value, heads)
    kind = gguf.GGMLQuantizationType[qtype if value.ndim == 2 else "F32"]
    if raw and gguf_name(name) in raw:
      kind = gguf.GGMLQuantizationType[raw[gguf_name(name)]]
      data = np.zeros(gguf.quants.quant_shape_to_byte_shape(value.shape, kind), np.uint8)
      writer.add_tensor(gguf_name(name), data, raw_dtype=kind)
      continue
    if kind in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
      data = stored.astype(np.float32 if kind == gguf.GGMLQuantizationType.F32 else np.float16)
      writer.add_tensor(gguf_name(name), data)
      back = data.astype(np.float32)
    else:
      try:
        data = gguf.quants.quantize(stored, kind)
      except NotImplementedError:  # gguf-py reads the K-quants but cannot write them: any
        # bytes are valid blocks; their f16 scales are kept small and finite
        data = rng.integers(0, 256, gguf.quants.quant_shape_to_byte_shape(stored.shape, kind),
                            dtype=np.uint8)
        data[..., 1::2] &= 0x3b
      writer.add_tensor(gguf_name(name), data, raw_dtype=kind)
      back = gguf.quants.dequantize(data, kind).reshape(stored.shape)
    if arch == "llama" and (".q_proj." in name or ".k_proj." in name):
      back = einops.rearrange(back, "(h d two) ... -> (h two d) ...", h=heads, two=2)
    expected[name] = back
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return expected
