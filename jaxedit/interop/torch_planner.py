"""An exported planner run with transformers: `AutoModelForCausalLM` and `AutoTokenizer` from
the folder, and jaxedit's vision prefix rebuilt in torch from `vision_prefix.safetensors`, fed
in front of the prompt as `inputs_embeds` (models.planner: patches -> linear -> + positions
-> linear -> GELU -> linear).

    planner = torch_planner.load("OUT")
    plans = torch_planner.generate(planner, images_uint8, ["make every red shape blue"])
"""

from __future__ import annotations

import dataclasses
import json
import os

import einops
import numpy as np
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file


@dataclasses.dataclass
class ExportedPlanner:
  model: transformers.PreTrainedModel
  tokenizer: transformers.PreTrainedTokenizerBase
  vision: dict[str, torch.Tensor] | None  # flax names, (in, out) kernels
  meta: dict  # jaxedit_planner.json


def load(folder: str, dtype: torch.dtype = torch.float32) -> ExportedPlanner:
  with open(os.path.join(folder, "jaxedit_planner.json")) as f:
    meta = json.load(f)
  model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
  tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
  vision = None
  if meta["vision"] is not None:
    vision = {k: v.to(dtype) for k, v in
              load_file(os.path.join(folder, "vision_prefix.safetensors")).items()}
  return ExportedPlanner(model, tokenizer, vision, meta)


def vision_prefix(planner: ExportedPlanner, images: np.ndarray) -> torch.Tensor:
  """(N, num_tokens, hidden) prefix embeddings of uint8 (N, H, W, 3) images."""
  v, p = planner.vision, planner.meta["vision"]["patch_size"]
  x = torch.tensor(np.asarray(images, np.float32) / 127.5 - 1.0, dtype=v["position_embedding"].dtype)
  x = einops.rearrange(x, "b (h ph) (w pw) c -> b (h w) (c ph pw)", ph=p, pw=p)
  dense = lambda name, y: y @ v[f"{name}.kernel"] + v[f"{name}.bias"]
  x = dense("patch_embed", x) + v["position_embedding"]
  return dense("projector_2", F.gelu(dense("projector_1", x)))


def prompt_text(planner: ExportedPlanner, instruction: str, scene: str | None = None) -> str:
  text = planner.meta["prompt_template"].replace("{instruction}", instruction)
  return text.replace("{scene}", scene) if planner.meta["scene_as_text"] else text


@torch.no_grad()
def generate(planner: ExportedPlanner, images: np.ndarray, instructions: list[str],
             scenes: list[str] | None = None, max_new_tokens: int | None = None) -> list[str]:
  """Greedy plans (JSON texts), one prompt at a time (no padding to reason about)."""
  tok, model = planner.tokenizer, planner.model
  out = []
  for k, instruction in enumerate(instructions):
    ids = tok(prompt_text(planner, instruction, scenes[k] if scenes else None),
              add_special_tokens=False)["input_ids"]
    embeds = model.get_input_embeddings()(torch.tensor([ids]))
    if planner.vision is not None:
      embeds = torch.cat([vision_prefix(planner, images[k:k + 1]), embeds], 1)
    tokens = model.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2],
                                                                            dtype=torch.long),
                            max_new_tokens=max_new_tokens or planner.meta["max_plan_len"],
                            do_sample=False, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id)
    out.append(tok.decode(tokens[0], skip_special_tokens=True))
  return out
