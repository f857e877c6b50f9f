"""Rewards: implicit DPO rewards (sequence, token, step)."""

from rmlab.rewards.implicit import dpo_metrics, implicit_rewards, step_rewards, token_rewards

__all__ = ["dpo_metrics", "implicit_rewards", "step_rewards", "token_rewards"]
