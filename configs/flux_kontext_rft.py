"""Editor SFT without target images: rejection-sampling fine-tuning (best of N, judged) of a
FLUX.1-Kontext pipeline on your own edit records, e.g. Edit-R1 rows (instruction + source).

    jaxedit data  --config configs/edit_data.py --workdir RECORDS \
        --config.data.train=train_metadata.jsonl --config.encode.pipeline=PIPELINE
    jaxedit train --config configs/flux_kontext_rft.py --workdir SFT \
        --config.init_from=PIPELINE --config.data.records=RECORDS \
        --config.rewards.judge.base_url=http://judge:8000/v1

Each prompt's G edits are judged and the best one (reward >= rft.min_reward) is trained on
with the flow-matching loss, full fine-tuning. The run starts GRPO like an SFT run
(configs/flux_kontext_grpo.py, --config.init_from=SFT). The architecture is
FLUX.1-Kontext-dev's, as configs/flux_kontext_grpo.py writes it; `:tiny` reads it from the
pipeline folder. Arg `tiny`: a few iterations on one CPU, for a tiny pipeline folder.
"""

from jaxedit import schema


def get_config(arg=None):
  config = schema.on_edit_records(schema.editor_rft())
  r, t = config.rollout, config.train
  config.rewards.judge.weight = 1.0
  if arg == "tiny":
    r.prompts_per_step, r.group_size, r.rollout_chunks, r.minibatches = 2, 4, 1, 1
    r.num_steps, config.rft.min_reward = 4, 0.0
    t.num_steps, t.lr, t.log_every, t.eval_every = 3, 1e-3, 1, 3
    t.checkpoint_every, t.sample_every = 3, 3
    schema.smoke_test(config)
    return config.lock()
  if arg:
    raise ValueError(f"unknown config arg {arg!r}; use 'tiny' or nothing")
  schema.flux_kontext_dev(config)
  config.mesh.shape = (1, -1, 1)  # FSDP over every chip of the slice
  r.prompts_per_step, r.group_size = 64, 8  # 512 judged samples, 64 targets per iteration
  r.rollout_chunks, r.minibatches, r.num_steps = 4, 1, 28
  config.rft.min_reward = 0.6  # a judge score of 6 / 10
  t.num_steps, t.lr, t.warmup_steps, t.ema_decay = 500, 1e-5, 20, 0.99
  t.eval_every = t.checkpoint_every = t.sample_every = 50
  config.eval.batch_size = 64
  return config.lock()
