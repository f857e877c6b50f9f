"""The embedded default world: models and data rmlab builds itself, so everything runs offline."""

from rmlab.toy.tiny import CHAT_TEMPLATE, tiny_causal_lm, tiny_tokenizer

__all__ = ["CHAT_TEMPLATE", "tiny_causal_lm", "tiny_tokenizer"]
