"""The embedded default world: models and data rmlab builds itself, so everything runs offline.

``rmlab.toy.load()`` returns the shipped world; ``rmlab build-toy`` rebuilds it from seeds.
"""

from rmlab.toy.language import gold_reward
from rmlab.toy.tiny import CHAT_TEMPLATE, tiny_causal_lm, tiny_reward_model, tiny_tokenizer
from rmlab.toy.world import ToyWorld, load

__all__ = ["CHAT_TEMPLATE", "ToyWorld", "gold_reward", "load", "tiny_causal_lm", "tiny_reward_model", "tiny_tokenizer"]
