"""Online policy distillation of editor runs on your own edit records into one student, on a
FLUX.1-Kontext pipeline: each teacher (an SFT, RFT or GRPO workdir on records of the same
pipeline) gives its velocities along the student's own rollouts.

    jaxedit train --config configs/flux_kontext_opd.py --workdir STUDENT \
        --config.init_from=SFT --config.data.records=RECORDS \
        --config.opd.teachers.first=TEACHER_A --config.opd.teachers.second=TEACHER_B

Prompts go to the teachers in turn (opd.routing = 'round_robin'). To route by the records'
task types (GEdit-Bench style rows), write a config whose opd.teachers are named by task
type ({"color_alter": DIR, ...}) with opd.routing = 'task'. No reward enters the loss; the
judge's scores of the student's rollouts are logged (set rewards.judge.base_url). Arg `tiny`:
two iterations on one CPU, for a tiny pipeline folder.
"""

import ml_collections

from jaxedit import schema


def get_config(arg=None):
  config = schema.on_edit_records(schema.editor_opd())
  r, t = config.rollout, config.train
  config.opd.teachers = ml_collections.ConfigDict({"first": "", "second": ""})
  config.opd.routing = "round_robin"
  config.rewards.judge.weight = 1.0
  config.model.lora_rank, config.model.lora_alpha = 32, 64.0
  if arg == "tiny":
    r.prompts_per_step, r.group_size, r.rollout_chunks, r.minibatches = 4, 2, 1, 1
    r.num_steps = 4
    t.num_steps, t.log_every, t.eval_every, t.checkpoint_every, t.sample_every = 2, 1, 2, 2, 2
    schema.smoke_test(config)
    config.model.lora_rank, config.model.lora_alpha = 4, 4.0
    return config.lock()
  if arg:
    raise ValueError(f"unknown config arg {arg!r}; use 'tiny' or nothing")
  schema.flux_kontext_dev(config)
  config.mesh.shape, config.mesh.dcn_shape = (1, 64, 1), (2, 1, 1)
  r.prompts_per_step, r.group_size = 128, 4  # 512 student rollouts per iteration
  r.rollout_chunks, r.minibatches, r.num_steps = 4, 4, 10
  t.lr = 1e-4
  config.eval.batch_size = 128
  return config.lock()
