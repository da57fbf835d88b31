"""The trainers, listed once: the CLI, `--dry_run`, sweeps (traced hyperparameters),
inference and the model report all read this list. Importing it loads no trainer (and no
JAX); `module(name)` imports one when it is needed."""

from __future__ import annotations

import dataclasses
import importlib
from types import ModuleType

from jaxedit.config import ConfigError

# Traced hyperparameters (name -> config key) of each kind of step (`jaxedit.hparams`).
SUPERVISED_HPARAMS = {"lr": "train.lr"}
GRPO_HPARAMS = {"lr": "train.lr", "kl_beta": "grpo.kl_beta", "clip_range": "grpo.clip_range"}
OPD_HPARAMS = {"lr": "train.lr"}


@dataclasses.dataclass(frozen=True)
class Trainer:
  name: str  # config key `trainer`
  module: str  # train(config, workdir), run_eval(config, workdir), make_setup
  model: str  # what it trains and exports: editor | planner | vae
  hparams: dict  # traced hyperparameters: name -> config key
  rl: bool = False  # trains on the policy's own rollouts (config section `rollout`)


TRAINERS = (
    Trainer("editor_sft", "jaxedit.trainers.editor_sft", "editor", SUPERVISED_HPARAMS),
    Trainer("editor_grpo", "jaxedit.trainers.editor_grpo", "editor", GRPO_HPARAMS, rl=True),
    Trainer("editor_opd", "jaxedit.trainers.editor_opd", "editor", OPD_HPARAMS, rl=True),
    Trainer("editor_rft", "jaxedit.trainers.editor_rft", "editor", SUPERVISED_HPARAMS,
            rl=True),
    Trainer("planner_sft", "jaxedit.trainers.planner_sft", "planner", SUPERVISED_HPARAMS),
    Trainer("planner_grpo", "jaxedit.trainers.planner_grpo", "planner", GRPO_HPARAMS, rl=True),
    Trainer("planner_opd", "jaxedit.trainers.planner_opd", "planner", OPD_HPARAMS, rl=True),
    Trainer("vae", "jaxedit.trainers.vae", "vae", SUPERVISED_HPARAMS),
)
BY_NAME = {t.name: t for t in TRAINERS}
EDITORS = tuple(t.name for t in TRAINERS if t.model == "editor")
PLANNERS = tuple(t.name for t in TRAINERS if t.model == "planner")


def get(name) -> Trainer:
  if name not in BY_NAME:
    raise ConfigError(f"config key 'trainer' must be one of {sorted(BY_NAME)}, got {name!r}")
  return BY_NAME[name]


def module(name) -> ModuleType:
  """The trainer's module, imported on first use (a trainer imports JAX and its models)."""
  return importlib.import_module(get(name).module)
