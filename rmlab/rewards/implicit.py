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
import pyarrow as pa

from rmlab.cache import (
    ChunkCache,
    compute_dtype,
    resolve_cache_dir,
    run_cached,
    sequences_digest,
    tokenizer_digest,
    weights_digest,
)
from rmlab.engine.batching import default_batch_tokens, length_batches
from rmlab.engine.logprobs import token_logprobs
from rmlab.engine.pairs import PairInputs, PairLogprobs, check_beta, pair_logprobs, prepare_pair_inputs
from rmlab.errors import ArgumentError, DataError, check_choice
from rmlab.io.tokenize import decode_tokens

_SIDES = ("chosen", "rejected")


def _run(
    policy, reference, data, *, reference_free: bool, cache_dir=None, overwrite_cache: bool = False,
    progress: bool = True, **kwargs,
) -> PairLogprobs:
    if reference is None and not reference_free:
        raise ArgumentError(
            "reference=None: implicit DPO rewards are log-ratios to a reference model. Pass the "
            "reference (usually the SFT model the policy started from), or reference_free=True to "
            "score beta * log pi(y|x) alone (SimPO-style)."
        )
    if reference is not None and reference_free:
        raise ArgumentError(
            "reference_free=True ignores the reference model; pass reference=None to make that explicit."
        )
    cache_dir = resolve_cache_dir(cache_dir, overwrite_cache)
    if cache_dir is None:
        return pair_logprobs(policy, reference, data, progress=progress, **kwargs)
    inputs = prepare_pair_inputs(policy, reference, data, **kwargs)
    runs = {
        role: cached_logprobs(inputs, model, role, cache_dir, overwrite=overwrite_cache, progress=progress)
        for role, model in (("policy", inputs.policy), ("reference", inputs.reference))
        if model is not None
    }
    return PairLogprobs(
        pairs=inputs.pairs, encoded=inputs.encoded, policy=runs["policy"], reference=runs.get("reference"),
        tokenizer=inputs.tokenizer,
    )


#: Bump when a change to the engine changes the log-probs it computes (invalidates caches).
LOGPROBS_VERSION = 1

_FLOATS = pa.list_(pa.float32())


def cached_logprobs(
    inputs: PairInputs, model, role: str, cache_dir, *, overwrite: bool = False, progress: bool = True
) -> list[np.ndarray]:
    """:func:`rmlab.engine.pairs.run_logprobs` with a resumable cache in ``cache_dir``.

    The entry ``logprobs-<key>`` holds, per pair, the per-token log-probs of the chosen and the
    rejected response under ``model`` (float32, exactly as the engine returns them); its key is the
    model's weights, the tokenizer, the token ids of every sequence (and where its response starts),
    the device type and the compute dtype (see :mod:`rmlab.cache`). It depends on nothing else, so a
    reference model's entry serves every policy scored against it, and ``beta`` never enters it.
    The engine runs batch by batch on the same length-bucketed batches as without a cache, so the
    numbers are the same as an uncached call's; finished pairs are saved in chunks as they finish.
    """
    device = next(model.parameters()).device
    autocast = inputs.autocast_dtype(model)
    seqs = inputs.sequences
    meta = {
        "kind": "per-token log-probs of chosen and rejected responses",
        "version": LOGPROBS_VERSION,
        "model": weights_digest(model),
        "model_class": type(model).__name__,
        "tokenizer": tokenizer_digest(inputs.tokenizer),
        "sequences": sequences_digest((s.ids for s in seqs), (s.start for s in seqs)),
        "pairs": len(inputs.encoded),
        "device": device.type,
        "compute_dtype": compute_dtype(model, autocast),
    }
    cache = ChunkCache(cache_dir, "logprobs", meta, overwrite=overwrite)
    budget = inputs.batch_tokens or default_batch_tokens(device)
    lengths = [max(len(p.chosen.ids), len(p.rejected.ids)) for p in inputs.encoded]
    batches = length_batches(lengths, budget, width=2)  # exactly the engine's batches

    def compute(todo: list[int]) -> dict[str, list]:
        values = token_logprobs(
            model,
            [s for i in todo for s in (seqs[2 * i], seqs[2 * i + 1])],
            groups=[[2 * k, 2 * k + 1] for k in range(len(todo))],
            batch_tokens=inputs.batch_tokens,
            pad_id=inputs.pad_id,
            autocast_dtype=autocast,
            progress=False,
        )
        return {"chosen": values[0::2], "rejected": values[1::2]}

    out = run_cached(
        cache, batches, compute, {"chosen": _FLOATS, "rejected": _FLOATS},
        progress=progress, desc=f"{role} log-probs", unit="pair",
    )
    return [
        np.asarray(v, dtype=np.float32) for pair in zip(out["chosen"], out["rejected"]) for v in pair
    ]



