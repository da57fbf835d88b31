"""Reinforcement learning on the policy's own samples, below the RL trainers: the update
written once (`update`), the editor's and the planner's policies (their setups, rollouts and
rewards: `editor_policy`, `planner_policy`) and the one RL loop (`driver`) that runs an
algorithm (GRPO, OPD: its update) on a policy."""
