"""Shared fixtures. Tests run on 8 fake CPU devices (docs/design.md section 8)."""

import json
import os
import shutil
import sys
import tempfile

# The tests' programs are tiny and compiled once or twice each, so compile time dominates:
# LLVM without optimisation passes compiles a tiny editor's train step in 6 s instead of 11
# (and a test file 1.5x faster). It changes no semantics; benchmarks do not run through here.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                                   "--xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache per test session, shared by the xdist workers (they inherit
# the controller's environment) and the `jaxedit` subprocesses: a killed-and-resumed run, or
# an eval after training, compiles the step once.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE_DIR = tempfile.mkdtemp(prefix="jaxedit_xla_")
else:
  _OWN_CACHE_DIR = None
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest  # noqa: E402

try:
  from jaxedit import schema  # noqa: E402
  from jaxedit.data import job  # noqa: E402
  from jaxedit.shapes.world import World  # noqa: E402
except ImportError as e:  # name the fix, not only the missing module
  raise ImportError(f"{e}: the tests need jaxedit and its test extras in this Python; run "
                    "`pip install -e '.[test]'` (README, second command)") from e

SMALL_SPLITS = {"train": (120, 160), "validation": (20, 33), "test": (30, 44)}


def pytest_unconfigure(config):
  if _OWN_CACHE_DIR and not hasattr(config, "workerinput"):  # the xdist controller made it
    shutil.rmtree(_OWN_CACHE_DIR, ignore_errors=True)


# Sharded against one-device float32 results: the same sums, in another order. Their error
# scales with the magnitudes summed, so an element small beside the rest of its leaf (a
# gradient that mostly cancels) carries the leaf's error, not its own. Measured: up to 31
# float32 epsilons of a leaf's largest element here, 54 on another x86 machine; 256 leaves
# room for processors not yet seen while a wrong sharding (errors of order 1) still fails.
SHARDED_ULPS = 256