def _sum(values: np.ndarray) -> float:
    return float(values.sum(dtype=np.float64)) if len(values) else float("nan")


def _greater(margin: np.ndarray) -> pd.arrays.BooleanArray:
    """``margin > 0`` as a nullable boolean: NA where the margin is NaN (no response token scored)."""
    missing = np.isnan(margin)
    with np.errstate(invalid="ignore"):
        return pd.arrays.BooleanArray(np.where(missing, False, margin > 0), missing)


def implicit_rewards(
    policy,
    reference,
    data,
    *,
    tokenizer=None,
    beta: float = 0.1,
    reference_free: bool = False,
    length_normalize: bool = False,
    max_length: int | None = None,
    truncation_mode: str = "keep_start",
    add_eos: bool = True,
    batch_tokens: int | None = None,
    device="auto",
    dtype="auto",
    progress: bool = True,
    cache_dir=None,
    overwrite_cache: bool = False,
    **kwargs,
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
        **kwargs: ``chat_template_kwargs``, ``trust_remote_code``.

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
    lp = _run(
        policy,
        reference,
        data,
        reference_free=reference_free,
        tokenizer=tokenizer,
        max_length=max_length,
        truncation_mode=truncation_mode,
        add_eos=add_eos,
        batch_tokens=batch_tokens,
        device=device,
        dtype=dtype,
        progress=progress,
        cache_dir=cache_dir,
        overwrite_cache=overwrite_cache,
        **kwargs,
    )
    n = len(lp.encoded)
    cols: dict[str, np.ndarray] = {"pair": np.arange(n)}
    for side in _SIDES:
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
        rewards = {side: f[f"reward_{side}"].to_numpy(np.float64) for side in _SIDES}
        logps = {side: f[f"logps_{side}"].to_numpy(np.float64) for side in _SIDES}
        correct = f["correct"].astype(float).to_numpy()
    else:
        rewards, logps = {}, {}
        for side in _SIDES:
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


def _token_table(lp: PairLogprobs, beta: float, reference_free: bool) -> pd.DataFrame:
    """The long per-token frame shared by :func:`token_rewards` and :func:`rmlab.step_rewards`."""
    parts = []
    for i, pair in enumerate(lp.encoded):
        for side in _SIDES:
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
    frame["side"] = pd.Categorical(frame["side"], categories=list(_SIDES))
    return frame


def token_rewards(
    policy,
    reference,
    data,
    *,
    tokenizer=None,
    beta: float = 0.1,
    reference_free: bool = False,
    max_length: int | None = None,
    truncation_mode: str = "keep_start",
    add_eos: bool = True,
    batch_tokens: int | None = None,
    device="auto",
    dtype="auto",
    progress: bool = True,
    cache_dir=None,
    overwrite_cache: bool = False,
    **kwargs,
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
    lp = _run(
        policy, reference, data, reference_free=reference_free, tokenizer=tokenizer,
        max_length=max_length, truncation_mode=truncation_mode, add_eos=add_eos,
        batch_tokens=batch_tokens, device=device, dtype=dtype, progress=progress, cache_dir=cache_dir,
        overwrite_cache=overwrite_cache, **kwargs,
    )
    frame = _token_table(lp, beta, reference_free)
    frame.attrs.update(beta=beta, reference_free=reference_free)
    return frame
