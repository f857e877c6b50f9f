"""Tokenise validated preference pairs exactly as a DPO trainer would.

Tokenisation follows TRL's ``DPOTrainer`` (v1.x) so that every number rmlab reports agrees with
training logs:

- plain text: the EOS token is appended to each completion that does not already end with it, then
  ``prompt``, ``prompt + chosen`` and ``prompt + rejected`` are tokenised with the tokenizer's own
  special-token rules (a BOS is added once, as the tokenizer does, never doubled);
- conversations: the chat template is applied to the prompt with the generation prompt, and to
  prompt + completion without it; no EOS is appended (the template closes the turn);
- the completion starts where the ids of the prompt and of prompt+completion diverge (the minimum
  over chosen and rejected), which also covers tokens that merge across the boundary;
- ``max_length`` truncates prompt+completion per sequence (``keep_start`` keeps the beginning,
  ``keep_end`` the end). A pair whose response loses tokens is marked ``truncated``, never dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd

from rmlab.errors import DataError, TokenizerError, check_choice


@dataclass(frozen=True)
class EncodedSequence:
    """One tokenised prompt+response, after truncation.

    ``ids[start:]`` are the response tokens that are scored; the log-prob of ``ids[t]`` comes from
    the model's output at position ``t - 1``, so ``start >= 1``.
    """

    ids: tuple[int, ...]
    start: int
    response_tokens_full: int  # response length before truncation
    truncated: bool

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
        else:  # keep_end: the prompt is cut from the left; the response loses tokens only past it
            cut = len(full) - max_length
            ids, start, truncated = full[cut:], max(prompt_len - cut, 0), cut >= prompt_len
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
        add_eos: append the EOS token to plain-text completions that lack it (TRL's default).
        chat_template_kwargs: extra arguments for ``apply_chat_template``.

    Returns:
        One :class:`EncodedPair` per row, in order.
    """
    check_choice("truncation_mode", truncation_mode, ("keep_start", "keep_end"))
    if max_length is not None and (not isinstance(max_length, int) or max_length < 2):
        raise DataError(f"max_length={max_length!r} must be an integer >= 2 (or None).")
    fmt = pairs.attrs.get("format") or ("chat" if isinstance(pairs["chosen"].iloc[0], list) else "text")
    kwargs = dict(chat_template_kwargs or {})
    if fmt == "chat":
        if not getattr(tokenizer, "chat_template", None) and "chat_template" not in kwargs:
            raise TokenizerError(
                "The preference data are conversations (lists of messages) but the tokenizer has no "
                "chat_template. Set tokenizer.chat_template, pass chat_template_kwargs="
                "{'chat_template': ...}, or give the data as plain strings."
            )
        prompt_ids = [
            _chat_ids(tokenizer, p, add_generation_prompt=True, kwargs=kwargs) if p else []
            for p in pairs["prompt"]
        ]
        chosen_ids = [
            _chat_ids(tokenizer, list(p or []) + list(c), add_generation_prompt=False, kwargs=kwargs)
            for p, c in zip(pairs["prompt"], pairs["chosen"])
        ]
        rejected_ids = [
            _chat_ids(tokenizer, list(p or []) + list(r), add_generation_prompt=False, kwargs=kwargs)
            for p, r in zip(pairs["prompt"], pairs["rejected"])
        ]
    else:
        eos = tokenizer.eos_token
        if add_eos and eos is None:
            raise TokenizerError(
                "add_eos=True but the tokenizer has no eos_token. Set tokenizer.eos_token or pass "
                "add_eos=False."
            )

        def finish(text: str) -> str:
            return text + eos if add_eos and not text.endswith(eos) else text

        prompts = list(pairs["prompt"])
        prompt_ids = tokenizer(prompts)["input_ids"]
        chosen_ids = tokenizer([p + finish(c) for p, c in zip(prompts, pairs["chosen"])])["input_ids"]
        rejected_ids = tokenizer([p + finish(r) for p, r in zip(prompts, pairs["rejected"])])["input_ids"]

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
    return encoded
