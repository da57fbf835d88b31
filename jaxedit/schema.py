"""Config schemas: the sections trainer configs are made of, and each trainer's reference
config composed from them by adding sections (docs/design.md section 10).

Imports no JAX: files in configs/ build on these, so loading one (a sweep enumerating its
points, `jaxedit --help`, a launcher on a login host) starts no backend.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from jaxedit.shapes.edits import TASKS
from jaxedit.shapes.world import World

ConfigDict = ml_collections.ConfigDict

DEFAULT_DATA_DIR = "~/.cache/jaxedit/datasets"  # builds are keyed by a digest of their parameters
# Flow-GRPO's Flux LoRA targets (diffusers names): attention projections and the double
# blocks' MLPs.
EDITOR_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out_0", "add_q_proj", "add_k_proj",
                       "add_v_proj", "to_add_out", "net_0_proj", "net_2")
# The planner LM's keys a pretrained model fixes (the rest of `model` are training choices).
LM_ARCHITECTURE = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                   "num_kv_heads", "head_dim", "rope_theta", "rms_norm_eps", "qkv_bias",
                   "tie_embeddings")
PLANNER_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                        "down_proj")
# Decode in segments of this many tokens, each attending to the cache slots filled so far
# (sampling.SamplingConfig); 0: one segment over the whole cache.
ATTEND_CHUNK = 32


# ------------------------------------------------------------------------------------------
# Sections.
# ------------------------------------------------------------------------------------------
def world() -> ConfigDict:
  """The shapes world's geometry (shapes.world.World)."""
  return ConfigDict(dataclasses.asdict(World()))


def data() -> ConfigDict:
  """Where the dataset lives and how big each split is (atomic and abstract examples)."""
  return ConfigDict({
      "data_dir": DEFAULT_DATA_DIR,
      "seed": 0,
      "splits": {
          "train": {"atomic": 20_000, "abstract": 16_000},
          "validation": {"atomic": 500, "abstract": 550},
          "test": {"atomic": 2_000, "abstract": 2_200},
      },
      # Editors on a lab's own data instead of the shapes world: a records folder from
      # `jaxedit data --config configs/edit_data.py` (jaxedit.flux_editing), and the diffusers
      # pipeline folder whose VAE decodes samples and whose encoders run where the records
      # cache nothing (default: init_from when it is a pipeline folder).
      "records": "",
      "pipeline": "",
  })


def tokenizer() -> ConfigDict:
  return ConfigDict({"vocab_size": 512, "corpus_examples": 4000})


def mesh() -> ConfigDict:
  """The device mesh and the logical axis rules (jaxedit.sharding)."""
  return ConfigDict({
      "axes": ("data", "fsdp", "tensor"),
      "shape": (-1, 1, 1),  # within a slice (ICI); -1: all remaining devices
      # Across slices (DCN), as MaxText's dcn_*_parallelism: axis sizes multiply with `shape`.
      # Put data parallelism here: only its gradient all-reduce crosses the slow network.
      "dcn_shape": (1, 1, 1),
      "dcn_granule": "slice",  # what DCN connects: TPU 'slice's, or 'process'es (CPU tests)
      "rules": (
          ("batch", ("data", "fsdp")),
          ("activation_batch", ("data", "fsdp")),
          ("embed", "fsdp"),
          ("mlp", "tensor"),
          ("heads", "tensor"),
          ("mod", "tensor"),
          ("vocab", "tensor"),
      ),
  })


def distributed() -> ConfigDict:
  """How processes find each other (jaxedit.distributed)."""
  return ConfigDict({
      "initialize": "auto",  # auto: when the config or the environment names a cluster
      "coordinator_address": "",  # host:port of process 0
      "num_processes": 0,
      "process_id": -1,  # usually from JAXEDIT_PROCESS_ID: the config is shared
      "timeout_s": 300,
  })


def overlap_keys() -> dict:
  """The keys of the `rollout` section that place rollouts on devices of their own
  (jaxedit.overlap)."""
  return {
      "rollout_devices": 0,  # per process; 0: rollout and update share every device
      "rollout_mesh_shape": (-1, 1, 1),  # over mesh.axes, on the rollout devices
  }


