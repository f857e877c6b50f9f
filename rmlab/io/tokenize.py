"""Tokenise validated preference pairs exactly as a DPO trainer would.

Tokenisation follows TRL's ``DPOTrainer`` (v1.x) so that every number rmlab reports agrees with
training logs:

- plain text: the EOS token is appended to each completion that does not already end with it, then
  ``prompt``, ``prompt + chosen`` and ``prompt + rejected`` are tokenised with the tokenizer's own
  special-token rules (a BOS is added once, as the tokenizer does, never doubled);
- conversations: the chat template is applied to the prompt with the generation prompt, and to
  prompt + completion without it; no EOS is appended (the template closes the turn);
- the completion starts where the ids of the prompt and of prompt+completion diverge, one start for
  both sides: the minimum over chosen and rejected, as TRL 1.16's ``tokenize_fn`` takes it
  (``prompt_len = min(common_prefix_length(...), ...)``). When a token merges across the
  prompt/response boundary on one side only (a prompt ending in ``" "`` or mid-word, one response
  continuing it), the other side's scored span therefore begins with the prompt's last token(s),
  exactly as TRL trains and logs it; both sides keep one shared context, so the DPO margin compares
  log-probs of the same prompt prefix;
- ``max_length`` truncates prompt+completion per sequence (``keep_start`` keeps the beginning,
  ``keep_end`` the end; TRL 1.16 deprecates it), as TRL's ``DataCollatorForPreference`` slices ids
  and completion mask. A sequence that loses any token is marked ``truncated`` (TRL keeps no such
  flag): with ``keep_start`` the end of its response, with ``keep_end`` the start of its prompt (its
  BOS first), and past the prompt the start of its response, so its log-probs are taken in a
  shorter context than the untruncated pair's. Pairs are never dropped (TRL 1.16 drops, for ``keep_start``, the
  pairs whose prompt fills ``max_length``); responses cut to nothing are counted in one
  :class:`~rmlab.errors.DataWarning`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from rmlab.errors import ArgumentError, DataWarning, TokenizerError, check_choice


@dataclass(frozen=True)
class EncodedSequence:
    """One tokenised prompt+response, after truncation.

    ``ids[start:]`` are the response tokens that are scored; the log-prob of ``ids[t]`` comes from
    the model's output at position ``t - 1``, so ``start >= 1``.
    """

    ids: tuple[int, ...]
    start: int
    response_tokens_full: int  # response length before truncation
    truncated: bool  # max_length cut any token (of the response, or with keep_end of the prompt)

    @property
    def response_ids(self) -> tuple[int, ...]:
        return self.ids[self.start :]

    @property
    def n_response(self) -> int:
        return len(self.ids) - self.start


@dataclass(frozen=True)
class EncodedPair:
    """A pair of sequences that share a prompt of ``prompt_tokens`` tokens (before truncation)."""

    chosen: EncodedSequence
    rejected: EncodedSequence
    prompt_tokens: int

    @property
    def truncated(self) -> bool:
        return self.chosen.truncated or self.rejected.truncated


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _truncate(full: list[int], prompt_len: int, max_length: int | None, mode: str) -> EncodedSequence:
    response_full = len(full) - prompt_len
    ids, start, truncated = full, prompt_len, False
    if max_length is not None and len(full) > max_length:
        if mode == "keep_start":
            ids, start, truncated = full[:max_length], min(prompt_len, max_length), True
        else:  # keep_end: the prompt (BOS first) is cut from the left, then the response's start
            cut = len(full) - max_length
            ids, start, truncated = full[cut:], max(prompt_len - cut, 0), True
    # position 0 has no context to be predicted from (TRL drops it from the completion mask too)
    return EncodedSequence(tuple(ids), max(start, 1), response_full, truncated)


def _chat_ids(tokenizer, conversation: list, *, add_generation_prompt: bool, kwargs: dict) -> list[int]:
    result = tokenizer.apply_chat_template(
        conversation,
        tokenize=True,
        return_dict=True,
        add_generation_prompt=add_generation_prompt,
        **kwargs,
    )
    return list(result["input_ids"])


def decode_tokens(tokenizer, ids) -> list[str]:
    """The text of each token id on its own (each distinct id decoded once)."""
    ids = np.asarray(ids, dtype=np.int64)
    unique = np.unique(ids)
    texts = dict(zip(unique.tolist(), tokenizer.batch_decode([[int(u)] for u in unique])))
    return [texts[int(t)] for t in ids]


def resolve_add_eos(tokenizer, add_eos) -> bool:
    """``add_eos=None`` means: append EOS when the tokenizer has one and does not add it itself.

    Reward models follow TRL's ``RewardTrainer`` (EOS appended to plain text); encoder tokenizers
    (BERT, RoBERTa) close every text with their own separator, so nothing is appended for them.
    """
    if add_eos is not None:
        return bool(add_eos)
    eos = tokenizer.eos_token_id
    if eos is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return not (ids and ids[-1] == eos)


def _format(frame: pd.DataFrame, column: str) -> str:
    return frame.attrs.get("format") or ("chat" if isinstance(frame[column].iloc[0], list) else "text")


def check_template(tokenizer, kwargs: dict) -> None:
    """Raise :class:`TokenizerError` when conversations meet a tokenizer without a chat template."""
    if not getattr(tokenizer, "chat_template", None) and "chat_template" not in kwargs:
        raise TokenizerError(
            "The data are conversations (lists of messages) but the tokenizer has no "
            "chat_template. Set tokenizer.chat_template, pass chat_template_kwargs="
            "{'chat_template': ...}, or give the data as plain strings."
        )


def prompt_ids_of(tokenizer, fmt: str, prompts: list, kwargs: dict) -> list[list[int]]:
    """Token ids of each prompt as TRL's DPOTrainer builds them (chat: template with the generation prompt)."""
    if fmt == "chat":
        return [
            _chat_ids(tokenizer, p, add_generation_prompt=True, kwargs=kwargs) if p else [] for p in prompts
        ]
    return list(tokenizer(list(prompts))["input_ids"])


