"""The compute engine: length-bucketed batches and exact per-token log-probs."""

from rmlab.engine.batching import length_batches
from rmlab.engine.logprobs import selective_log_softmax, token_logprobs
from rmlab.engine.pairs import PairLogprobs, pair_logprobs

__all__ = ["PairLogprobs", "length_batches", "pair_logprobs", "selective_log_softmax", "token_logprobs"]