def rewards() -> ConfigDict:
  """The editor's rewards (jaxedit.rewards): every registered reward with its options; a
  weight of 0 turns a reward off."""
  return ConfigDict({
      "checklist": {"weight": 1.0, "strict": False},
      "preservation": {"weight": 0.0},
      "remote": {"weight": 0.0, "url": "", "timeout": 30.0, "retries": 3, "backoff": 0.5,
                 "batch_size": 32},
      # A VLM judge behind an OpenAI-compatible chat-completions server (jaxedit.judges):
      # base_url with /v1, as `vllm serve` gives; model "" asks the server's /models.
      "judge": {"weight": 0.0, "base_url": "http://localhost:8000/v1", "model": "",
                "api_key": "", "api_key_env": "OPENAI_API_KEY", "rubric": "",
                # text: the reply's last "Score: N" | logprobs: E[digit] of a one-token reply |
                # auto: "Score: N", else the first token's log-probs
                "score": "auto",
                "max_tokens": 0, "temperature": 0.0, "max_concurrency": 8, "timeout": 60.0,
                "retries": 3, "backoff": 1.0,
                "on_failure": "error"},  # error | mask (left out of the loss, counted)
  })


def editor_model() -> ConfigDict:
  """The editor (models.editor): a Flux transformer, its text encoder and optional VAE."""
  return ConfigDict({
      "patch_size": 4,
      "num_heads": 4,
      "head_dim": 32,
      "axes_dims_rope": (8, 12, 12),
      "num_layers": 2,
      "num_single_layers": 4,
      "mlp_ratio": 4.0,
      "qk_norm_init": 1.0,
      # LoRA (rank 0: none). Targets are Dense names in the diffusers layout.
      "lora_rank": 0,
      "lora_alpha": 0.0,  # 0: equal to the rank (scale 1)
      "lora_targets": EDITOR_LORA_TARGETS,
      "guidance_embeds": False,
      "dtype": "float32",
      "param_dtype": "float32",
      # Scanned layers keep compile time flat in depth (configs of real models set True);
      # unrolled, the shapes models' 2 + 4 layers train faster on CPU (README, Performance).
      "scan_layers": False,
      "remat_policy": "none",
      # auto: a fused (flash) kernel where the backend has one, splash on TPU, cuDNN on GPU
      # in bf16/fp16, else XLA's | xla | cudnn | splash (off TPU: Pallas' interpreter, tests)
      "attention": "auto",
      "splash_block": 512,  # splash attention's largest block of the (padded) sequence
      "text_encoder": "shapes",  # shapes | precomputed
      "text_width": 128,
      "text_layers": 2,
      "text_heads": 4,
      "text_max_len": 32,
      # n > 0: ground the instruction on an n x n grid over the source image (CellGrounding);
      # trained by the SFT loss's grounding term (flow.grounding_weight). Shapes encoder only.
      "text_layout_grid": 0,
      "context_dim": 0,  # precomputed embeddings only: their width
      "pooled_dim": 0,  # precomputed embeddings only: the pooled embedding's width (0: same)
      # The pixel-latent path for real images: the transformer works on the latents of a
      # diffusers-layout AutoencoderKL (models.vae; defaults: the FLUX.1 VAE), frozen, with
      # weights from the diffusers folder `init_from` ("": the `vae/` of the run's init_from)
      # and its latents' shift and scale from that folder's config.json (jaxedit.codec).
      # config: the shape keys above | init_from: read from the pipeline folder's
      # transformer/ and vae/ config.json (edit records runs; jaxedit.flux_editing)
      "architecture": "config",
      # The guidance value a guidance-embedded (dev-type) model gets in training and sampling
      # (FLUX.1-Kontext-dev: 2.5); not classifier-free guidance.
      "guidance": 2.5,
      "vae": {"enabled": False, "init_from": "", "latent_channels": 16,
              "block_out_channels": (128, 256, 512, 512), "layers_per_block": 2,
              "norm_num_groups": 32,
              # FLUX.1's; diffusers' AutoencoderKL defaults (SD VAEs) have quant convs
              "use_quant_conv": False, "use_post_quant_conv": False,
              "mid_block_add_attention": True},
  })