def _full_ids(tokenizer, fmt: str, prompts: list, completions: list, add_eos: bool, kwargs: dict):
    """Ids of prompt + completion: chat template without generation prompt, or text (+ EOS)."""
    if fmt == "chat":
        return [
            _chat_ids(tokenizer, list(p or []) + list(c), add_generation_prompt=False, kwargs=kwargs)
            for p, c in zip(prompts, completions)
        ]
    eos = tokenizer.eos_token
    if add_eos and eos is None:
        raise TokenizerError(
            "add_eos=True but the tokenizer has no eos_token. Set tokenizer.eos_token or pass "
            "add_eos=False."
        )

    def finish(text: str) -> str:
        return text + eos if add_eos and not text.endswith(eos) else text

    return list(tokenizer([p + finish(c) for p, c in zip(prompts, completions)])["input_ids"])


def _check_options(max_length, truncation_mode) -> None:
    check_choice("truncation_mode", truncation_mode, ("keep_start", "keep_end"))
    if max_length is not None and (not isinstance(max_length, int) or max_length < 2):
        raise ArgumentError(f"max_length={max_length!r} must be an integer >= 2 (or None).")


def _warn_emptied(sequences: Sequence[tuple[str, EncodedSequence]], max_length) -> None:
    """Warn (with the count and the first rows) about responses that truncation cut to nothing."""
    emptied = [(where, seq) for where, seq in sequences if seq.n_response == 0 and seq.response_tokens_full > 0]
    if not emptied:
        return
    where, seq = emptied[0]
    warnings.warn(
        f"{len(emptied)} of {len(sequences)} responses were truncated to nothing by max_length={max_length} "
        f"(first: {where}, where the prompt fills all {len(seq.ids)} tokens): none of their tokens is scored "
        "(implicit rewards are NaN; a reward model sees only the prompt). Raise max_length, shorten the "
        "prompts, or pass truncation_mode='keep_end' to cut prompts from the left instead.",
        DataWarning,
        stacklevel=3,
    )


