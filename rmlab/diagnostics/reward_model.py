"""How good is a reward model? Accuracy, calibration, length bias and agreement with a DPO policy.

Everything here reads frames that were already computed (no model runs): a frame from
:func:`rmlab.reward_scores` (or, since a DPO policy is a reward model too, from
:func:`rmlab.implicit_rewards`), and optionally an :func:`rmlab.implicit_rewards` frame on the same
pairs to compare with.

A Bradley-Terry reward model predicts ``P(chosen > rejected) = sigmoid(margin)`` (Ouyang et al.
2022). Its calibration is measured on the folded confidence ``max(p, 1 - p)`` with expected
calibration error as in Guo et al. 2017 ("On Calibration of Modern Neural Networks"); length bias
as studied by Singhal et al. 2023 ("A Long Way to Go: Investigating Length Correlations in RLHF").

Rank correlations come from :mod:`rmlab.stats`, in numpy (average ranks for Spearman, Kendall's tau-b with
Knight's O(n log n) algorithm), so that rmlab does not depend on scipy; they equal
``scipy.stats.spearmanr`` / ``scipy.stats.kendalltau`` (checked in the tests).
"""

from __future__ import annotations

import html
from dataclasses import dataclass

import numpy as np
import pandas as pd

from rmlab.diagnostics.probabilities import probability_column, show_cell
from rmlab.errors import ArgumentError, DataError, check_choice
from rmlab.stats import kendall_tau_b, pearson, sigmoid, spearman, wilson

_LENGTHS = ("tokens", "words", "chars")


# --------------------------------------------------------------------------------------------------
# the report
# --------------------------------------------------------------------------------------------------
@dataclass
class RewardModelReport:
    """The result of :func:`reward_model_report`: one Series and up to three DataFrames.

    Attributes:
        summary: ``pd.Series`` with ``pairs``, ``accuracy``, ``mean_margin``, ``ece``, ``brier``,
            ``log_loss`` and, when the scores carry ``true_prob``, ``true_prob_mae``.
        calibration: one row per confidence bin (reliability diagram data).
        length_bias: one row per slice of pairs (all, chosen longer, rejected longer, same length).
        agreement: ``pd.Series`` comparing with an implicit (DPO) reward, or None when no
            ``implicit=`` frame was given.

    Each part is an ordinary pandas object: save it (``report.calibration.to_parquet(...)``), plot it,
    or show the whole report in a notebook cell (an HTML table per part).
    """

    summary: pd.Series
    calibration: pd.DataFrame
    length_bias: pd.DataFrame
    agreement: pd.Series | None = None

    def _parts(self):
        parts = [("summary", self.summary.to_frame("value")), ("calibration", self.calibration),
                 ("length_bias", self.length_bias)]
        if self.agreement is not None:
            parts.append(("agreement", self.agreement.to_frame("value")))
        return parts

    def __repr__(self) -> str:
        with pd.option_context("display.width", 200, "display.max_columns", 30, "display.precision", 4):
            body = "\n\n".join(f"{name}:\n{frame.to_string()}" for name, frame in self._parts())
        return f"RewardModelReport\n\n{body}"

    def _repr_html_(self) -> str:
        blocks = [
            f"<h4>{html.escape(name)}</h4>{frame.to_html(float_format=lambda v: f'{v:.4g}', escape=True)}"
            for name, frame in self._parts()
        ]
        return "<div class='rmlab-report'><h3>Reward model report</h3>" + "".join(blocks) + "</div>"


def _check_frame(scores, needed: list[str], argument: str, producer: str) -> None:
    if not isinstance(scores, pd.DataFrame):
        raise DataError(
            f"{argument} must be a pandas DataFrame from {producer}, not a {type(scores).__name__}."
        )
    missing = [c for c in needed if c not in scores.columns]
    if missing:
        raise DataError(
            f"{argument} lacks the column(s) {missing}; found {list(scores.columns)}. Pass the frame "
            f"returned by {producer} on preference pairs."
        )
    if len(scores) == 0:
        raise DataError(f"{argument} has no rows: score at least one pair first.")