def planner_model() -> ConfigDict:
  """The planner (models.planner): a tiny Qwen2 for the shapes world with a vision prefix.
  Its architecture keys (LM_ARCHITECTURE) may be None: taken from
  `init_from` (`pretrained_planner`)."""
  return ConfigDict({
      "vocab_size": 512,  # the tokenizer is trained to this size
      "hidden_size": 128,
      "intermediate_size": 384,
      "num_layers": 4,
      "num_heads": 4,
      "num_kv_heads": 2,
      "head_dim": 32,
      "rope_theta": 10_000.0,
      "rms_norm_eps": 1e-6,
      "qkv_bias": True,
      "tie_embeddings": True,
      "lora_rank": 0,
      "lora_alpha": 1.0,
      "lora_targets": PLANNER_LORA_TARGETS,
      "dtype": "float32",
      "param_dtype": "float32",
      # Unrolled, decoding keeps one KV cache per layer and reads it in place, faster on CPU
      # than the scanned stack (README, Performance). Real models' configs set True.
      "scan_layers": False,
      "remat_policy": "none",
      # auto: splash attention on TPU for the training forward, XLA's elsewhere | xla | splash
      "attention": "auto",
      "splash_block": 512,
      # cell_head: predict each cell's shape and colour from its prefix token (needs one
      # patch per grid cell); planner SFT weights its loss with train.cell_loss_weight. Off
      # by default: README, "Planner SFT".
      "vision": {"enabled": True, "patch_size": 8, "width": 128, "cell_head": False},
  })


def vae_model() -> ConfigDict:
  """The AutoencoderKL (models.vae.VAEConfig fields); an editor's model.vae must match."""
  return ConfigDict({
      "latent_channels": 4, "block_out_channels": (16, 32), "layers_per_block": 1,
      "norm_num_groups": 8, "dtype": "float32", "param_dtype": "float32"})


def optimizer(lr: float, warmup_steps: int, weight_decay: float, b1: float, b2: float,
              ema_decay: float) -> dict:
  """The `train` keys of the AdamW + EMA step (train.optimizer)."""
  return {"lr": lr, "warmup_steps": warmup_steps, "weight_decay": weight_decay, "b1": b1,
          "b2": b2, "grad_clip": 1.0, "ema_decay": ema_decay}


def schedule(log_every: int, eval_every: int, checkpoint_every: int) -> dict:
  """The `train` keys of the loop's periodic hooks (train.loop)."""
  return {"log_every": log_every,
          "eval_every": eval_every,  # and at the end; 0: only at the end; -1: never
          "checkpoint_every": checkpoint_every, "keep_checkpoints": 2,
          "async_checkpoints": True, "worker_count": 0}


def editor_rollout(prompts_per_step: int, group_size: int) -> ConfigDict:
  """The `rollout` section of the editor's RL trainers (GRPO, OPD): prompts, SDE sampling,
  and the minibatch updates over each iteration's samples (rl.update)."""
  return ConfigDict({
      "prompts_per_step": prompts_per_step,  # P, global
      "group_size": group_size,  # G samples per prompt
      "shared_noise": False,  # one initial noise per group (DanceGRPO) or one per sample
      "rollout_chunks": 2,  # rollouts per iteration; rewards of one overlap the next
      **overlap_keys(),
      "num_steps": 8,  # denoising steps of training rollouts (eval uses sample.num_steps)
      "guidance_scale": 1.0,
      "sde_type": "sde",  # sde | cps
      "noise_level": 0.7,  # 0: ODE rollouts (OPD: pure mean matching)
      "timestep_fraction": 0.99,  # train the first int(T * fraction) steps
      "window_size": 0,  # > 0: Flow-GRPO-Fast, SDE only inside a window of this many steps
      "window_start": -1,  # -1: a random start every iteration
      "inner_epochs": 1,
      "minibatches": 2,  # optimizer updates per epoch
      "accumulate": 1,  # minibatches whose gradients are summed into one update
  })


def planner_rollout(prompts_per_step: int, group_size: int) -> ConfigDict:
  """The `rollout` section of the planner's RL trainers (GRPO, OPD)."""
  return ConfigDict({
      "prompts_per_step": prompts_per_step,  # P
      "group_size": group_size,  # G plans per prompt
      "temperature": 1.0,  # of rollouts; the trained log-probs use the same
      "inner_epochs": 1,
      "minibatches": 2,
      **overlap_keys(),
  })


def teachers(tasks) -> dict:
  """The keys of an OPD section that pick each prompt's teacher."""
  return {"teachers": {task: "" for task in tasks},  # task tag -> teacher workdir; "": none
          "routing": "task"}  # task: the prompt's task tag picks its teacher | round_robin


