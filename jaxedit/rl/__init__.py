"""Reinforcement learning on the policy's own samples, below the RL trainers: the update
written once (`update`) and the editor's and the planner's policies (their setups, rollouts,
rewards and the loop that runs an algorithm's update on them: `editor_policy.train`,
`planner_policy.train`)."""
