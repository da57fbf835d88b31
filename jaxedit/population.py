"""Population mode: K settings of the traced hyperparameters trained at once, in one compiled
program, for models small enough that K copies of the state fit (editor SFT).

    jaxedit train --config configs/shapes_editor_sft.py --workdir DIR \
        --config.population='[{"train.lr": 1e-3}, {"train.lr": 2e-3}, {"train.lr": 4e-3}]'

The train step is `jax.vmap`ped over a leading member axis of the state and of the
hyperparameters; the batch and the random streams are shared, so member k follows exactly
the run it would be alone with its settings. A small model leaves a CPU or accelerator
under-used; K members fill it (`python -m jaxedit.benchmarks.population` measures this).
Each member writes DIR/member_K/metrics.jsonl and TensorBoard scalars; the last validation
of every member goes to DIR/population.json.
"""

from __future__ import annotations

import json
import logging
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxedit import checkpoint, evaluation, hparams, sharding, sweep
from jaxedit import codec as codec_lib
from jaxedit.config import ConfigError, apply_overrides
from jaxedit.interop import pretrained


def members(config: ml_collections.ConfigDict) -> list[dict]:
  """The population's settings, checked: a JSON list of {config key: value} over traced
  hyperparameters only (anything else would need another program)."""
  allowed = set(hparams.SFT.values())
  try:
    points = json.loads(config.population)
  except json.JSONDecodeError as e:
    raise ConfigError(f"config key 'population' must be a JSON list of settings: {e}") from None
  if not isinstance(points, list) or len(points) < 2 or not all(
      isinstance(p, dict) for p in points):
    raise ConfigError("config key 'population' must list at least 2 settings, e.g. "
                      '[{"train.lr": 1e-3}, {"train.lr": 2e-3}]')
  for p in points:
    for key in p:
      if key not in allowed:
        raise ConfigError(f"population setting {key!r} changes the compiled program; a "
                          f"population varies only {sorted(allowed)} (sweep the rest)")
    apply_overrides(ml_collections.ConfigDict(config.to_dict()), sweep.overrides(p))
  return points


def stacked(tree_shardings):
  """Shardings with a leading, unsharded member axis."""
  return jax.tree.map(lambda s: NamedSharding(s.mesh, P(None, *s.spec)), tree_shardings)


def member_hparams(config: ml_collections.ConfigDict, points: list[dict]) -> dict:
  return {name: np.asarray([p.get(key, hparams.get(config, key)) for p in points], np.float32)
          for name, key in hparams.SFT.items()}


def make_step(setup):
  """jitted (stacked state, batch, stacked hp) -> (stacked state, metrics of shape (K,))."""
  from jaxedit.trainers import editor_sft

  shardings = stacked(setup.state_shardings)
  replicated = sharding.replicated(setup.mesh)
  step = jax.jit(jax.vmap(editor_sft.train_step_fn(setup), in_axes=(None, 0, None, 0)),
                 in_shardings=(replicated, shardings, setup.batch_sharding, None),
                 out_shardings=(shardings, replicated), donate_argnums=1)
  return codec_lib.bind(sharding.in_context(step, setup.mesh, setup.rules), setup.codec)


def replicate_members(state, k: int, setup):
  """K copies of one initial state (every member starts where a single run would)."""
  fn = jax.jit(lambda s: jax.tree.map(lambda x: jnp.broadcast_to(x, (k, *x.shape)), s),
               out_shardings=stacked(setup.state_shardings))
  return fn(state)


def member(tree, k: int, shardings):
  """Member k's slice of a stacked tree, in the single-run shardings."""
  return jax.jit(lambda t: jax.tree.map(lambda x: x[k], t), out_shardings=shardings)(tree)


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  from clu import metric_writers, periodic_actions

  from jaxedit.trainers import editor_sft

  points = members(config)
  k = len(points)
  os.makedirs(workdir, exist_ok=True)
  pretrained.copy_tokenizer(config.init_from, workdir)
  setup = editor_sft.make_setup(config, workdir)
  tc = config.train
  hp = member_hparams(config, points)
  dirs = [os.path.join(workdir, f"member_{i}") for i in range(k)]
  writers = [metric_writers.create_default_writer(d, just_logging=jax.process_index() > 0)
             for d in dirs]
  # Each member's log picks its entry of the (K,) metrics.
  logs = [editor_sft.MetricsLog(w, d, lambda values, i=i: {n: float(v[i])
                                                           for n, v in values.items()})
          for i, (w, d) in enumerate(zip(writers, dirs))]
  logging.info("population of %d: %s", k, points)

  data_iter = iter(editor_sft.train_data(setup))
  mngr = checkpoint.manager(workdir, tc.keep_checkpoints, tc.async_checkpoints)
  shardings = stacked(setup.state_shardings)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct((k, *a.shape), a.dtype, sharding=s),
                          setup.abstract_state, shardings)
  if mngr.latest_step() is not None:
    state = checkpoint.restore(mngr, mngr.latest_step(), abstract, data_iter)
    logging.info("resumed from step %d", int(state.step[0]))
  else:
    state = replicate_members(editor_sft.start_state(setup), k, setup)
  start = int(state.step[0])

  step_fn = make_step(setup)
  progress = periodic_actions.ReportProgress(num_train_steps=tc.num_steps, writer=writers[0])
  preemption = checkpoint.Preemption()
  step = start
  try:
    for step in range(start + 1, tc.num_steps + 1):
      batch = sharding.global_batch(next(data_iter), setup.batch_sharding)
      state, metrics = step_fn(state, batch, hp)
      progress(step)
      last = step == tc.num_steps
      if step % tc.log_every == 0 or last:
        for log in logs:
          log(step, metrics)
      if checkpoint.save_if_due(mngr, step, state, data_iter, config, every=tc.checkpoint_every,
                                last=last, preemption=preemption):
        break
  finally:
    for log in logs:
      log.flush()
    mngr.wait_until_finished()
    preemption.restore()
    for w in writers:
      w.flush()

  # ---- Every member's validation: the numbers to compare ----
  if tc.eval_every < 0:
    return {"step": step, "members": [{"member": i, "settings": p} for i, p in enumerate(points)]}
  sampler = editor_sft.make_sampler(setup, config.sample.num_steps, config.sample.shift,
                                    config.sample.guidance_scale)
  val = editor_sft.eval_batches(setup, "validation", tc.example_kinds, tc.eval_examples,
                                config.eval.batch_size)
  summary = []
  for i, p in enumerate(points):
    params = member(state.ema_params, i, setup.state_shardings.ema_params)
    scores, _ = editor_sft.evaluate(setup, params, val, sampler, seed=10_000)
    summary.append({"member": i, "settings": p, "step": step, **scores})
    writers[i].write_scalars(step, {f"val/{n}": v for n, v in scores.items()
                                    if isinstance(v, float)})
  if jax.process_index() == 0:
    evaluation.write_metrics(os.path.join(workdir, "population.json"), summary)
  for row in summary:
    logging.info("member %d %s: edit_success %.3f, checklist_score %.3f", row["member"],
                 row["settings"], row["edit_success"], row["checklist_score"])
  return {"step": step, "members": summary}
