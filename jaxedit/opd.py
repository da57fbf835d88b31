"""Online policy distillation (docs/design.md section 7): the student samples, teachers give
their means (or token log-probs) on the student's own states, and the loss is a closed-form
KL with the teachers held fixed. No reward and no score-function term.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxedit import flow


def step_kl(x, v_student, v_teacher, t, t_next, noise_level, sde_type: str = "sde"):
  """Per-sample KL between the student's and the teacher's step Gaussians from the same x_t.

  Both have the step's std s, so KL = ||mu_S - mu_T||^2 / (2 s^2), summed over the sample's
  dims (nats). With noise level 0 (the ODE) the step is deterministic and this is mean
  matching, 0.5 ||mu_S - mu_T||^2: the a -> 0 limit of s^2 KL. Returns (B,) float32.
  """
  mean_s, std, _ = flow.sde_step_mean(x, v_student, t, t_next, noise_level, sde_type)
  mean_t, _, _ = flow.sde_step_mean(x, v_teacher, t, t_next, noise_level, sde_type)
  sq = jnp.sum((mean_s - jax.lax.stop_gradient(mean_t)) ** 2, axis=tuple(range(1, x.ndim)))
  return jnp.where(std > 0, sq / (2 * jnp.where(std > 0, std, 1.0) ** 2), 0.5 * sq)


def route(tasks, teacher_tasks, routing: str):
  """Teacher index per prompt: the teacher of the prompt's task tag, or round robin."""
  if routing == "round_robin":
    return [i % len(teacher_tasks) for i in range(len(tasks))]
  if routing != "task":
    raise ValueError(f"unknown routing {routing!r}; use 'task' or 'round_robin'")
  index = {task: i for i, task in enumerate(teacher_tasks)}
  missing = sorted(set(tasks) - set(index))
  if missing:
    raise ValueError(f"no teacher for task {missing[0]!r}; teachers: {list(teacher_tasks)}")
  return [index[task] for task in tasks]


def route_field(opd_config, records: dict) -> dict:
  """{"route": each record's teacher index (int32)} by the `opd` section's routing of the
  records' task tags."""
  routes = route([str(t) for t in records["task"]], teacher_tasks(opd_config.teachers),
                 opd_config.routing)
  return {"route": np.asarray(routes, np.int32)}


def teacher_tasks(teachers) -> list[str]:
  """The task tags of `opd.teachers` (tag -> workdir) that have a teacher, in config order:
  a teacher's index."""
  return [task for task, workdir in teachers.items() if workdir]


def check_teachers(teacher_tasks, trained_tasks, routing: str) -> None:
  """Raises ValueError naming what is wrong: no teacher at all, or (routing by task) a task
  of the training prompts without one."""
  if not teacher_tasks:
    raise ValueError("no teacher: set opd.teachers.<task>=WORKDIR")
  if routing == "task":
    missing = [t for t in trained_tasks if t not in teacher_tasks]
    if missing:
      raise ValueError(f"prompts of task {missing[0]!r} have no teacher: set "
                       f"opd.teachers.{missing[0]}=WORKDIR, or train.tasks to the tasks that "
                       "have one")


def routed(per_teacher, routes):
  """Each sample's value from its routed teacher: per_teacher (K, B, ...), routes (B,)."""
  pick = jax.nn.one_hot(routes, per_teacher.shape[0], dtype=per_teacher.dtype)  # (B, K)
  return jnp.einsum("bk,kb...->b...", pick, per_teacher)


# ------------------------------------------------------------------------------------------
# The planner: token-level reverse KL on the student's samples.
# ------------------------------------------------------------------------------------------
def sampled_token_kl(student_logp, teacher_logp):
  """Per-token reverse KL on the student's own sampled tokens y (B, L): returns (surrogate,
  estimate). The estimate is log p_S(y) - log p_T(y). Differentiating it directly gives
  E[grad log p_S] = 0, so the loss is the score-function surrogate
  sg(log p_S(y) - log p_T(y)) * log p_S(y), whose expected gradient is the gradient of
  KL(p_S || p_T) at each position (each token's own KL; no credit to later tokens)."""
  estimate = jax.lax.stop_gradient(student_logp - teacher_logp)
  return estimate * student_logp, estimate


def full_vocab_kl(student_logits, teacher_logits):
  """KL(p_S || p_T) over the whole vocabulary at every position (B, L), exact."""
  logp_s = jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1)
  logp_t = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_logits).astype(jnp.float32),
                              axis=-1)
  return jnp.sum(jnp.exp(logp_s) * (logp_s - logp_t), axis=-1)
