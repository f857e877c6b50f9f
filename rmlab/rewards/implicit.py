"""Implicit DPO rewards: per pair and per token (per reasoning step: :mod:`rmlab.rewards.steps`).

A policy trained by DPO defines a reward through its log-ratio to the reference
(Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a Reward
Model"): ``r(x, y) = beta * sum_t [log pi(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t)]``. The summands
are token-level rewards (Rafailov et al. 2024, "From r to Q*"), and their partial sums are the
values of an implicit process reward model (Yuan et al. 2024, "Free Process Rewards without Process
Labels"; PRIME, Cui et al. 2025).

Every function here takes the same keyword arguments (``tokenizer``, ``beta``, ``max_length``,
``truncation_mode``, ``add_eos``, ``batch_tokens``, ``device``, ``dtype``, ``progress``,
``cache_dir``, ``overwrite_cache``) and returns a tidy pandas DataFrame. With ``cache_dir`` the
per-token log-probs of each model are cached on disk as they are computed (:mod:`rmlab.cache`): an
interrupted call resumes, a repeated one reads them back, and every function here shares them.
Numbers match TRL's ``DPOTrainer`` logs for the same models and data.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from rmlab.cache import resolve_cache_dir
from rmlab.engine.model_pair import ModelPair
from rmlab.engine.pairs import PairLogprobs, check_beta
from rmlab.errors import ArgumentError, DataError, check_choice
from rmlab.options import CACHING, LOADING, RUNNING, TOKENIZING, Options, with_options
from rmlab.io.tokenize import decode_tokens

SIDES = ("chosen", "rejected")


def pair_arguments(policy, reference, data):
    """``(policy, reference, data)`` of a pair analysis: with a :class:`rmlab.ModelPair` first, the
    second positional argument is the data (``implicit_rewards(pair, data)``)."""
    if isinstance(policy, ModelPair) and data is None:
        return policy, None, reference
    if data is None:
        raise ArgumentError("data is missing: pass the preference pairs after the policy and the reference.")
    return policy, reference, data


def run_pair_logprobs(policy, reference, data, *, reference_free: bool, options: Options) -> PairLogprobs:
    """Per-token log-probs of every response under the policy and the reference, through a
    :class:`rmlab.ModelPair` (the one given, or one built for this call)."""
    policy, reference, data = pair_arguments(policy, reference, data)
    has_reference = reference is not None or (isinstance(policy, ModelPair) and policy.reference is not None)
    if not has_reference and not reference_free:
        raise ArgumentError(
            "reference=None: implicit DPO rewards are log-ratios to a reference model. Pass the "
            "reference (usually the SFT model the policy started from), or reference_free=True to "
            "score beta * log pi(y|x) alone (SimPO-style)."
        )
    if reference is not None and reference_free:
        raise ArgumentError(
            "reference_free=True ignores the reference model; pass reference=None to make that explicit."
        )
    if isinstance(policy, ModelPair):
        if reference is not None and reference is not policy.reference:
            raise ArgumentError("A ModelPair brings its own reference: pass the data after it, without a reference.")
        return policy.logprobs(data, options=policy.with_call(options), reference=not reference_free)
    resolve_cache_dir(options.cache_dir, options.overwrite_cache)  # a bad cache argument fails first
    return ModelPair(policy, reference, options=options, memory=0).logprobs(data)


def _sum(values: np.ndarray) -> float:
    return float(values.sum(dtype=np.float64)) if len(values) else float("nan")


def _greater(margin: np.ndarray) -> pd.arrays.BooleanArray:
    """``margin > 0`` as a nullable boolean: NA where the margin is NaN (no response token scored)."""
    missing = np.isnan(margin)
    with np.errstate(invalid="ignore"):
        return pd.arrays.BooleanArray(np.where(missing, False, margin > 0), missing)


@with_options(*TOKENIZING, *RUNNING, *LOADING, *CACHING)
def implicit_rewards(
    policy,
    reference,
    data=None,
    *,
    beta: float = 0.1,
    reference_free: bool = False,
    length_normalize: bool = False,
    options: Options,
) -> pd.DataFrame:
    """Implicit DPO rewards, margins and accuracy per preference pair.

    Follows Rafailov et al. 2023 (DPO): ``reward = beta * (log pi(y|x) - log pi_ref(y|x))``, summed
    over response tokens; ``margin = reward_chosen - reward_rejected``; ``correct = margin > 0``
    (strict, as TRL; a nullable boolean, NA where the margin is NaN); ``loss = -log sigmoid(margin)``.
    ``reference_free=True`` scores ``beta * log pi(y|x)``; ``length_normalize=True`` divides by the
    response length (SimPO, Meng et al. 2024, when reference-free).

    Args:
        policy: the DPO-trained model: a ``PreTrainedModel`` or a hub name / local path.
        reference: the reference model (same kinds), or None with ``reference_free=True``.
        data: preference pairs (DataFrame, list of dicts, datasets.Dataset, or a .jsonl/.json/
            .parquet/.csv path) with ``prompt``, ``chosen``, ``rejected``, as text or chat messages.
        tokenizer: the tokenizer of both models (loaded from the policy's path if None).
        beta: DPO's KL coefficient (> 0).
        max_length: truncate prompt+response to this many tokens; pairs that lose any token (of a
            response, or with ``keep_end`` of the prompt) get ``truncated=True``.
        truncation_mode: ``"keep_start"`` (TRL's default) or ``"keep_end"``.
        add_eos: append EOS to plain-text responses that lack it (TRL's default).
        batch_tokens: padded tokens per forward pass (default 2048 on CPU, 32768 on CUDA).
        device: ``"auto"`` (CUDA if present), ``"cpu"``, ``"cuda"``...
        dtype: ``"auto"`` (bf16 on CUDA, fp32 on CPU) or an explicit dtype.
        progress: show progress bars (pairs already cached count as done).
        cache_dir: a folder (default: ``$RMLAB_CACHE_DIR`` if set; ``False``: none) for a
            resumable cache of the per-token log-probs (one entry per model:
            ``logprobs-<key>/``, parquet chunks written as batches finish, keyed by the model's
            weights, the tokenizer, the token ids scored, the device type and compute dtype; see
            :mod:`rmlab.cache`). An interrupted call resumes where it stopped; a repeated call
            runs no model. Rewards are derived from the cached log-probs, so another ``beta``,
            ``reference_free`` or ``length_normalize`` reuses the cache, and so does another policy
            scored against the same reference. Delete the folder to clear it. None (default): no
            cache.
        overwrite_cache: delete this call's cache entries first and compute everything afresh.
        chat_template_kwargs, trust_remote_code, revision, use_safetensors, runner: see
            :class:`rmlab.Options`.
        options: all of the above as one :class:`rmlab.Options` (flat keywords override it).

    ``policy`` may be a :class:`rmlab.ModelPair` (then ``implicit_rewards(pair, data, ...)``): its
    models stay loaded and its log-probs are reused by every later analysis of the same data.

    Returns:
        One row per pair: ``pair``, ``logps_chosen``, ``logps_rejected``, ``ref_logps_chosen``,
        ``ref_logps_rejected`` (NaN when reference-free), ``reward_chosen``, ``reward_rejected``,
        ``margin``, ``correct``, ``loss``, ``tokens_chosen``, ``tokens_rejected`` (scored response
        tokens), ``prompt_tokens``, ``truncated``, then ``prompt``, ``chosen``, ``rejected`` and every
        other column of the input. A response truncated to nothing (its prompt fills ``max_length``)
        has no scored token: NaN log-probs and rewards, so NaN ``margin`` and ``loss`` and NA
        ``correct``, never a number that claims a result (TRL 1.16 drops such pairs before training;
        :func:`dpo_metrics` leaves them out the same way, or scores them as older TRL did).

    Example:
        >>> import rmlab
        >>> from rmlab.toy import tiny_causal_lm, tiny_tokenizer
        >>> tok = tiny_tokenizer()
        >>> policy, ref = tiny_causal_lm("gpt2", seed=1), tiny_causal_lm("gpt2", seed=0)
        >>> pairs = [{"prompt": "Review:", "chosen": " great film", "rejected": " dull film"}]
        >>> frame = rmlab.implicit_rewards(policy, ref, pairs, tokenizer=tok, progress=False)
        >>> list(frame.columns[:4])
        ['pair', 'logps_chosen', 'logps_rejected', 'ref_logps_chosen']
    """
    beta = check_beta(beta)
    lp = run_pair_logprobs(policy, reference, data, reference_free=reference_free, options=options)
    n = len(lp.encoded)
    cols: dict[str, np.ndarray] = {"pair": np.arange(n)}
    for side in SIDES:
        logps = np.array([_sum(lp.side(side, i)) for i in range(n)])
        tokens = np.array([len(lp.side(side, i)) for i in range(n)])
        ref = (
            np.array([_sum(lp.side(side, i, "reference")) for i in range(n)])
            if lp.reference is not None
            else np.full(n, np.nan)
        )
        score = logps if reference_free else logps - ref
        if length_normalize:
            with np.errstate(invalid="ignore", divide="ignore"):
                score = score / np.where(tokens > 0, tokens, np.nan)
        cols[f"logps_{side}"] = logps
        cols[f"ref_logps_{side}"] = ref
        cols[f"reward_{side}"] = beta * score
        cols[f"tokens_{side}"] = tokens
    frame = pd.DataFrame(cols)
    frame = frame[
        ["pair", "logps_chosen", "logps_rejected", "ref_logps_chosen", "ref_logps_rejected",
         "reward_chosen", "reward_rejected", "tokens_chosen", "tokens_rejected"]
    ]
    frame.insert(7, "margin", frame["reward_chosen"] - frame["reward_rejected"])
    frame.insert(8, "correct", _greater(frame["margin"].to_numpy()))
    with np.errstate(invalid="ignore"):  # NaN margins (responses truncated to nothing) stay NaN
        frame.insert(9, "loss", np.logaddexp(0.0, -frame["margin"].to_numpy()))  # -log sigmoid(margin)
    frame["prompt_tokens"] = [p.prompt_tokens for p in lp.encoded]
    frame["truncated"] = [p.truncated for p in lp.encoded]
    frame = pd.concat([frame, lp.pairs.reset_index(drop=True)], axis=1)
    frame.attrs.update(
        beta=beta, reference_free=reference_free, length_normalize=length_normalize,
        format=lp.pairs.attrs.get("format"),
    )
    return frame


def dpo_metrics(frame: pd.DataFrame, *, empty_responses: str = "drop") -> pd.Series:
    """The aggregate metrics TRL's ``DPOTrainer`` logs, from an :func:`implicit_rewards` frame.

    Follows TRL's ``DPOTrainer`` (its sigmoid loss, Rafailov et al. 2023): ``rewards/chosen``,
    ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies`` (share of pairs with
    ``reward_chosen > reward_rejected``), ``logps/chosen``, ``logps/rejected`` and ``loss``
    (``-log sigmoid(margin)``), means over pairs as TRL computes them for one evaluation batch; then
    ``pairs`` (rows of the frame), ``pairs_scored`` (the pairs in those means) and ``truncated``
    (share of pairs that lost tokens to ``max_length``).

    Args:
        frame: a frame from :func:`implicit_rewards`.
        empty_responses: what to do with a pair whose response was truncated to nothing (with
            ``keep_start``, a prompt that fills ``max_length``; NaN rewards in the frame).
            ``"drop"`` (default) leaves it out of the means, as TRL 1.16 does: it drops such pairs
            from the dataset before training and evaluation, so its logs are means over the same
            pairs. ``"zero"`` scores it as TRL's loss does when such a pair reaches it (TRL before
            that filter, or a custom collator): the log-prob sum over no token is 0, so the empty
            side's reward is 0, a pair empty on both sides has margin 0 and loss ``log 2``, and a
            tie counts as not accurate.
    """
    check_choice("empty_responses", empty_responses, ("drop", "zero"))
    needed = ["reward_chosen", "reward_rejected", "margin", "correct", "logps_chosen", "logps_rejected"]
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise DataError(f"dpo_metrics needs a frame from rmlab.implicit_rewards; it lacks {missing}.")
    if empty_responses == "drop":
        f = frame[frame["margin"].notna()]
        rewards = {side: f[f"reward_{side}"].to_numpy(np.float64) for side in SIDES}
        logps = {side: f[f"logps_{side}"].to_numpy(np.float64) for side in SIDES}
        correct = f["correct"].astype(float).to_numpy()
    else:
        rewards, logps = {}, {}
        for side in SIDES:
            count = f"tokens_{side}"
            empty = (frame[count] == 0) if count in frame else frame[f"reward_{side}"].isna()
            rewards[side] = frame[f"reward_{side}"].mask(empty, 0.0).to_numpy(np.float64)
            logps[side] = frame[f"logps_{side}"].mask(empty, 0.0).to_numpy(np.float64)
        correct = (rewards["chosen"] > rewards["rejected"]).astype(float)
    margin = rewards["chosen"] - rewards["rejected"]
    return pd.Series(
        {
            "rewards/chosen": np.mean(rewards["chosen"]) if len(margin) else np.nan,
            "rewards/rejected": np.mean(rewards["rejected"]) if len(margin) else np.nan,
            "rewards/margins": np.mean(margin) if len(margin) else np.nan,
            "rewards/accuracies": np.mean(correct) if len(margin) else np.nan,
            "logps/chosen": np.mean(logps["chosen"]) if len(margin) else np.nan,
            "logps/rejected": np.mean(logps["rejected"]) if len(margin) else np.nan,
            "loss": np.mean(np.logaddexp(0.0, -margin)) if len(margin) else np.nan,  # -log sigmoid(margin)
            "pairs": float(len(frame)),
            "pairs_scored": float(len(margin)),
            "truncated": float(frame["truncated"].mean()) if "truncated" in frame else 0.0,
        },
        name="dpo_metrics",
    )


def token_table(lp: PairLogprobs, beta: float, reference_free: bool) -> pd.DataFrame:
    """The long per-token frame shared by :func:`token_rewards` and :func:`rmlab.step_rewards`."""
    parts = []
    for i, pair in enumerate(lp.encoded):
        for side in SIDES:
            seq = getattr(pair, side)
            logp = lp.side(side, i).astype(np.float64)
            ref = (
                lp.side(side, i, "reference").astype(np.float64)
                if lp.reference is not None
                else np.full(len(logp), np.nan)
            )
            reward = beta * (logp if reference_free else logp - ref)
            ids = np.asarray(seq.response_ids, dtype=np.int64)
            parts.append(
                pd.DataFrame(
                    {
                        "pair": i,
                        "side": side,
                        "position": np.arange(len(ids)),
                        "token_id": ids,
                        "logp": logp,
                        "ref_logp": ref,
                        "reward": reward,
                        "cum_reward": np.cumsum(reward),
                    }
                )
            )
    frame = pd.concat(parts, ignore_index=True)
    frame.insert(4, "token", decode_tokens(lp.tokenizer, frame["token_id"].to_numpy()))
    frame["side"] = pd.Categorical(frame["side"], categories=list(SIDES))
    return frame


@with_options(*TOKENIZING, *RUNNING, *LOADING, *CACHING)
def token_rewards(
    policy, reference, data=None, *, beta: float = 0.1, reference_free: bool = False, options: Options
) -> pd.DataFrame:
    """Token-level implicit rewards ``r_t = beta * (log pi(y_t|.) - log pi_ref(y_t|.))``.

    Follows Rafailov et al. 2024 ("From r to Q*: Your Language Model is Secretly a Q-Function"):
    a DPO policy's log-ratio at each token is a dense reward whose sum is the sequence reward of
    :func:`implicit_rewards`. Arguments as in :func:`implicit_rewards` (``cache_dir`` caches the
    per-token log-probs, shared with :func:`implicit_rewards` and :func:`rmlab.step_rewards`).

    Returns:
        One row per scored response token: ``pair``, ``side`` ("chosen"/"rejected"), ``position``
        (0-based within the response), ``token_id``, ``token`` (decoded text), ``logp``, ``ref_logp``,
        ``reward`` and ``cum_reward`` (running sum within the response). Summing ``reward`` per pair
        and side gives ``reward_chosen`` / ``reward_rejected`` of :func:`implicit_rewards`.
    """
    beta = check_beta(beta)
    lp = run_pair_logprobs(policy, reference, data, reference_free=reference_free, options=options)
    frame = token_table(lp, beta, reference_free)
    frame.attrs.update(beta=beta, reference_free=reference_free)
    return frame
