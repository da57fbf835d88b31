"""Flow-GRPO with LoRA on a FLUX.1-Kontext-dev-sized editor (11.9B transformer), bf16 compute,
on two TPU v5p-128 slices (128 chips: data 2 across slices over DCN x fsdp 64 within each).

    python -m jaxedit.model_report --config configs/flux_kontext_grpo.py   # sizes, no allocation
    jaxedit train --config configs/flux_kontext_grpo.py --workdir RL \
        --config.init_from=/path/to/FLUX.1-Kontext-dev   # its transformer/ streams in

The transformer is Flux-dev's (19 double and 38 single blocks, 24 heads of 128, the guidance
embedder), fed 16-channel VAE latents of 512x512 images packed 2x2 and precomputed T5
(4096-wide, 512 tokens) and CLIP pooled (768) embeddings. The trainers run the VAE (read from
init_from's vae/), but real-image data with precomputed embeddings is not wired yet: jaxedit
trains the shapes world today, and this config is checked with eval_shape
(tests/test_model_report.py).
"""

from jaxedit import schema


def get_config(arg=None):
  if arg is not None:
    raise ValueError(f"unknown config arg {arg!r}")
  config = schema.editor_grpo()
  config.world.image_size = 512
  m = config.model
  m.patch_size, m.num_heads, m.head_dim, m.axes_dims_rope = 2, 24, 128, (16, 56, 56)
  m.num_layers, m.num_single_layers, m.guidance_embeds = 19, 38, True
  m.qk_norm_init = 1.0
  m.text_encoder, m.context_dim, m.pooled_dim, m.text_max_len = "precomputed", 4096, 768, 512
  m.vae.enabled = True  # FLUX.1 VAE defaults: 16 latent channels, 8x downsampling
  m.lora_rank, m.lora_alpha = 32, 64.0
  m.dtype, m.param_dtype = "bfloat16", "float32"  # bf16 compute, fp32 weights and adapters
  m.scan_layers, m.remat_policy = True, "full"
  # Two v5p-128 slices (64 chips each): FSDP within a slice over ICI, data parallelism
  # across the slices over DCN, so only the gradient all-reduce leaves a slice.
  config.mesh.shape, config.mesh.dcn_shape = (1, 64, 1), (2, 1, 1)
  r = config.rollout
  r.prompts_per_step, r.group_size = 32, 16  # 512 rollouts per iteration, 4 per chip
  r.rollout_chunks, r.minibatches = 4, 4
  r.num_steps, r.noise_level = 10, 0.7
  config.grpo.kl_beta = 0.04
  config.sample.num_steps, config.sample.shift = 28, 3.0
  config.train.lr = 1e-4
  config.eval.batch_size = 128
  return config.lock()
