"""Diagnostics of preference data: preference strength from a reward-model ensemble, ranking accuracy.

- :func:`preference_strength` (Wang et al. 2024, "Secrets of RLHF in Large Language Models Part II:
  Reward Modeling"): score every pair with several reward models; the mean of their margins is the
  pair's preference strength and its spread their disagreement. Strongly negative pairs are likely
  mislabelled, pairs near zero ambiguous.
- :func:`ranking_accuracy` (Chen et al. 2024, "Preference Learning Algorithms Do Not Learn
  Preference Rankings"): how often a policy (and its reference) gives the chosen response a higher
  likelihood than the rejected one, against the idealised ranking accuracy of the exact optimum of
  the DPO / RLHF objective.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from rmlab.engine.pairs import check_beta
from rmlab.diagnostics.probabilities import probability_column
from rmlab.engine.reward_model import prepare_reward_inputs
from rmlab.errors import ArgumentError, DataError, closest
from rmlab.io.pairs import load_pairs
from rmlab.options import CACHING, LOADING, RUNNING, TOKENIZING, Options, with_options
from rmlab.rewards.implicit import implicit_rewards
from rmlab.rewards.scores import reward_scores


# --------------------------------------------------------------------------------------------------
# preference strength
# --------------------------------------------------------------------------------------------------
def _check_threshold(name: str, value) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if isinstance(value, bool) or not math.isfinite(number) or number < 0:
        raise ArgumentError(f"{name}={value!r} must be a finite number >= 0 (0 turns the flag's rule off).")
    return number


def _as_model_list(reward_models) -> list:
    if isinstance(reward_models, (str, os.PathLike, torch.nn.Module)) or not isinstance(
        reward_models, (list, tuple)
    ):
        raise ArgumentError(
            f"reward_models must be a list of reward models (or names/paths), not a "
            f"{type(reward_models).__name__}: preference strength needs an ensemble, e.g. "
            "[rm_seed0, rm_seed1, rm_seed2]."
        )
    models = list(reward_models)
    if len(models) < 2:
        raise ArgumentError(
            f"reward_models has {len(models)} model(s); preference strength is the mean and spread of an "
            "ensemble's margins, so it needs at least 2 (Wang et al. 2024 use 10, trained with different "
            "seeds or data orders). With a single reward model, rank pairs by the margin of "
            "rmlab.reward_scores instead."
        )
    return models


def _tokenizers(tokenizer, models: list) -> list:
    """One tokenizer (or None: the model's own) per model."""
    if isinstance(tokenizer, (list, tuple)):
        if len(tokenizer) != len(models):
            raise ArgumentError(
                f"tokenizer is a list of {len(tokenizer)} but there are {len(models)} reward models; pass "
                "one tokenizer for all of them, or one per model in the same order."
            )
        return list(tokenizer)
    return [tokenizer] * len(models)


@with_options(*(n for n in TOKENIZING if n != "tokenizer"), *RUNNING, *LOADING, *CACHING, defaults={"add_eos": None})
def preference_strength(
    reward_models,
    data,
    *,
    tokenizer=None,
    mislabel_threshold: float = 1.0,
    ambiguous_threshold: float = 0.1,
    label=None,
    options: Options,
) -> pd.DataFrame:
    """Preference strength of every pair from an ensemble of reward models, with suspect pairs flagged.

    Follows Wang et al. 2024 ("Secrets of RLHF in Large Language Models Part II: Reward Modeling",
    section 2): with M reward models, a pair's preference strength is the mean over models of
    ``r_k(x, y_chosen) - r_k(x, y_rejected)`` and its uncertainty the (population) standard deviation
    of those M margins. A clearly negative mean means the ensemble prefers the rejected response (the
    label is likely wrong); a mean near zero means the pair carries little preference (ambiguous).

    Flag rules (each threshold 0 turns its rule off):

    - ``ambiguous``: ``|strength_mean| < ambiguous_threshold * spread``, where ``spread`` is the
      population standard deviation of ``strength_mean`` over all pairs of ``data`` (so the rule does
      not depend on the reward models' scale). Default 0.1.
    - ``likely_mislabelled``: ``strength_mean < 0`` and ``|strength_mean| > mislabel_threshold *
      strength_std`` and not ambiguous: the ensemble prefers the rejected response by more than
      ``mislabel_threshold`` of its own standard deviations, i.e. its members agree on it. Default 1.

    The flags are disjoint. To rank instead of flag, sort by ``strength_mean``: ascending order lists
    the most suspect pairs first (``frame.sort_values("strength_mean").head(k)``), which is how Wang et
    al. split data into strength deciles.

    Args:
        reward_models: a list (or tuple) of >= 2 reward models (``AutoModelForSequenceClassification``
            with one score) or hub names / local paths. A single model is refused (an ensemble is
            needed for a spread); rank by the margin of :func:`rmlab.reward_scores` instead.
        data: preference pairs in any form :func:`rmlab.load_pairs` accepts.
        tokenizer: one tokenizer for every model, one per model (a list), or None to load each model's
            own from its path (or to use ``options.tokenizer``).
        mislabel_threshold: see the flag rules (>= 0).
        ambiguous_threshold: see the flag rules (>= 0).
        label: which output of a multi-output head is the reward, as in :func:`rmlab.reward_scores`.
        progress: show progress bars (one per model, over batches).
        max_length, truncation_mode, add_eos, chat_template_kwargs, batch_tokens, device, dtype,
            runner, trust_remote_code, revision, use_safetensors, cache_dir, overwrite_cache: how
            every model scores, as in :func:`rmlab.reward_scores` (``add_eos=None``, the default:
            EOS unless the tokenizer closes texts itself).
        options: all of the above but ``tokenizer`` as one :class:`rmlab.Options` (flat keywords
            override it).

    Returns:
        One row per pair: ``pair``, ``strength_mean``, ``strength_std``, ``margin_0`` ...
        ``margin_{M-1}`` (each model's ``score_chosen - score_rejected``), ``likely_mislabelled``,
        ``ambiguous``, ``truncated`` (any model truncated the pair), then the input's columns
        (``prompt``, ``chosen``, ``rejected``, ...). ``frame.attrs`` holds ``reward_models`` (M),
        ``mislabel_threshold``, ``ambiguous_threshold`` and ``strength_spread``.

    Raises:
        ArgumentError: fewer than 2 models, not a list, a negative threshold, an unknown keyword.
        DataError: bad preference data. ModelError: an entry is not a sequence classifier (or has
        several outputs and no ``label``). TokenizerError: a model without a tokenizer, or one that
        does not fit it. All raised for every model before the first one scores.

    Example:
        >>> from rmlab.toy import load
        >>> world = load()  # doctest: +SKIP
        >>> strength = preference_strength(world.reward_models, world.heldout)  # doctest: +SKIP
        >>> strength.sort_values("strength_mean").head(10)  # the ten most suspect pairs  # doctest: +SKIP
    """
    models = _as_model_list(reward_models)
    mislabel_threshold = _check_threshold("mislabel_threshold", mislabel_threshold)
    ambiguous_threshold = _check_threshold("ambiguous_threshold", ambiguous_threshold)
    tokenizers = _tokenizers(options.tokenizer if tokenizer is None else tokenizer, models)
    pairs = load_pairs(data)
    # every model, tokenizer and label is checked (and every path loaded) before the first one scores
    prepared = []
    for k, (model, tok) in enumerate(zip(models, tokenizers)):
        inputs = prepare_reward_inputs(
            model, pairs, label=label, role=f"reward model {k}", options=options.replace(tokenizer=tok)
        )
        prepared.append((inputs.model, inputs.tokenizer))

    margins = np.empty((len(pairs), len(models)), dtype=np.float64)
    truncated = np.zeros(len(pairs), dtype=bool)
    for k in tqdm(range(len(models)), desc="reward models", disable=not options.progress, leave=False):
        model, tok = prepared[k]
        scores = reward_scores(model, pairs, label=label, options=options.replace(tokenizer=tok))
        margins[:, k] = scores["score_chosen"].to_numpy(np.float64) - scores["score_rejected"].to_numpy(np.float64)
        if "truncated" in scores.columns:
            truncated |= scores["truncated"].to_numpy(bool)

    mean = margins.mean(axis=1)
    std = margins.std(axis=1, ddof=0)
    spread = float(mean.std(ddof=0))
    ambiguous = np.abs(mean) < ambiguous_threshold * spread
    mislabelled = (mean < 0) & (-mean > mislabel_threshold * std) & ~ambiguous

    frame = pd.DataFrame({"pair": np.arange(len(pairs)), "strength_mean": mean, "strength_std": std})
    for k in range(len(models)):
        frame[f"margin_{k}"] = margins[:, k]
    frame["likely_mislabelled"] = mislabelled
    frame["ambiguous"] = ambiguous
    frame["truncated"] = truncated
    frame = pd.concat([frame, pairs.reset_index(drop=True)], axis=1)
    frame.attrs.update(
        reward_models=len(models), mislabel_threshold=mislabel_threshold,
        ambiguous_threshold=ambiguous_threshold, strength_spread=spread,
    )
    return frame


# --------------------------------------------------------------------------------------------------
# ranking accuracy
# --------------------------------------------------------------------------------------------------
def _preference_probs(pairs: pd.DataFrame, prob_column) -> tuple[np.ndarray | None, str | None]:
    """The true preference probabilities, validated, or (None, note) when there are none."""
    if prob_column is None:
        return None, "prob_column=None: no idealised ranking accuracy was computed."
    if prob_column not in pairs.columns:
        if prob_column == "true_prob":  # the default: data without known probabilities are normal
            return None, (
                "The data have no 'true_prob' column, so idealised_correct is NA; pass "
                "prob_column='<column>' holding P(chosen preferred) per pair (e.g. the fraction of raters "
                "who chose it) to get the idealised ranking accuracy."
            )
        raise DataError(
            f"prob_column={prob_column!r} is not a column of the data; found {list(pairs.columns)}."
            + closest(prob_column, pairs.columns)
        )
    values = probability_column(
        pairs, prob_column, "It must hold P(chosen is preferred) for every pair; drop or fix those rows, or "
        "pass prob_column=None to skip the idealised ranking accuracy.",
    )
    return values, None


def _greater(diff: np.ndarray) -> pd.arrays.BooleanArray:
    """``diff > 0`` as a nullable boolean array: NA where ``diff`` is NaN (nothing to compare)."""
    missing = np.isnan(diff)
    with np.errstate(invalid="ignore"):
        return pd.arrays.BooleanArray(np.where(missing, False, diff > 0), missing)


def ranking_summary(frame: pd.DataFrame) -> pd.Series:
    """Aggregate ranking accuracies of a :func:`ranking_accuracy` frame (Chen et al. 2024).

    Returns a Series with ``ranking_accuracy`` (policy), ``reference_ranking_accuracy``,
    ``idealised_ranking_accuracy`` (NaN without preference probabilities), ``alignment_gap`` (idealised
    minus policy, as Chen et al. define it) and ``pairs``. Pairs whose comparison is undefined (a
    response truncated to nothing) are left out of each mean.
    """
    needed = ["policy_correct", "reference_correct", "idealised_correct"]
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise DataError(f"ranking_summary needs a frame from rmlab.diagnostics.ranking_accuracy; it lacks {missing}.")

    def rate(column):
        values = frame[column].astype("boolean")
        return float(values.mean()) if values.notna().any() else float("nan")

    policy, reference, ideal = rate("policy_correct"), rate("reference_correct"), rate("idealised_correct")
    return pd.Series(
        {
            "ranking_accuracy": policy,
            "reference_ranking_accuracy": reference,
            "idealised_ranking_accuracy": ideal,
            "alignment_gap": ideal - policy,
            "pairs": float(len(frame)),
        },
        name="ranking_accuracy",
    )


@with_options(*TOKENIZING, *RUNNING, *LOADING, *CACHING)
def ranking_accuracy(
    policy,
    reference,
    data,
    *,
    beta: float = 0.1,
    prob_column: str | None = "true_prob",
    length_normalize: bool = False,
    options: Options,
) -> pd.DataFrame:
    """Ranking accuracy of a policy, of its reference, and the idealised ranking accuracy, per pair.

    Follows Chen et al. 2024 ("Preference Learning Algorithms Do Not Learn Preference Rankings"):
    the ranking accuracy is ``mean[pi(y_w|x) > pi(y_l|x)]`` (with ``length_normalize=True`` the
    per-token mean log-probs are compared). The idealised ranking accuracy is that of the exact optimum
    of the DPO / RLHF objective with KL coefficient ``beta``, whose likelihood ratio is
    ``pi*(y_w)/pi*(y_l) = [pi_ref(y_w)/pi_ref(y_l)] * (p/(1-p))^(1/beta)`` (their Theorem 3.1), ``p`` the
    true probability that ``y_w`` is preferred; computed in log space:
    ``log pi_ref(y_w) - log pi_ref(y_l) + log(p/(1-p))/beta > 0`` (p = 1 or 0 give +/-inf, fine). It
    always compares summed (not length-normalised) log-probs: the optimum is defined on sequences.
    The difference idealised - observed is their "alignment gap".

    The log-probs come from one run of :func:`rmlab.implicit_rewards`, so the tokenisation is
    identical to the rest of rmlab (and to TRL's ``DPOTrainer``).

    Args:
        policy: the trained policy (model or name/path).
        reference: its reference (SFT) model; required.
        data: preference pairs in any form :func:`rmlab.load_pairs` accepts.
        tokenizer: the tokenizer of both models (loaded from the policy's path if None).
        beta: the KL coefficient of the idealised optimum (> 0); usually the beta DPO was trained with.
        prob_column: column holding ``p = P(chosen preferred)`` per pair (e.g. the fraction of
            annotators who preferred it). If the default ``"true_prob"`` is absent, idealised
            columns are NA and ``frame.attrs["note"]`` says why; a named column that is absent is a
            DataError; None skips the idealised accuracy.
        length_normalize: compare mean per-token log-probs instead of sums (policy and reference).
        progress: show progress bars.
        max_length, truncation_mode, add_eos, chat_template_kwargs, batch_tokens, device, dtype,
            runner, trust_remote_code, revision, use_safetensors, cache_dir, overwrite_cache: as in
            :func:`rmlab.implicit_rewards`, which computes the log-probs.
        options: all of the above (and ``tokenizer``) as one :class:`rmlab.Options` (flat keywords
            override it).

    Returns:
        One row per pair: ``pair``, ``logps_chosen``, ``logps_rejected``, ``ref_logps_chosen``,
        ``ref_logps_rejected``, ``tokens_chosen``, ``tokens_rejected``, ``policy_log_ratio`` and
        ``reference_log_ratio`` (``log pi(y_w|x) - log pi(y_l|x)``, or the difference of per-token means
        when length-normalised), ``idealised_log_ratio`` (``log pi*(y_w) - log pi*(y_l)``),
        ``policy_correct``, ``reference_correct``, ``idealised_correct`` (nullable booleans: ``log_ratio
        > 0``, NA where undefined), ``truncated``, then the input's columns. The aggregate
        (:func:`ranking_summary` of the frame) is in ``frame.attrs["summary"]``; ``frame.attrs`` also
        holds ``beta``, ``length_normalize``, ``prob_column`` and ``note`` (or None).

    Raises:
        ArgumentError: ``reference`` is None, beta <= 0, an unknown keyword. DataError: bad pairs, or a
        preference probability that is missing, non-numeric or outside [0, 1] (naming the row).
        ModelError / TokenizerError as :func:`rmlab.implicit_rewards`. All before any model runs.

    Example:
        >>> from rmlab.toy import load
        >>> world = load()  # doctest: +SKIP
        >>> frame = ranking_accuracy(world.dpo[0.1], world.sft, world.heldout, beta=0.1)  # doctest: +SKIP
        >>> frame.attrs["summary"]  # doctest: +SKIP
    """
    beta = check_beta(beta)
    if reference is None:
        raise ArgumentError(
            "reference=None: ranking accuracy compares the policy with its reference model, and the "
            "idealised ranking accuracy is defined by the reference's likelihoods. Pass the reference "
            "(usually the SFT model the policy started from)."
        )
    if not isinstance(length_normalize, (bool, np.bool_)):
        raise ArgumentError(f"length_normalize={length_normalize!r} must be True or False.")
    pairs = load_pairs(data)
    probs, note = _preference_probs(pairs, prob_column)

    rewards = implicit_rewards(policy, reference, pairs, beta=beta, options=options)
    logps = {c: rewards[c].to_numpy(np.float64) for c in
             ("logps_chosen", "logps_rejected", "ref_logps_chosen", "ref_logps_rejected")}
    tokens_c = rewards["tokens_chosen"].to_numpy(np.float64)
    tokens_r = rewards["tokens_rejected"].to_numpy(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        if length_normalize:
            size_c = np.where(tokens_c > 0, tokens_c, np.nan)
            size_r = np.where(tokens_r > 0, tokens_r, np.nan)
            policy_ratio = logps["logps_chosen"] / size_c - logps["logps_rejected"] / size_r
            reference_ratio = logps["ref_logps_chosen"] / size_c - logps["ref_logps_rejected"] / size_r
        else:
            policy_ratio = logps["logps_chosen"] - logps["logps_rejected"]
            reference_ratio = logps["ref_logps_chosen"] - logps["ref_logps_rejected"]
        if probs is not None:
            log_odds = np.log(probs) - np.log1p(-probs)  # +inf at p = 1, -inf at p = 0
            ideal_ratio = (logps["ref_logps_chosen"] - logps["ref_logps_rejected"]) + log_odds / beta
        else:
            ideal_ratio = np.full(len(rewards), np.nan)

    frame = pd.DataFrame({"pair": rewards["pair"].to_numpy()})
    for column, values in logps.items():
        frame[column] = values
    frame["tokens_chosen"] = rewards["tokens_chosen"].to_numpy()
    frame["tokens_rejected"] = rewards["tokens_rejected"].to_numpy()
    frame["policy_log_ratio"] = policy_ratio
    frame["reference_log_ratio"] = reference_ratio
    frame["idealised_log_ratio"] = ideal_ratio
    frame["policy_correct"] = _greater(policy_ratio)
    frame["reference_correct"] = _greater(reference_ratio)
    frame["idealised_correct"] = _greater(ideal_ratio)
    frame["truncated"] = rewards["truncated"].to_numpy()
    frame = pd.concat([frame, pairs.reset_index(drop=True)], axis=1)
    frame.attrs.update(beta=beta, length_normalize=bool(length_normalize), prob_column=prob_column, note=note)
    frame.attrs["summary"] = ranking_summary(frame)
    return frame
