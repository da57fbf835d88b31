"""Reinforcement learning on the policy's own samples, below the RL trainers: the one RL loop
and the policy state (`driver`), the minibatch update written once (`update`), and the
editor's and the planner's policies (`editor_policy.EditorPolicy`,
`planner_policy.PlannerPolicy`: setups, starts, rollouts, rewards, evaluation). An RL
trainer is an algorithm: a loss over one policy's rollouts (`driver.Algorithm`)."""