def assert_sharded_close(actual, desired, rtol: float, atol: float = 0.0,
                         ulps: int = SHARDED_ULPS, err_msg: str = "") -> None:
  """Every leaf of `actual` equals `desired`'s to `rtol`, give or take the larger of `atol`
  and `ulps` float32 epsilons of the leaf's largest magnitude (see SHARDED_ULPS). `atol`
  covers leaves that are rounding noise around zero (a gradient or loss that cancels):
  their error scales with the terms summed, which the leaf alone does not show."""
  import jax
  import numpy as np

  def check(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = float(np.abs(b).max()) if b.size else 0.0
    np.testing.assert_allclose(a, b, rtol=rtol,
                               atol=max(atol, ulps * float(np.finfo(np.float32).eps) * scale),
                               err_msg=err_msg)
  jax.tree.map(check, actual, desired)


def small_data_config(data_dir):
  config = schema.data()
  config.data_dir = str(data_dir)
  for split, (atomic, abstract) in SMALL_SPLITS.items():
    config.splits[split].atomic = atomic
    config.splits[split].abstract = abstract
  return config


@pytest.fixture(scope="session")
def small_data_dir(tmp_path_factory):
  """A data_dir holding the small shapes dataset, built once per session."""
  data_dir = tmp_path_factory.mktemp("tfds")
  job.dataset_dir(World(), small_data_config(data_dir))
  return str(data_dir)


@pytest.fixture(scope="session")
def small_dataset(small_data_dir):
  """(dataset directory, world) of the small shapes dataset."""
  world = World()
  return job.dataset_dir(world, small_data_config(small_data_dir)), world


def tiny_editor_config(data_dir, **train):
  """A seconds-to-train editor SFT config on the small dataset."""
  config = schema.editor_sft()
  config.data = small_data_config(data_dir)
  config.tokenizer.vocab_size = 300
  config.tokenizer.corpus_examples = 400
  m = config.model
  m.patch_size, m.num_heads, m.head_dim, m.axes_dims_rope = 8, 2, 16, (4, 6, 6)
  m.num_layers, m.num_single_layers = 1, 1
  m.text_width, m.text_layers, m.text_heads, m.text_max_len = 32, 1, 2, 40
  m.text_layout_grid = 2  # grounding on, as in configs/shapes_editor_sft.py
  t = config.train
  t.batch_size, t.num_steps, t.warmup_steps = 8, 6, 2
  t.log_every, t.eval_every, t.sample_every, t.checkpoint_every = 1, 0, 0, 2
  t.eval_examples, t.sample_examples = 8, 4
  t.async_checkpoints = False
  config.sample.num_steps = 2
  config.eval.batch_size, config.eval.num_examples = 8, 16
  for k, v in train.items():
    t[k] = v
  return config


def tiny_planner_config(data_dir, **train):
  """A seconds-to-train planner SFT config on the small dataset."""
  config = schema.planner_sft()
  config.data = small_data_config(data_dir)
  config.tokenizer.vocab_size = 300
  config.tokenizer.corpus_examples = 400
  m = config.model
  m.vocab_size, m.hidden_size, m.intermediate_size, m.num_layers = 300, 32, 64, 2
  m.num_heads, m.num_kv_heads, m.head_dim, m.vision.width = 2, 1, 16, 16
  m.vision.cell_head, config.train.cell_loss_weight = True, 1.0  # covered by the tests
  config.prompt.max_prompt_len, config.prompt.max_plan_len = 80, 128
  t = config.train
  t.batch_size, t.num_steps, t.warmup_steps = 8, 6, 2
  t.log_every, t.eval_every, t.checkpoint_every = 1, 3, 3
  t.eval_examples, t.async_checkpoints = 8, False
  config.eval.batch_size, config.eval.num_examples = 8, 16
  for k, v in train.items():
    t[k] = v
  return config


def tiny_planner_grpo_config(data_dir, init_from, **grpo):
  """Planner GRPO on top of `tiny_planner_config`'s model."""
  config = schema.planner_grpo()
  sft = tiny_planner_config(data_dir)
  for section in ("data", "tokenizer", "model", "prompt"):
    config[section] = sft[section]
  config.init_from = str(init_from)
  r = config.rollout
  r.prompts_per_step, r.group_size, r.minibatches = 4, 4, 2
  for k, v in grpo.items():  # each into its section: rollout or grpo
    (r if k in r else config.grpo)[k] = v
  t = config.train
  t.num_steps, t.log_every, t.eval_every, t.checkpoint_every = 2, 1, 2, 1
  t.eval_examples, t.async_checkpoints = 8, False
  config.eval.batch_size, config.eval.num_examples = 8, 16
  return config


@pytest.fixture(scope="session")
def tiny_editor_dir(small_data_dir, tmp_path_factory):
  """A 2-step tiny editor SFT run; its text length fits abstract instructions too, so it
  also serves as a single-step baseline."""
  from jaxedit.trainers import editor_sft

  workdir = str(tmp_path_factory.mktemp("tiny_editor"))
  config = tiny_editor_config(small_data_dir, num_steps=2, checkpoint_every=0)
  config.model.text_max_len = 64
  editor_sft.train(config, workdir)
  return workdir


@pytest.fixture(scope="session")
def tiny_planner_dir(small_data_dir, tiny_editor_dir, tmp_path_factory):
  """A 4-step tiny planner SFT run whose config names `tiny_editor_dir` as its editor and
  single-step baseline."""
  from jaxedit.trainers import planner_sft

  workdir = str(tmp_path_factory.mktemp("tiny_planner"))
  config = tiny_planner_config(small_data_dir, num_steps=4, eval_every=0, checkpoint_every=0)
  config.editor = tiny_editor_dir
  config.eval.baseline_editor = tiny_editor_dir
  planner_sft.train(config, workdir)
  return workdir


def train_command(data_dir, workdir, **train):
  """`python -m jaxedit train` of `tiny_editor_config` as command-line overrides."""
  return [sys.executable, "-m", "jaxedit", *train_args(data_dir, workdir, **train)]


def train_args(data_dir, workdir, **train):
  """The `jaxedit` arguments of `train_command`."""
  args = ["train", "--config", "configs/shapes_editor_sft.py", "--workdir", str(workdir)]
  config = tiny_editor_config(data_dir, **train)
  flat = {"data.data_dir": data_dir, "tokenizer.vocab_size": 300,
          "tokenizer.corpus_examples": 400, "data.splits.train.abstract": 160,
          "data.splits.validation.abstract": 33, "data.splits.test.abstract": 44,
          "data.splits.train.atomic": 120, "data.splits.validation.atomic": 20,
          "data.splits.test.atomic": 30, "eval.batch_size": 8, "eval.num_examples": 16,
          "sample.num_steps": 2}
  for section in ("model", "train"):
    for k, v in config[section].items():
      if not hasattr(v, "items"):  # nested sections (model.vae) keep their defaults
        flat[f"{section}.{k}"] = v
  return args + [f"--config.{k}={v}" for k, v in flat.items()]


def losses(workdir):
  """step -> loss of DIR/metrics.jsonl (the last line of each step)."""
  by_step = {}
  for line in open(os.path.join(workdir, "metrics.jsonl")):
    row = json.loads(line)
    by_step[row["step"]] = row["loss"]  # a resumed run rewrites steps after its checkpoint
  return by_step


def randomized_run(src: str, dst: str, make_setup, scale: float = 0.2) -> str:
  """A copy of run `src` whose params and EMA params are replaced by random normals."""
  import jax
  import ml_collections
  import numpy as np

  from jaxedit import checkpoint

  shutil.copytree(src, dst)
  mngr, step = checkpoint.latest_step(dst, "a run")
  config = ml_collections.ConfigDict(checkpoint.saved_config(mngr, step))
  setup = make_setup(config, dst)
  state = checkpoint.restore(mngr, step, setup.abstract_state)
  leaves, tree = jax.tree.flatten(state.params)
  rng = np.random.default_rng(0)
  fresh = [jax.device_put((rng.normal(size=x.shape) * scale).astype(x.dtype), x.sharding)
           for x in leaves]
  ema = [jax.device_put((rng.normal(size=x.shape) * scale).astype(x.dtype), x.sharding)
         for x in leaves]
  state = state.replace(params=jax.tree.unflatten(tree, fresh),
                        ema_params=jax.tree.unflatten(tree, ema))
  checkpoint.save(mngr, step + 1, state, None, config, force=True)
  mngr.wait_until_finished()
  return dst


def resume_after_step_one(workdir, copy, train) -> None:
  """Copies a finished run to `copy` with only its step-1 checkpoint and metrics, then
  `train(copy)` resumes it from there."""
  shutil.copytree(workdir, copy)
  for step in os.listdir(os.path.join(copy, "checkpoints")):
    if step != "1":
      shutil.rmtree(os.path.join(copy, "checkpoints", step))
  with open(os.path.join(copy, "metrics.jsonl")) as f:
    first = f.readline()
  with open(os.path.join(copy, "metrics.jsonl"), "w") as f:
    f.write(first)
  train(str(copy))


def assert_logged_exactly(workdir, per_step: list[dict]) -> None:
  """DIR/metrics.jsonl's train/ metrics of steps 1, 2, ... equal `per_step`'s, bit for bit."""
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [r["step"] for r in rows] == list(range(1, len(per_step) + 1))
  for row, metrics in zip(rows, per_step):
    for k, v in metrics.items():
      assert row[f"train/{k}"] == float(v), (str(workdir), row["step"], k)


def update_after_one_rollout(setups, make_update, config, start_dir, num_prompts, rewards=None):
  """One rollout of the editor SFT run `start_dir` on the first setup's devices, then
  `make_update(setup)` run on each setup from the same state, trajectories and rewards (the
  rollout's, or `rewards` in their place): [(new state, metrics)] on the host, one per setup
  (the 8-devices-equal-1 checks of the editor's RL updates)."""
  import jax

  from jaxedit.data.pipeline import make_dataset
  from jaxedit.rl import editor_policy

  one = setups[0]
  state = editor_policy.init_state(one, editor_policy.load_sft(one, start_dir))
  prompts = next(iter(make_dataset(
      one.source("train"), num_prompts, seed=0, fields=editor_policy.PROMPT_FIELDS,
      kinds=("atomic",), map_fn=lambda r: editor_policy.tokenize(one, r))))
  levels, trained = one.levels_and_steps(1)
  chunks, host = editor_policy.rollout_and_score(
      one, editor_policy.make_rollout(one), editor_policy.make_rewards(config, one.world),
      state.params, state.base, prompts, levels, jax.random.key(0))
  assert len(host["images"]) == num_prompts * config.rollout.group_size
  chunks = jax.device_get(chunks)
  if rewards is not None:
    size = len(chunks[0]["rewards"])
    for j, chunk in enumerate(chunks):
      chunk["rewards"] = rewards[j * size:(j + 1) * size]
  host_state = jax.device_get(state)
  results = []
  for setup in setups:
    placed = jax.device_put(host_state, setup.state_shardings)
    traj = editor_policy.trajectory_sharding(setup)
    put = [{k: jax.device_put(v, traj if k in ("latents", "log_probs") else setup.batch_sharding)
            for k, v in c.items()} for c in chunks]
    results.append(jax.device_get(make_update(setup)(placed, put, levels, trained)))
  return results
