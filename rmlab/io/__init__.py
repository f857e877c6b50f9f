"""Loading models, tokenizers and preference data."""

from rmlab.io.models import load_causal_lm, load_tokenizer
from rmlab.io.pairs import load_pairs
from rmlab.io.tokenize import EncodedPair, EncodedSequence, encode_pairs

__all__ = ["EncodedPair", "EncodedSequence", "encode_pairs", "load_causal_lm", "load_pairs", "load_tokenizer"]