def encode_pairs(
    pairs: pd.DataFrame,
    tokenizer,
    *,
    max_length: int | None = None,
    truncation_mode: str = "keep_start",
    add_eos: bool = True,
    chat_template_kwargs: dict | None = None,
) -> list[EncodedPair]:
    """Tokenise validated pairs (from :func:`load_pairs`) as TRL's ``DPOTrainer`` does.

    Args:
        pairs: frame returned by :func:`load_pairs`.
        tokenizer: a Hugging Face tokenizer; for chat data it needs a ``chat_template``.
        max_length: truncate prompt+completion to this many tokens (``None``: no truncation).
        truncation_mode: ``"keep_start"`` (TRL's default) or ``"keep_end"``.
        add_eos: append the EOS token to plain-text completions that lack it (TRL's default);
            ``None`` decides as :func:`resolve_add_eos`.
        chat_template_kwargs: extra arguments for ``apply_chat_template``.

    Returns:
        One :class:`EncodedPair` per row, in order.
    """
    _check_options(max_length, truncation_mode)
    fmt = _format(pairs, "chosen")
    kwargs = dict(chat_template_kwargs or {})
    if fmt == "chat":
        check_template(tokenizer, kwargs)
    add_eos = resolve_add_eos(tokenizer, add_eos)
    prompts = list(pairs["prompt"])
    prompt_ids = prompt_ids_of(tokenizer, fmt, prompts, kwargs)
    chosen_ids = _full_ids(tokenizer, fmt, prompts, list(pairs["chosen"]), add_eos, kwargs)
    rejected_ids = _full_ids(tokenizer, fmt, prompts, list(pairs["rejected"]), add_eos, kwargs)

    encoded = []
    for p_ids, c_ids, r_ids in zip(prompt_ids, chosen_ids, rejected_ids):
        prompt_len = min(_common_prefix(p_ids, c_ids), _common_prefix(p_ids, r_ids))
        encoded.append(
            EncodedPair(
                chosen=_truncate(list(c_ids), prompt_len, max_length, truncation_mode),
                rejected=_truncate(list(r_ids), prompt_len, max_length, truncation_mode),
                prompt_tokens=prompt_len,
            )
        )
    _warn_emptied(
        [(f"row {i}, {side}", getattr(p, side)) for i, p in enumerate(encoded) for side in ("chosen", "rejected")],
        max_length,
    )
    return encoded


def encode_responses(
    responses: pd.DataFrame,
    tokenizer,
    *,
    max_length: int | None = None,
    truncation_mode: str = "keep_start",
    add_eos: bool | None = None,
    chat_template_kwargs: dict | None = None,
) -> list[EncodedSequence]:
    """Tokenise validated prompt/response rows (from :func:`rmlab.io.responses.load_responses`).

    Each row is tokenised like one side of a pair in :func:`encode_pairs`; rows without a prompt
    score their whole text (the response starts after any BOS the tokenizer adds).
    """
    _check_options(max_length, truncation_mode)
    fmt = _format(responses, "response")
    kwargs = dict(chat_template_kwargs or {})
    if fmt == "chat":
        check_template(tokenizer, kwargs)
    add_eos = resolve_add_eos(tokenizer, add_eos)
    prompts = list(responses["prompt"])
    prompt_ids = prompt_ids_of(tokenizer, fmt, prompts, kwargs)
    full_ids = _full_ids(tokenizer, fmt, prompts, list(responses["response"]), add_eos, kwargs)
    out = []
    for p_ids, f_ids in zip(prompt_ids, full_ids):
        # a prompt-less text encodes to [] or [BOS] (+ separators): the response starts after it
        out.append(_truncate(list(f_ids), _common_prefix(p_ids, f_ids), max_length, truncation_mode))
    _warn_emptied([(f"row {i}", seq) for i, seq in enumerate(out)], max_length)
    return out