# ------------------------------------------------------------------------------------------
# Reference configs, one per trainer.
# ------------------------------------------------------------------------------------------
def _editor(trainer: str, train: dict) -> ConfigDict:
  c = ConfigDict()
  c.trainer = trainer
  c.world = world()
  c.data = data()
  c.tokenizer = tokenizer()
  c.model = editor_model()
  # shift: of the sampler's times (flow.shift_time); 0 on edit records: the pipeline
  # scheduler's for each bucket (FLUX: dynamic, by token count)
  c.sample = ConfigDict({"num_steps": 16, "shift": 1.0, "guidance_scale": 1.0})
  c.train = ConfigDict(train)
  c.eval = ConfigDict({
      "split": "test", "example_kinds": ("atomic",), "num_examples": 0,  # 0: the whole split
      "batch_size": 128, "use_ema": True, "seed": 1})
  c.mesh = mesh()
  c.distributed = distributed()
  return c


def editor_sft() -> ConfigDict:
  c = _editor("editor_sft", {
      "seed": 0,
      "batch_size": 64,  # global
      "num_steps": 1000,
      "example_kinds": ("atomic",),
      **optimizer(lr=1e-3, warmup_steps=100, weight_decay=0.0, b1=0.9, b2=0.99,
                  ema_decay=0.999),
      "end_lr_fraction": 0.05,
      "text_dropout": 0.0,  # > 0 trains the unconditional branch for guidance
      "sample_every": 500,  # as eval_every
      "sample_examples": 16,
      "eval_examples": 256,  # validation examples scored during training
      **schedule(log_every=20, eval_every=500, checkpoint_every=500),
  })
  c.init_from = ""  # optional: a diffusers Flux transformer folder (or a jaxedit export)
  # JSON list of settings of traced hyperparameters (train.lr) trained at once: population.py
  c.population = ""
  c.flow = flow_matching()
  c.flow.changed_weight = 1.0  # loss weight of the patches the edit changes (1: plain mean)
  # weight of the grounding loss (flow.grounding_loss) when model.text_layout_grid > 0
  c.flow.grounding_weight = 1.0
  return c


def flow_matching() -> ConfigDict:
  """The flow-matching loss's timestep sampling (flow.sample_time)."""
  return ConfigDict({"timesteps": "logit_normal", "logit_mean": 0.0, "logit_std": 1.0,
                     "shift": 1.0})


def _editor_rl(trainer: str) -> ConfigDict:
  c = _editor(trainer, {
      "seed": 0,
      "num_steps": 100,  # iterations (rollout + update)
      "example_kinds": ("atomic",),
      "tasks": (),  # task tags of the training prompts (e.g. ("colour",)); () for all
      **optimizer(lr=3e-4, warmup_steps=0, weight_decay=1e-4, b1=0.9, b2=0.99,
                  ema_decay=0.9),  # EMA per optimizer update
      "sample_every": 25,
      "sample_examples": 16,
      "eval_examples": 256,
      **schedule(log_every=1, eval_every=25, checkpoint_every=25),
  })
  c.init_from = ""  # the editor SFT workdir to start from (its latest checkpoint)
  c.init_params = "ema"  # ema | params: which of its parameters
  c.rewards = rewards()
  return c


def editor_grpo() -> ConfigDict:
  c = _editor_rl("editor_grpo")
  c.rollout = editor_rollout(prompts_per_step=8, group_size=8)
  c.grpo = ConfigDict({
      "std_scope": "global",  # advantages divide by the batch's std or the group's
      "adv_clip": 5.0,
      "clip_range": 1e-4,
      "kl_beta": 0.04,
  })
  c.rewards.preservation.weight = 0.5
  return c


def editor_opd() -> ConfigDict:
  c = _editor_rl("editor_opd")  # rewards are logged, not trained on
  c.rollout = editor_rollout(prompts_per_step=16, group_size=1)  # G student samples
  c.opd = ConfigDict(teachers(t for t in TASKS if t != "mixed"))  # one task per teacher
  c.rewards.preservation.weight = 0.5
  return c


def editor_rft() -> ConfigDict:
  """Rejection-sampling fine-tuning (trainers/editor_rft): SFT on the best-scored of each
  prompt's G samples, for data without target images."""
  c = _editor_rl("editor_rft")
  c.rollout = editor_rollout(prompts_per_step=8, group_size=4)
  c.rollout.noise_level = 0.0  # ODE samples from different noise; > 0: SDE samples
  c.rollout.minibatches = 1  # updates per epoch over the P chosen targets
  c.rft = ConfigDict({"min_reward": 0.0})  # a prompt's best edit trains only from this reward
  c.flow = flow_matching()
  c.rewards.preservation.weight = 0.5
  return c


