"""What sampling checks before a model runs: its settings, its prompts (and their encoding), the
room each prompt leaves in the model's context, and the tokens that end a completion.

Every check raises the specific error of :mod:`rmlab.errors` and names the prompt, the setting or
the value at fault. Prompts are encoded as a trainer feeds them before the completion: plain text
with the tokenizer's own special-token rules, conversations with the chat template and its
generation prompt (as :func:`rmlab.io.tokenize.encode_pairs` does for pairs).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import pandas as pd

from rmlab.errors import ArgumentError, DataError, check_choice, closest
from rmlab.io.models import context_length
from rmlab.io.pairs import cell_kind, to_python
from rmlab.io.tokenize import check_template, prompt_ids_of

#: Where completions are decoded: rmlab's batched decoding (``"hf"``) or vLLM's engine.
BACKENDS = ("hf", "vllm")


def _check_int(name: str, value, minimum: int, hint: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ArgumentError(f"{name}={value!r} must be an integer >= {minimum} ({hint}).")
    return int(value)


def check_settings(*, n, max_new_tokens, temperature, top_p, seed, batch_size, backend) -> tuple[int, int, float, float, int]:
    """Validate the sampling settings; returns ``(n, max_new_tokens, temperature, top_p, seed)``.

    Ancestral sampling with temperature and nucleus (top-p) filtering (Holtzman et al. 2020, "The
    Curious Case of Neural Text Degeneration"): ``temperature > 0`` and ``top_p`` in (0, 1].
    """
    n = _check_int("n", n, 1, "completions per prompt")
    max_new_tokens = _check_int("max_new_tokens", max_new_tokens, 1, "the longest completion, in tokens")
    try:
        temperature = float(temperature)
    except (TypeError, ValueError):
        raise ArgumentError(f"temperature={temperature!r} must be a number > 0 (1.0 samples the policy itself).") from None
    if not math.isfinite(temperature) or temperature <= 0:
        raise ArgumentError(
            f"temperature={temperature!r} must be a finite number > 0 (1.0 samples the policy itself; "
            "greedy decoding is not sampling: use a small temperature such as 1e-3 to approximate it)."
        )
    try:
        top_p = float(top_p)
    except (TypeError, ValueError):
        raise ArgumentError(f"top_p={top_p!r} must be a number in (0, 1] (1.0 keeps the whole distribution).") from None
    if not (0.0 < top_p <= 1.0):
        raise ArgumentError(f"top_p={top_p!r} must be in (0, 1] (1.0 keeps the whole distribution).")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ArgumentError(f"seed={seed!r} must be an integer.")
    if batch_size is not None:
        _check_int("batch_size", batch_size, 1, "completions decoded together; None picks one")
    check_choice("backend", backend, BACKENDS)
    return n, max_new_tokens, temperature, top_p, int(seed)


def check_prompts(prompts) -> tuple[list, str]:
    """Validate prompts: a list of strings or of chat conversations. Returns ``(prompts, format)``.

    A DataFrame with a ``prompt`` column, a Series, a tuple or an array are accepted too. Prompts
    are the conditioning ``x`` of ``pi(y | x)`` (Gao et al. 2022, "Scaling Laws for Reward Model
    Overoptimization", sample per prompt); one format (text or chat) holds for all of them.
    """
    if isinstance(prompts, str):
        raise DataError(
            "prompts is one string; pass a list of prompts (e.g. [prompt]), so that each row of the "
            "result can say which prompt it answers."
        )
    if isinstance(prompts, pd.DataFrame):
        if "prompt" not in prompts.columns:
            raise DataError(
                f"The prompts frame has columns {list(map(str, prompts.columns))} but no 'prompt'."
                + closest("prompt", map(str, prompts.columns))
            )
        prompts = prompts["prompt"]
    if isinstance(prompts, (pd.Series, np.ndarray, tuple)):
        prompts = list(prompts)
    if isinstance(prompts, Mapping) or not isinstance(prompts, list):
        raise DataError(
            f"prompts must be a list of strings or of chat conversations (lists of messages), got "
            f"{type(prompts).__name__}."
        )
    if not prompts:
        raise DataError("prompts is empty: pass at least one prompt to sample from.")
    if all(isinstance(m, Mapping) for m in prompts):
        raise DataError(
            "prompts looks like one conversation (a list of messages); pass a list of conversations "
            "([messages]) so that each prompt is one conversation."
        )
    out, kinds = [], set()
    for i, p in enumerate(prompts):
        p = to_python(p)
        if isinstance(p, (list, tuple)) and not p:
            raise DataError(f"Prompt {i} is an empty conversation; give it at least one message.")
        kind = cell_kind(p, i, "prompt", response=False)
        if kinds and kind not in kinds:
            raise DataError(
                f"Prompt {i} is {kind!r} but earlier prompts are {next(iter(kinds))!r}; use one format "
                "(all plain text or all chat conversations)."
            )
        kinds.add(kind)
        out.append(list(p) if isinstance(p, tuple) else p)
    return out, kinds.pop()


def encode_prompts(prompts: list, fmt: str, tokenizer, chat_template_kwargs: Mapping | None = None) -> list[list[int]]:
    """Token ids of each prompt as a trainer would feed them before the completion.

    Plain text is tokenised with the tokenizer's own special-token rules (a BOS where the tokenizer
    adds one); conversations get the chat template with the generation prompt (the assistant turn
    opened), as :func:`rmlab.io.tokenize.encode_pairs` does (TRL's DPOTrainer convention, Rafailov
    et al. 2023). A prompt that encodes to nothing (``""`` with a tokenizer that adds no BOS) starts
    from the BOS token, or from the EOS token when there is no BOS (GPT-2's convention for
    unconditional samples, Radford et al. 2019).
    """
    kwargs = dict(chat_template_kwargs or {})
    if fmt == "chat":
        check_template(tokenizer, kwargs)
    ids = [list(map(int, p)) for p in prompt_ids_of(tokenizer, fmt, prompts, kwargs)]
    for i, p in enumerate(ids):
        if not p:
            start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
            if start is None:
                raise DataError(
                    f"Prompt {i} encodes to no tokens and the tokenizer has neither a BOS nor an EOS "
                    "token to start from; give it some text."
                )
            ids[i] = [int(start)]
    return ids


def check_prompt_context(prompt_ids: list[list[int]], model, max_new_tokens: int, role: str = "policy") -> None:
    """Raise :class:`DataError` for the first prompt that cannot take ``max_new_tokens`` more tokens
    in ``model``'s context (the sampler of Gao et al. 2022 draws whole completions, never cut ones)."""
    limit = context_length(model)
    if limit is None:
        return
    for i, ids in enumerate(prompt_ids):
        if len(ids) >= limit:
            raise DataError(
                f"Prompt {i} is {len(ids)} tokens, as long as the {role}'s whole context ({limit} "
                "tokens): there is no room for a completion. Shorten the prompt."
            )
        if len(ids) + max_new_tokens > limit:
            raise DataError(
                f"Prompt {i} is {len(ids)} tokens; with max_new_tokens={max_new_tokens} that makes "
                f"{len(ids) + max_new_tokens}, but the {role} accepts at most {limit}. Pass "
                f"max_new_tokens={limit - len(ids)} or less, or shorten the prompt."
            )


def stop_token_ids(eos_token_id, model, tokenizer) -> list[int]:
    """The ids that end a completion: ``eos_token_id`` if given, else the model's generation config's
    EOS id(s) together with the tokenizer's EOS (chat models often list their end-of-turn token).

    A completion ends at its first stop token, kept as its last token, as in ancestral sampling
    from an autoregressive LM (Holtzman et al. 2020).
    """
    def as_list(value):
        if value is None:
            return []
        if isinstance(value, (int, np.integer)):
            return [int(value)]
        return [int(v) for v in value]

    if eos_token_id is not None:
        try:
            ids = as_list(eos_token_id)
        except (TypeError, ValueError):
            raise ArgumentError(f"eos_token_id={eos_token_id!r} must be a token id or a list of ids.") from None
    else:
        gen = getattr(model, "generation_config", None)
        ids = as_list(getattr(gen, "eos_token_id", None)) + as_list(tokenizer.eos_token_id)
    vocab = model.get_output_embeddings().weight.shape[0]
    for i in ids:
        if not 0 <= i < vocab:
            raise ArgumentError(f"Stop token id {i} is outside the model's vocabulary (0..{vocab - 1}).")
    return sorted(set(ids))
