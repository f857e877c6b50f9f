"""Tiny tokenizers and models built from configs, offline and in seconds.

They exercise the exact code paths of real hub models (GPT-2, Llama and GPT-NeoX architectures,
byte-level BPE, BOS handling, chat templates) without downloading anything, so tests, the demo and
benchmarks run on any machine. Weights are random unless trained; what matters is that they are real
``transformers`` models.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

#: A ChatML-style template: the assistant turn ends with ``<|im_end|>``, the generation prompt
#: opens an assistant turn, so the prompt's ids are a prefix of prompt+completion ids.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "The movie was great and the acting was wonderful.",
    "The film was dull, slow and far too long.",
    "I loved the music, the story and the cast.",
    "What a boring plot; the ending made no sense.",
    "A charming, funny and clever little film.",
    "Terrible pacing, weak jokes and a flat script.",
    "Write a short review of the movie.",
    "Describe the film in one sentence.",
    "The book was good. The book was good. The book was good.",
    "Ünïcödé çharacters, digits 0123456789 and punctuation !?;:()[]{}",
]

_SPECIAL = ["<|endoftext|>", "<|pad|>", "<s>", "<|im_start|>", "<|im_end|>"]


def tiny_tokenizer(
    vocab_size: int = 384,
    *,
    add_bos: bool = False,
    encoder: bool = False,
    padding_side: str = "right",
    corpus: list[str] | None = None,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (GPT-2 style) on a small corpus and wrap it for transformers.

    Args:
        vocab_size: target vocabulary size (bytes + merges + special tokens).
        add_bos: prepend ``<s>`` to every encoded text, as Llama tokenizers do; used to check that a
            BOS token is never doubled.
        encoder: wrap every text as ``<s> text <|endoftext|>``, as RoBERTa-style encoder tokenizers
            do (a class token first, a separator last); for encoder reward models.
        padding_side: ``"right"`` or ``"left"``.
        corpus: texts to train on (a built-in sample of review-like sentences by default).

    Returns:
        A ``PreTrainedTokenizerFast`` with ``eos_token``, ``pad_token``, ``bos_token`` and a
        ChatML-style ``chat_template``.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=_SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((corpus or _CORPUS) * 4, trainer=trainer)
    if encoder:
        bos_id, eos_id = tok.token_to_id("<s>"), tok.token_to_id("<|endoftext|>")
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A <|endoftext|>",
            pair="<s> $A <|endoftext|> <|endoftext|> $B <|endoftext|>",
            special_tokens=[("<s>", bos_id), ("<|endoftext|>", eos_id)],
        )
    elif add_bos:
        bos_id = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
        bos_token="<s>",
        padding_side=padding_side,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


_ARCHS = {
    "gpt2": dict(n_embd=32, n_layer=2, n_head=2, n_positions=512),
    "llama": dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    ),
    "bert": dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=512,
    ),
    "gpt_neox": dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=512,
        rotary_pct=0.5,
    ),
}


def tiny_causal_lm(
    arch: str = "gpt2",
    vocab_size: int = 384,
    *,
    seed: int = 0,
    **overrides,
) -> PreTrainedModel:
    """Build a randomly initialised causal LM of a real architecture from its config.

    Args:
        arch: ``"gpt2"``, ``"llama"`` or ``"gpt_neox"``, or any ``model_type`` transformers knows
            (then pass its size in ``overrides``).
        vocab_size: must cover the tokenizer's ids.
        seed: torch seed for the initial weights, so two calls with one seed give one model.
        **overrides: config fields to change (sizes, dropout, ...).

    Returns:
        The model in eval mode, fp32, on CPU.
    """
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(_tiny_config(arch, vocab_size, overrides)).eval()


def _tiny_config(arch: str, vocab_size: int, overrides: dict):
    fields = dict(_ARCHS.get(arch, {}))
    # ids of the specials of :func:`tiny_tokenizer`: <|endoftext|>=0, <|pad|>=1, <s>=2
    fields.update(bos_token_id=2, eos_token_id=0, pad_token_id=1)
    fields.update(overrides)
    config = AutoConfig.for_model(arch, vocab_size=vocab_size, **fields)
    for name in (
        "resid_pdrop", "embd_pdrop", "attn_pdrop", "attention_dropout", "hidden_dropout",
        "hidden_dropout_prob", "attention_probs_dropout_prob", "summary_first_dropout",
        "classifier_dropout",
    ):
        if getattr(config, name, None) is not None:
            setattr(config, name, 0.0)
    return config


def tiny_reward_model(
    arch: str = "gpt2",
    vocab_size: int = 384,
    *,
    seed: int = 0,
    num_labels: int = 1,
    **overrides,
) -> PreTrainedModel:
    """Build a randomly initialised reward model (``AutoModelForSequenceClassification``) from a config.

    Causal architectures (``"gpt2"``, ``"llama"``, ``"gpt_neox"``) pool the score at the last
    non-padding token, as TRL's ``RewardTrainer`` models do; ``"bert"`` is an encoder that pools its
    first token. Same arguments as :func:`tiny_causal_lm`, plus ``num_labels`` (outputs of the score
    head; a reward model has one).
    """
    config = _tiny_config(arch, vocab_size, overrides)
    config.num_labels = num_labels
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_config(config).eval()