def _planner(trainer: str, train: dict) -> ConfigDict:
  c = ConfigDict()
  c.trainer = trainer
  c.init_from = ""
  c.world = world()
  c.data = data()
  c.tokenizer = tokenizer()
  c.model = planner_model()
  c.prompt = ConfigDict({
      "scene_as_text": False,  # also write the scene description into the prompt
      "max_prompt_len": 48,  # tokens, BOS included (scene_as_text needs ~112); longer: an error
      # With a chat template (a pretrained tokenizer's): a system turn before the request;
      # "": none (the template may add its own default).
      "system": "",
      "max_plan_len": 128,  # tokens, EOS included
      # Training batches are padded only to their longest prompt and plan, rounded up to this
      # multiple (a few compiled shapes, much less padding than the maximum lengths).
      # 0: always pad to the maximum lengths.
      "pad_multiple": 16,
  })
  c.sample = ConfigDict({"temperature": 0.0, "top_k": 0, "top_p": 1.0,
                         "attend_chunk": ATTEND_CHUNK})
  c.train = ConfigDict({
      "seed": 0,
      # Cross-entropy of the vision prefix's cell head (model.vision.cell_head) against the
      # source scene's shapes and colours, added to the plan loss with this weight.
      "cell_loss_weight": 0.0,
      # The vision prefix's and the cell head's learning rate, relative to `lr`: a fresh
      # prefix in front of a pretrained LM wants a larger one.
      "vision_lr_factor": 1.0,
      # SFT: this fraction of each batch asks for the scene description instead of a plan
      # (planner_sft.with_captions), so the LM learns to name what the prefix shows.
      "caption_fraction": 0.0,
      "eval_examples": 256,  # validation examples decoded during training
      "sample_examples": 8,  # plans written to DIR/samples and TensorBoard
      **train,
  })
  # An editor workdir (SFT or GRPO) that runs the plans: e2e_success in eval, `jaxedit edit`,
  # and the planner GRPO visual reward.
  c.editor = ""
  c.eval = ConfigDict({
      "split": "test", "num_examples": 0,  # 0: every abstract example of the split
      "batch_size": 64, "use_ema": True, "seed": 1,
      "e2e_max_steps": 8,  # longer plans count as failures
      # An editor workdir trained on the same data with (source, abstract instruction, final
      # target) pairs, asked to do the abstract edit in one step.
      "baseline_editor": "",
      # Also run the reference plans with `editor`: the ceiling that editor sets.
      "e2e_reference_plans": False})
  c.mesh = mesh()
  c.distributed = distributed()
  return c


def planner_sft() -> ConfigDict:
  c = _planner("planner_sft", {
      "batch_size": 32,  # global
      "num_steps": 2000,
      "example_kinds": ("abstract", "atomic"),
      **optimizer(lr=1e-3, warmup_steps=100, weight_decay=0.01, b1=0.9, b2=0.95,
                  ema_decay=0.999),
      "end_lr_fraction": 0.05,
      **schedule(log_every=20, eval_every=500, checkpoint_every=500),
  })
  c.init_from = ""  # optional: a transformers Qwen2/Llama folder (or a jaxedit export)
  return c


def pretrained_planner(config: ConfigDict, init_from: str = "") -> ConfigDict:
  """`config` (a planner trainer's) starting from a pretrained LM or a planner workdir
  (`init_from`, or the one the user names): the model's architecture keys unset (None), so
  they are read from there."""
  config.init_from = init_from
  for key in LM_ARCHITECTURE:
    config.model[key] = None
  config.model.scan_layers = True  # 30 layers: one compiled layer
  return config


def _planner_rl(trainer: str) -> ConfigDict:
  c = _planner(trainer, {
      "num_steps": 200,
      "example_kinds": ("abstract",),
      "tasks": (),  # task tags of the training prompts (e.g. ("colour",)); () for all
      **optimizer(lr=1e-4, warmup_steps=10, weight_decay=0.0, b1=0.9, b2=0.95,
                  ema_decay=0.999),
      **schedule(log_every=20, eval_every=50, checkpoint_every=50),
  })
  c.init_from = ""  # a planner SFT workdir (required)
  c.init_params = "ema"  # ema | raw: which of its parameters to start from
  c.rewards = ConfigDict({
      "cognitive": {"weight": 1.0, "step_penalty": 0.1, "error_penalty": 0.25},
      # > 0: every rollout plan runs through the editor of `editor` (P * G edits per plan step)
      "visual": {"weight": 0.0},
  })
  return c


