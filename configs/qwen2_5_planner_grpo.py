"""Planner GRPO on a Qwen2.5-7B-sized language model (7.6B), full fine-tuning with bf16
compute and float32 weights, on a TPU v5p-128 pod slice (64 chips: data 4 x fsdp 16).

    python -m jaxedit.model_report --config configs/qwen2_5_planner_grpo.py  # sizes, no allocation
    jaxedit train --config configs/qwen2_5_planner_grpo.py --workdir RL \
        --config.init_from=/path/to/Qwen2.5-7B-Instruct   # streams into the shardings

The LM is Qwen2.5-7B's (28 layers, 28 query and 4 key/value heads of 128, q/k/v biases,
untied head, RoPE theta 1e6); jaxedit's vision prefix (16x16 patches of a 512x512 image, 1024
tokens) is trained from scratch in front of it. Real-image data is not wired yet: this config
is checked with eval_shape (tests/test_model_report.py).
"""

from jaxedit import schema


def get_config(arg=None):
  if arg is not None:
    raise ValueError(f"unknown config arg {arg!r}")
  config = schema.planner_grpo()
  config.world.image_size = 512
  config.tokenizer.vocab_size = 151_665  # Qwen2.5's tokenizer, added tokens included
  m = config.model
  m.vocab_size, m.hidden_size, m.intermediate_size, m.num_layers = 152_064, 3584, 18_944, 28
  m.num_heads, m.num_kv_heads, m.head_dim = 28, 4, 128
  m.rope_theta, m.rms_norm_eps, m.qkv_bias, m.tie_embeddings = 1e6, 1e-6, True, False
  m.vision.patch_size, m.vision.width = 16, 1024
  m.dtype, m.param_dtype = "bfloat16", "float32"
  m.scan_layers, m.remat_policy = True, "full"
  config.prompt.max_prompt_len, config.prompt.max_plan_len = 256, 256
  config.mesh.shape = (4, 16, 1)
  r = config.rollout
  r.prompts_per_step, r.group_size, r.minibatches = 64, 8, 4
  config.train.lr = 1e-6
  config.eval.batch_size = 64
  return config.lock()