def _side_scores(scores: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Per-side scores: ``score_*`` of reward_scores, else ``reward_*`` of implicit_rewards."""
    for prefix in ("score", "reward"):
        if f"{prefix}_chosen" in scores.columns and f"{prefix}_rejected" in scores.columns:
            return (scores[f"{prefix}_chosen"].to_numpy(np.float64),
                    scores[f"{prefix}_rejected"].to_numpy(np.float64))
    raise DataError(
        "scores lacks per-response scores: it needs 'score_chosen' and 'score_rejected' (from "
        "rmlab.reward_scores) or 'reward_chosen' and 'reward_rejected' (from rmlab.implicit_rewards)."
    )


def _text(value) -> str:
    """A response as text: a string, or the joined contents of chat messages."""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, np.ndarray)):
        return "\n".join(_text(m) for m in value)
    if isinstance(value, dict):
        content = value.get("content", "")
        return content if isinstance(content, str) else _text(content)
    return "" if value is None else str(value)


def _lengths(scores: pd.DataFrame, length: str) -> tuple[np.ndarray, np.ndarray]:
    check_choice("length", length, _LENGTHS)
    if length == "tokens":
        needed = ["tokens_chosen", "tokens_rejected"]
    else:
        needed = ["chosen", "rejected"]
    missing = [c for c in needed if c not in scores.columns]
    if missing:
        raise DataError(
            f"length={length!r} needs the column(s) {missing}, which scores lacks. Pass a frame from "
            "rmlab.reward_scores, or length='words' / 'chars' when only the texts are there."
        )
    if length == "tokens":
        return (scores["tokens_chosen"].to_numpy(np.float64), scores["tokens_rejected"].to_numpy(np.float64))
    count = (lambda t: len(t.split())) if length == "words" else len
    return tuple(
        np.array([count(_text(v)) for v in scores[side]], dtype=np.float64) for side in ("chosen", "rejected")
    )


def _true_prob(scores: pd.DataFrame, column: str = "true_prob") -> np.ndarray | None:
    if column not in scores.columns:
        return None
    return probability_column(scores, column, "Fix or drop the column.")


def _calibration(margin: np.ndarray, true_prob: np.ndarray | None, bins: int) -> pd.DataFrame:
    p = sigmoid(margin)
    conf = np.maximum(p, 1 - p)
    hit = margin > 0
    edges = np.linspace(0.5, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, conf, side="right") - 1, 0, bins - 1)
    rows = []
    for b in range(bins):
        member = which == b
        n = int(member.sum())
        hits = int(hit[member].sum())
        low, high = wilson(hits, n)
        row = {
            "bin": b,
            "bin_lower": edges[b],
            "bin_upper": edges[b + 1],
            "count": n,
            "mean_confidence": float(conf[member].mean()) if n else np.nan,
            "observed_accuracy": hits / n if n else np.nan,
            "accuracy_lower": low,
            "accuracy_upper": high,
        }
        if true_prob is not None:
            preferred = np.where(hit, true_prob, 1 - true_prob)  # margin 0 counts as preferring rejected
            row["mean_true_prob_of_preferred"] = float(preferred[member].mean()) if n else np.nan
        rows.append(row)
    return pd.DataFrame(rows)


def _ece(calibration: pd.DataFrame) -> float:
    c = calibration[calibration["count"] > 0]
    weights = c["count"] / c["count"].sum()
    return float((weights * (c["observed_accuracy"] - c["mean_confidence"]).abs()).sum())


def _length_bias(margin, score_c, score_r, len_c, len_r) -> pd.DataFrame:
    diff = len_c - len_r
    slices = [
        ("all", np.ones(len(margin), dtype=bool)),
        ("chosen longer", diff > 0),
        ("rejected longer", diff < 0),
        ("same length", diff == 0),
    ]
    n = len(margin)
    rows = []
    for name, member in slices:
        k = int(member.sum())
        m, d = margin[member], diff[member]
        unequal = d != 0
        prefers_longer = np.where(d > 0, m > 0, m < 0)[unequal]
        scores = np.r_[score_c[member], score_r[member]]
        lengths = np.r_[len_c[member], len_r[member]]
        rows.append(
            {
                "slice": name,
                "pairs": k,
                "fraction": k / n,
                "accuracy": float((m > 0).mean()) if k else np.nan,
                "prefers_longer": float(prefers_longer.mean()) if len(prefers_longer) else np.nan,
                "mean_length_diff": float(d.mean()) if k else np.nan,
                "pearson_score_length": pearson(scores, lengths),
                "spearman_score_length": spearman(scores, lengths),
                "pearson_margin_length_diff": pearson(m, d),
                "spearman_margin_length_diff": spearman(m, d),
            }
        )
    return pd.DataFrame(rows)


def _same_cell(a, b) -> bool:
    try:
        same = a == b
        return bool(same) if not isinstance(same, np.ndarray) else bool(same.all())
    except (TypeError, ValueError):
        return repr(a) == repr(b)


def _check_same_pairs(scores: pd.DataFrame, implicit: pd.DataFrame) -> None:
    if len(scores) != len(implicit):
        raise DataError(
            f"scores has {len(scores)} pairs but implicit has {len(implicit)}; agreement needs both "
            "frames computed on the same pairs, in the same order."
        )
    for column in ("prompt", "chosen", "rejected"):
        if column in scores.columns and column in implicit.columns:
            left, right = scores[column].tolist(), implicit[column].tolist()
            for row, (a, b) in enumerate(zip(left, right)):
                if not _same_cell(a, b):
                    raise DataError(
                        f"Row {row}, column {column!r} differs between scores ({_short(a)}) and implicit "
                        f"({_short(b)}): agreement needs both frames computed on the same pairs, in the "
                        "same order."
                    )


def _short(value, limit: int = 60) -> str:
    text = show_cell(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _agreement(explicit: np.ndarray, implicit: np.ndarray) -> pd.Series:
    valid = np.isfinite(explicit) & np.isfinite(implicit)
    e, i = explicit[valid], implicit[valid]
    return pd.Series(
        {
            "pairs": int(valid.sum()),
            "spearman": spearman(e, i),
            "kendall_tau_b": kendall_tau_b(e, i),
            "sign_agreement": float(((e > 0) == (i > 0)).mean()) if len(e) else np.nan,
            "accuracy_reward_model": float((e > 0).mean()) if len(e) else np.nan,
            "accuracy_implicit": float((i > 0).mean()) if len(i) else np.nan,
            "both_correct": float(((e > 0) & (i > 0)).mean()) if len(e) else np.nan,
        },
        name="agreement",
        dtype=np.float64,
    )


def reward_model_report(
    scores: pd.DataFrame,
    *,
    implicit: pd.DataFrame | None = None,
    bins: int = 10,
    length: str = "tokens",
) -> RewardModelReport:
    """Accuracy, calibration, length bias and (optionally) agreement with a DPO implicit reward.

    Calibration follows Guo et al. 2017 ("On Calibration of Modern Neural Networks") on the
    Bradley-Terry probability ``p = sigmoid(margin)`` of the labelled ``chosen`` (Ouyang et al. 2022):
    a pairwise model is scored on its folded confidence ``conf = max(p, 1 - p)`` and whether the side it
    prefers is the labelled ``chosen`` (``hit = margin > 0``; a margin of exactly 0 has conf 0.5 and
    is a miss, as TRL counts ties). ``ECE = sum_b (n_b / N) |accuracy_b - confidence_b|`` over
    ``bins`` equal-width bins of [0.5, 1] (each bin ``[lower, upper)``, the last one closed). Length
    bias follows Singhal et al. 2023 ("A Long Way to Go: Investigating Length Correlations in RLHF").

    Args:
        scores: a frame from :func:`rmlab.reward_scores`. A frame from :func:`rmlab.implicit_rewards`
            works too (a DPO policy's ``sigmoid(margin)`` is its Bradley-Terry preference probability).
        implicit: optional :func:`rmlab.implicit_rewards` frame on the same pairs, in the same order,
            to compare the two rewards (``agreement``).
        bins: number of confidence bins (>= 1).
        length: what "length" of a response means: ``"tokens"`` (scored response tokens,
            ``tokens_chosen`` / ``tokens_rejected``), ``"words"`` (whitespace-separated) or ``"chars"``
            (characters of the text; the joined message contents for chat data).

    Returns:
        A :class:`RewardModelReport` with

        - ``summary`` (Series): ``pairs``, ``accuracy`` (mean ``margin > 0``), ``mean_margin``,
          ``ece``, ``brier`` (mean ``(p - 1)^2``, p the probability of the labelled chosen),
          ``log_loss`` (mean ``-log p``) and, when ``scores`` has ``true_prob`` (the probability the
          labeller prefers ``chosen``, as in the toy world), ``true_prob_mae`` = mean ``|p - true_prob|``.
        - ``calibration`` (one row per bin): ``bin``, ``bin_lower``, ``bin_upper``, ``count``,
          ``mean_confidence``, ``observed_accuracy``, ``accuracy_lower`` / ``accuracy_upper`` (95%
          Wilson interval), and with ``true_prob`` ``mean_true_prob_of_preferred`` (the true probability
          of the side the model prefers; calibrated against the labeller rather than the sampled
          labels). Empty bins have count 0 and NaN statistics.
        - ``length_bias`` (one row per slice: ``all``, ``chosen longer``, ``rejected longer``, ``same
          length``): ``pairs``, ``fraction``, ``accuracy`` (on "rejected longer" this is how often the
          model prefers a shorter chosen answer), ``prefers_longer`` (fraction of unequal-length pairs
          whose margin favours the longer response), ``mean_length_diff`` (chosen - rejected),
          ``pearson_score_length`` / ``spearman_score_length`` (score against length, both responses
          of each pair pooled), ``pearson_margin_length_diff`` / ``spearman_margin_length_diff``.
        - ``agreement`` (Series, only with ``implicit=``): ``pairs`` (both margins finite),
          ``spearman``, ``kendall_tau_b`` (rank correlation of the two margins), ``sign_agreement``
          (both prefer the same side, a margin <= 0 meaning "rejected"), ``accuracy_reward_model``,
          ``accuracy_implicit``, ``both_correct``.

        Pairs with a NaN margin (a response truncated to nothing) are left out of every statistic.

    Raises:
        DataError: ``scores`` / ``implicit`` lack columns, are empty, or are not on the same pairs.
        ArgumentError: ``bins`` or ``length`` is invalid.

    Example:
        >>> import pandas as pd
        >>> scores = pd.DataFrame({"score_chosen": [1.0, 0.2], "score_rejected": [0.0, 0.5],
        ...                        "margin": [1.0, -0.3], "tokens_chosen": [5, 3], "tokens_rejected": [2, 4]})
        >>> report = reward_model_report(scores, bins=5)
        >>> float(report.summary["accuracy"])
        0.5
    """
    producer = "rmlab.reward_scores (or rmlab.implicit_rewards)"
    _check_frame(scores, ["margin"], "scores", producer)
    if isinstance(bins, bool) or not isinstance(bins, (int, np.integer)) or bins < 1:
        raise ArgumentError(f"bins={bins!r} must be a positive integer (the number of confidence bins, e.g. 10).")
    bins = int(bins)
    score_c, score_r = _side_scores(scores)
    len_c, len_r = _lengths(scores, length)
    true_prob = _true_prob(scores)
    if implicit is not None:
        _check_frame(implicit, ["margin"], "implicit", "rmlab.implicit_rewards")
        _check_same_pairs(scores, implicit)

    margin_all = pd.to_numeric(scores["margin"], errors="coerce").to_numpy(np.float64)
    valid = ~np.isnan(margin_all)
    if not valid.any():
        raise DataError("Every margin in scores is NaN: no pair could be scored.")
    margin = margin_all[valid]
    tp = true_prob[valid] if true_prob is not None else None

    calibration = _calibration(margin, tp, bins)
    p = sigmoid(margin)
    summary = {
        "pairs": int(valid.sum()),
        "accuracy": float((margin > 0).mean()),
        "mean_margin": float(margin.mean()),
        "ece": _ece(calibration),
        "brier": float(((1 - p) ** 2).mean()),
        "log_loss": float(np.logaddexp(0.0, -margin).mean()),
    }
    if tp is not None:
        summary["true_prob_mae"] = float(np.abs(p - tp).mean())
    length_bias = _length_bias(margin, score_c[valid], score_r[valid], len_c[valid], len_r[valid])

    agreement = None
    if implicit is not None:
        other = pd.to_numeric(implicit["margin"], errors="coerce").to_numpy(np.float64)
        agreement = _agreement(margin_all, other)
    return RewardModelReport(
        summary=pd.Series(summary, name="summary", dtype=np.float64),
        calibration=calibration,
        length_bias=length_bias,
        agreement=agreement,
    )
