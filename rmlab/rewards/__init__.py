"""Rewards: implicit DPO rewards (sequence, token, step), reward-model scores, dense token rewards
and attributions of either kind of reward to input tokens."""

from rmlab.rewards.attribution import attribute_reward
from rmlab.rewards.dense import dense_rewards
from rmlab.rewards.implicit import dpo_metrics, implicit_rewards, token_rewards
from rmlab.rewards.steps import step_rewards
from rmlab.rewards.scores import reward_scores

__all__ = [
    "attribute_reward",
    "dense_rewards",
    "dpo_metrics",
    "implicit_rewards",
    "reward_scores",
    "step_rewards",
    "token_rewards",
]
