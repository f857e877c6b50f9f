"""Dense per-token rewards of an explicit reward model.

A reward model scores whole texts; reading it token by token asks how the score moves as the
response grows. With ``s_t`` the score of the prompt plus the response up to and including token
``t``, the token reward is ``r_t = s_t - s_{t-1}``, the first taken against ``s_prompt``, the score
at the end of the prompt; the rewards telescope to ``s_T - s_prompt``. This is the prefix-score
reading of a sequence-level reward used for dense credit assignment (e.g. Chan et al. 2024,
"Dense Reward for Free in Reinforcement Learning from Human Feedback", which redistributes the
final score over tokens; here the redistribution is the exact prefix difference).

Two ways to compute ``s_t``:

- ``one_pass``: for a causal (decoder) reward model with last-token pooling, the score head applied
  to every hidden state gives every ``s_t`` in ONE forward pass (causal attention: position ``t``
  never sees the future). Checked once per model against scoring prefixes alone.
- ``prefix``: score each prefix as its own input, batched. Needed for encoders (BERT, RoBERTa),
  which pool a class token and see the whole text; the tokenizer's closing tokens (e.g. ``[SEP]``)
  are appended to each prefix as they would be to a full text.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pyarrow as pa

from rmlab.cache import resolve_cache_dir, run_cached
from rmlab.engine.batching import batch_budget, length_batches
from rmlab.engine.prefix_scores import one_pass_problem, shared_prompt_problem
from rmlab.engine.reward_model import RewardInputs, prepare_reward_inputs, reward_cache
from rmlab.errors import ModelError, check_choice
from rmlab.options import CACHING, LOADING, RUNNING, TOKENIZING, Options, with_options
from rmlab.io.models import model_device
from rmlab.io.tokenize import EncodedSequence, decode_tokens

METHODS = ("auto", "one_pass", "prefix")


def _closing_tokens(tokenizer) -> list[int]:
    """Special tokens the tokenizer appends after every text (``[SEP]``, ``</s>``...), or []."""
    empty = list(tokenizer("")["input_ids"])
    text = list(tokenizer("a")["input_ids"])
    shared = 0
    while shared < min(len(empty), len(text)) and empty[shared] == text[shared]:
        shared += 1
    return empty[shared:]


def _prefixes(seq: EncodedSequence, closing: list[int]) -> list[list[int]]:
    """The prompt and every prompt+response prefix, closed as the tokenizer closes a full text."""
    ids = list(seq.ids)
    out = []
    for end in range(seq.start, len(ids) + 1):
        prefix = ids[:end]
        if closing and prefix[-len(closing):] != closing:
            prefix = prefix + closing
        out.append(prefix)
    return out


def _prefix_scores(inputs: RewardInputs, progress: bool) -> list[np.ndarray]:
    """``[s_prompt, s_0, ..., s_T-1]`` per sequence by scoring each prefix alone (batched)."""
    closing = _closing_tokens(inputs.tokenizer) if inputs.frame.attrs.get("format") == "text" else []
    flat, owner = [], []
    for i, seq in enumerate(inputs.sequences):
        for prefix in _prefixes(seq, closing):
            flat.append(prefix)
            owner.append(i)
    scores = inputs.runner.scores(
        inputs.model, flat, pad_id=inputs.pad_id, label=inputs.label, batch_tokens=inputs.batch_tokens,
        autocast_dtype=inputs.autocast_dtype, progress=progress, desc="prefix scores",
    )
    bounds = np.cumsum([0] + [s.n_response + 1 for s in inputs.sequences])
    return [scores[bounds[i] : bounds[i + 1]] for i in range(len(inputs.sequences))]


def _shareable(chosen: EncodedSequence, rejected: EncodedSequence) -> bool:
    """Both responses continue one and the same prompt, and neither is empty."""
    start = chosen.start
    return (
        rejected.start == start
        and chosen.n_response > 0
        and rejected.n_response > 0
        and chosen.ids[:start] == rejected.ids[:start]
    )


def _one_pass_scores(inputs: RewardInputs, progress: bool, share_prompt: bool) -> tuple[list[np.ndarray], int]:
    """Prefix scores in one pass per batch, and how many pairs ran their prompt once."""
    seqs = inputs.sequences
    every: list[np.ndarray | None] = [None] * len(seqs)
    settings = dict(
        pad_id=inputs.pad_id, label=inputs.label, batch_tokens=inputs.batch_tokens,
        autocast_dtype=inputs.autocast_dtype, progress=progress,
    )
    shared = []
    longest = max((len(s.ids) for s in seqs), default=0)
    if share_prompt and inputs.kind == "pairs" and not shared_prompt_problem(
        inputs.model, inputs.pad_id, inputs.label, longest
    ):
        shared = [i for i in range(0, len(seqs), 2) if _shareable(seqs[i], seqs[i + 1])]
    if shared:
        groups = [
            (seqs[i].ids[: seqs[i].start], [seqs[i].ids[seqs[i].start :], seqs[i + 1].ids[seqs[i + 1].start :]])
            for i in shared
        ]
        for i, (chosen, rejected) in zip(shared, inputs.runner.shared_prompt_scores(inputs.model, groups, **settings)):
            every[i], every[i + 1] = chosen, rejected
    rest = [i for i in range(len(seqs)) if every[i] is None]
    if rest:
        for i, scores in zip(rest, inputs.runner.position_scores(inputs.model, [seqs[i].ids for i in rest], **settings)):
            every[i] = scores
    # position start-1 is the last prompt token: its score is s_prompt
    return [scores[seq.start - 1 :] for scores, seq in zip(every, seqs)], len(shared)


@with_options(*TOKENIZING, *RUNNING, *LOADING, *CACHING, defaults={"add_eos": None})
def dense_rewards(
    reward_model,
    data,
    *,
    method: str = "auto",
    share_prompt: bool = True,
    label=None,
    options: Options,
) -> pd.DataFrame:
    """Per-token rewards of an explicit reward model: how the score moves with each response token.

    ``s_t`` is the reward model's score of prompt + response tokens ``0..t``; the token reward is
    ``r_t = s_t - s_{t-1}`` with ``s_{-1} = s_prompt`` (the score at the end of the prompt), so the
    rewards of a response sum to ``s_T - s_prompt`` (DESIGN section 3; dense credit assignment as
    in Chan et al. 2024, "Dense Reward for Free in RLHF").

    Args:
        reward_model: an ``AutoModelForSequenceClassification`` or a hub name / local path.
        data: preference pairs, or texts to score one by one, as :func:`rmlab.reward_scores`.
        method: ``"one_pass"`` (causal reward models: the score head at every hidden state, one
            forward pass), ``"prefix"`` (score every prefix alone; works for encoders too) or
            ``"auto"`` (one pass when the model supports it, checked once per model).
        share_prompt: in one pass, run the prompt of a pair once and continue the chosen and the
            rejected response from its KV cache (checked once per model against running each
            sequence whole; models where reusing the cache is not exact run whole sequences).
        tokenizer, label, max_length, truncation_mode, add_eos, batch_tokens, device, dtype,
            progress, chat_template_kwargs, trust_remote_code, revision, use_safetensors, runner:
            as in :func:`rmlab.reward_scores`; ``options``: all of them as one :class:`rmlab.Options`.
        cache_dir: a folder (default: ``$RMLAB_CACHE_DIR`` if set; ``False``: none) for a resumable cache of the prefix scores ``s_t`` (``dense-<key>/``,
            parquet chunks written as groups of a few batches finish, keyed as in
            :func:`rmlab.reward_scores` plus the method; see :mod:`rmlab.cache`). An interrupted
            call resumes where it stopped; a repeated call runs no model. Delete the folder to
            clear it. None (default): no cache.
        overwrite_cache: delete this call's cache entry first and compute everything afresh.

    Returns:
        One row per response token: ``pair`` (or ``row`` for single texts), ``side``
        ("chosen"/"rejected", or "response"), ``position`` (0-based within the response),
        ``token_id``, ``token`` (decoded text), ``prefix_score`` (``s_t``), ``reward`` (``r_t``) and
        ``cum_reward`` (``s_t - s_prompt``, so ``prefix_score - cum_reward`` is ``s_prompt``).
        ``frame.attrs["method"]`` is the method used, ``frame.attrs["shared_prompt_pairs"]`` the
        number of pairs whose prompt ran once (in this call: pairs read from the cache ran none).

    Raises:
        ModelError: ``method="one_pass"`` for a model where it does not hold (an encoder), a causal
            LM or a multi-output head without ``label`` (see :func:`rmlab.reward_scores`).
    """
    check_choice("method", method, METHODS)
    cache_dir = resolve_cache_dir(options.cache_dir, options.overwrite_cache)
    progress, overwrite_cache = options.progress, options.overwrite_cache
    inputs = prepare_reward_inputs(reward_model, data, label=label, options=options)
    if method != "prefix":
        problem = one_pass_problem(inputs.model, inputs.pad_id, inputs.label)
        if problem and method == "one_pass":
            raise ModelError(
                f"method='one_pass' needs a causal reward model whose score head runs at every "
                f"position, but {problem}. Use method='prefix' (or 'auto')."
            )
        method = "prefix" if problem else "one_pass"
    shared = 0
    if cache_dir is not None:
        runs, shared = _cached_runs(inputs, method, share_prompt, cache_dir, overwrite_cache, progress)
    elif method == "one_pass":
        runs, shared = _one_pass_scores(inputs, progress, share_prompt)
    else:
        runs = _prefix_scores(inputs, progress)
    frame = _token_frame(inputs, runs, method)
    frame.attrs["shared_prompt_pairs"] = shared
    return frame


#: A cached dense-rewards run computes this many batches' worth of tokens between saves.
_BATCHES_PER_CHUNK = 8


def _cached_runs(inputs: RewardInputs, method: str, share_prompt: bool, cache_dir, overwrite: bool, progress: bool):
    """``[s_prompt, s_0, ...]`` per sequence as the uncached path computes them, a few batches at a
    time (rows or pairs of similar length together), each group saved to the cache as it finishes.
    Returns the runs and how many pairs ran their prompt once in this call."""
    cache = reward_cache(inputs, cache_dir, "dense", overwrite=overwrite, method=method)
    width = len(inputs.sides)
    seqs = inputs.sequences
    if method == "prefix":  # every prefix is run alone
        cost = [sum(s.start + k for k in range(s.n_response + 1)) for s in seqs]
    else:
        cost = [len(s.ids) for s in seqs]
    items = [sum(cost[i * width : (i + 1) * width]) for i in range(len(seqs) // width)]
    budget = batch_budget(inputs.batch_tokens, model_device(inputs.model)) * _BATCHES_PER_CHUNK
    groups = length_batches(items, budget)
    shared = 0

    def compute(todo: list[int]) -> dict[str, list]:
        nonlocal shared
        part = dataclasses.replace(inputs, sequences=[seqs[i * width + k] for i in todo for k in range(width)])
        if method == "one_pass":
            runs, n_shared = _one_pass_scores(part, False, share_prompt)
            shared += n_shared
        else:
            runs = _prefix_scores(part, False)
        return {side: runs[k::width] for k, side in enumerate(inputs.sides)}

    out = run_cached(
        cache, groups, compute, {side: pa.list_(pa.float64()) for side in inputs.sides},
        progress=progress, desc="dense rewards", unit="pair" if width == 2 else "row",
    )
    runs = [
        np.asarray(out[side][i], dtype=np.float64) for i in range(len(seqs) // width) for side in inputs.sides
    ]
    return runs, shared


def _token_frame(inputs: RewardInputs, runs: list[np.ndarray], method: str) -> pd.DataFrame:
    key = "pair" if inputs.kind == "pairs" else "row"
    counts = np.array([seq.n_response for seq in inputs.sequences])
    width = len(inputs.sides)
    seq_index = np.repeat(np.arange(len(counts)), counts)
    scores = [r[1:] for r in runs]
    frame = pd.DataFrame(
        {
            key: seq_index // width,
            "side": pd.Categorical.from_codes(seq_index % width, categories=list(inputs.sides)),
            "position": np.concatenate([np.arange(n) for n in counts]) if len(counts) else [],
            "token_id": np.fromiter(
                (t for seq in inputs.sequences for t in seq.response_ids), dtype=np.int64, count=int(counts.sum())
            ),
            "prefix_score": np.concatenate(scores),
            "reward": np.concatenate([np.diff(r) for r in runs]),
            "cum_reward": np.concatenate([r[1:] - r[0] for r in runs]),
        }
    )
    frame.insert(4, "token", decode_tokens(inputs.tokenizer, frame["token_id"].to_numpy()))
    frame.attrs.update(method=method, kind=inputs.kind, format=inputs.frame.attrs.get("format"))
    return frame