def planner_grpo() -> ConfigDict:
  c = _planner_rl("planner_grpo")
  c.rollout = planner_rollout(prompts_per_step=16, group_size=8)
  c.grpo = ConfigDict({
      "clip_range": 0.2,
      "kl_beta": 0.04,
      "aggregation": "sequence_mean",  # or token_mean
      "std_scope": "group",  # advantage std: group | global
      "adv_clip": 5.0,
  })
  return c


def planner_opd() -> ConfigDict:
  c = _planner_rl("planner_opd")
  c.rollout = planner_rollout(prompts_per_step=32, group_size=1)  # G student plans
  c.opd = ConfigDict({**teachers(TASKS), "kl": "sampled"})  # kl: sampled | full_vocab
  return c


def vae() -> ConfigDict:
  c = ConfigDict()
  c.trainer = "vae"
  c.world = world()
  c.data = data()
  c.model = vae_model()
  c.train = ConfigDict({
      "seed": 0,
      "batch_size": 16,  # global, in (source, target) pairs: 2x as many images
      "num_steps": 800,
      "example_kinds": ("atomic",),
      **optimizer(lr=1e-3, warmup_steps=100, weight_decay=0.0, b1=0.9, b2=0.99,
                  ema_decay=0.999),
      "end_lr_fraction": 0.05,
      "kl_weight": 1e-4,
      "eval_examples": 256,
      "stats_examples": 2048,  # training images the latent shift and scale are measured on
      **schedule(log_every=50, eval_every=400, checkpoint_every=400),
  })
  c.eval = ConfigDict({
      "split": "test", "example_kinds": ("atomic",), "num_examples": 0,  # 0: the whole split
      "batch_size": 128, "use_ema": True})
  c.mesh = mesh()
  c.distributed = distributed()
  return c


def dataset() -> ConfigDict:
  """`jaxedit data`: build the shapes dataset and its report."""
  c = ConfigDict()
  c.world = world()
  c.data = data()
  c.report = ConfigDict({"contact_sheet_examples": 16, "detector_check_scenes": 2000,
                         "seed": 0})
  return c


def edit_dataset() -> ConfigDict:
  """`jaxedit data` on a lab's own edits: JSONL rows -> bucketed ArrayRecord shards
  (jaxedit.data.edit_job)."""
  c = ConfigDict()
  c.data_job = "edits"
  c.data = ConfigDict({
      "train": "",  # a JSONL file, or a folder holding train_metadata.jsonl
      "test": "",  # a JSONL file; default: test_metadata.jsonl beside the training file
      "test_holdout": 0,  # without a test file: this many training rows become the test split
      "format": "auto",  # auto | edit_r1 | dancegrpo | editscore | gedit | fields
      # Row keys by role, overriding the format's (format 'fields': the whole map).
      "fields": {"id": "", "instruction": "", "source_image": "", "target_image": "",
                 "requirement": "", "task_type": ""},
      "on_bad_row": "error",  # error | skip (skipped rows are listed in the summary)
      # (height, width) of the aspect-ratio buckets; each image goes to the nearest ratio,
      # scaled to cover it and centre-cropped. Multiples of size_multiple (VAE 8 x patch 2).
      "buckets": ((512, 512), (448, 576), (576, 448), (384, 672), (672, 384)),
      "size_multiple": 16,
      "records_per_shard": 256,
      "num_threads": 8,  # image decoding and resizing
  })
  # Cached encodings: with a pipeline folder, the records hold VAE latents and text embeddings
  # (jaxedit.data.edit_cache), so training runs no encoder.
  c.encode = ConfigDict({
      "pipeline": "",  # a diffusers FLUX.1(-Kontext) pipeline folder; empty: images only
      "vae": True,  # source (and target) latents from vae/
      "text": True,  # T5 sequence and CLIP pooled embedding from text_encoder(_2)/
      "max_sequence_length": 512,  # T5 tokens (FLUX.1-dev / Kontext: 512; schnell: 256)
      "batch_size": 8,  # per process, rounded up to the batch axes of its devices
      "dtype": "float32",  # storage: float32 | bfloat16
  })
  c.mesh = mesh()  # over each process's own devices (jax.local_devices())
  c.report = ConfigDict({"contact_sheet_examples": 16})
  c.distributed = distributed()
  return c


