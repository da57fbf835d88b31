"""Flow-GRPO with LoRA on a FLUX.1-Kontext pipeline (11.9B transformer), on your own edit
records, rewarded by a VLM judge behind an OpenAI-compatible server (vLLM, SGLang).

    jaxedit data  --config configs/edit_data.py --workdir RECORDS \
        --config.data.train=train_metadata.jsonl --config.encode.pipeline=PIPELINE
    jaxedit train --config configs/flux_kontext_grpo.py --workdir RL \
        --config.init_from=PIPELINE --config.data.records=RECORDS \
        --config.rewards.judge.base_url=http://judge:8000/v1
    # or --config.init_from=SFT (an editor SFT workdir on the same pipeline)

The architecture is FLUX.1-Kontext-dev's, checked against init_from on loading; `:tiny`
reads it from init_from (the pipeline's config.json files, or the SFT run's). Prompts are the records' cached T5 / CLIP embeddings and source latents. On two TPU v5p-128
slices: data 2 across slices over DCN x fsdp 64 within each, bf16 compute, fp32 adapters.
Arg `tiny`: two iterations on one CPU for a tiny pipeline folder (tests/tiny_flux.py).
"""

from jaxedit import schema


def get_config(arg=None):
  config = schema.on_edit_records(schema.editor_grpo())
  m, r, t = config.model, config.rollout, config.train
  config.rewards.judge.weight = 1.0
  if arg == "tiny":
    r.prompts_per_step, r.group_size, r.rollout_chunks, r.minibatches = 2, 4, 1, 1
    r.num_steps = 4
    t.num_steps, t.log_every, t.eval_every, t.checkpoint_every, t.sample_every = 2, 1, 2, 2, 2
    schema.smoke_test(config)
    m.lora_rank, m.lora_alpha = 4, 4.0
    return config.lock()
  if arg:
    raise ValueError(f"unknown config arg {arg!r}; use 'tiny' or nothing")
  schema.flux_kontext_dev(config)  # bf16 compute, fp32 weights and adapters
  m.lora_rank, m.lora_alpha = 32, 64.0
  # Two v5p-128 slices (64 chips each): FSDP within a slice over ICI, data parallelism
  # across the slices over DCN, so only the gradient all-reduce leaves a slice.
  config.mesh.shape, config.mesh.dcn_shape = (1, 64, 1), (2, 1, 1)
  r.prompts_per_step, r.group_size = 32, 16  # 512 rollouts per iteration, 4 per chip
  r.rollout_chunks, r.minibatches = 4, 4
  r.num_steps, r.noise_level = 10, 0.7
  config.grpo.kl_beta = 0.04
  t.lr = 1e-4
  config.eval.batch_size = 128
  return config.lock()