def on_edit_records(config: ConfigDict) -> ConfigDict:
  """An editor config (SFT, GRPO) set to train on edit records with FLUX conditioning: the
  architecture, VAE and text widths from the pipeline folder (init_from), cached T5 / CLIP
  embeddings, judges instead of the shapes world's rewards."""
  m = config.model
  m.architecture, m.text_encoder, m.vae.enabled = "init_from", "precomputed", True
  m.text_max_len = 512
  config.sample.shift = 0.0  # the pipeline scheduler's shift for each bucket's token count
  config.eval.split = "test"
  if "rewards" in config:  # the shapes world's rewards read its scenes
    config.rewards.checklist.weight = config.rewards.preservation.weight = 0.0
  return config


def smoke_test(config: ConfigDict) -> ConfigDict:
  """`config`'s evaluation and sampling sized for a few-minute CPU run (the `:tiny` args of
  the FLUX.1-Kontext configs): 8 examples, 4 sampling steps."""
  config.train.eval_examples = config.train.sample_examples = 8
  config.eval.batch_size, config.sample.num_steps = 8, 4
  return config


def flux_kontext_dev(config: ConfigDict) -> ConfigDict:
  """`config` (an editor's on edit records) sized as FLUX.1-Kontext-dev: its transformer (19
  double and 38 single blocks, 24 heads of 128, the guidance embedder) on 16-channel latents
  packed 2x2, 512-pixel buckets, bf16 compute over fp32 weights, scanned layers with full
  remat. Written out (model.architecture='config') so that the model report and --dry_run
  size it without the folder; loading checks it against the folder's config.json."""
  m = config.model
  config.world.image_size = 512
  m.architecture = "config"
  m.patch_size, m.num_heads, m.head_dim, m.axes_dims_rope = 2, 24, 128, (16, 56, 56)
  m.num_layers, m.num_single_layers, m.guidance_embeds = 19, 38, True
  m.context_dim, m.pooled_dim = 4096, 768
  m.dtype, m.param_dtype = "bfloat16", "float32"
  m.scan_layers, m.remat_policy = True, "full"
  config.sample.num_steps = 28
  return config


REFERENCE_CONFIGS = {
    "editor_sft": editor_sft, "editor_grpo": editor_grpo, "editor_opd": editor_opd,
    "editor_rft": editor_rft,
    "planner_sft": planner_sft, "planner_grpo": planner_grpo, "planner_opd": planner_opd,
    "vae": vae,
}


def reference_config(trainer: str) -> ConfigDict:
  """The reference config of `trainer` (a registry name)."""
  return REFERENCE_CONFIGS[trainer]()


# ------------------------------------------------------------------------------------------
# Configs saved by older runs.
# ------------------------------------------------------------------------------------------
def migrate(saved: dict) -> dict:
  """A config saved by an older run (a workdir's), upgraded to today's schema: the rollout
  keys move from the `grpo` or `opd` section into `rollout`, and keys added since take their
  reference values, which are what those runs did. Keys the schema no longer has are kept
  (a saved run is read, not validated)."""
  saved = _plain(saved)
  trainer = saved.get("trainer")
  if trainer not in REFERENCE_CONFIGS:
    return saved
  reference = reference_config(trainer).to_dict()
  if "rollout" in reference and "rollout" not in saved:
    algorithm = next(s for s in ("grpo", "opd") if s in reference)
    old = saved.get(algorithm, {})
    saved["rollout"] = {k: old.pop(k) for k in list(old) if k in reference["rollout"]}
  mesh = saved.get("mesh")
  if mesh and "dcn_shape" not in mesh:  # one slice, over however many axes the run had
    mesh["dcn_shape"] = (1,) * len(mesh.get("axes", reference["mesh"]["axes"]))
  return _with_defaults(saved, reference)


def _plain(value):
  if isinstance(value, dict):
    return {k: _plain(v) for k, v in value.items()}
  return value


def _with_defaults(saved: dict, reference: dict) -> dict:
  for key, value in reference.items():
    if key not in saved:
      saved[key] = value
    elif isinstance(value, dict) and isinstance(saved[key], dict) and key != "teachers":
      _with_defaults(saved[key], value)
  return saved
