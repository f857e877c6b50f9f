"""Figures for reading a reward model: calibration, length bias and preference strength."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from rmlab.deprecation import renamed_arguments, warn_deprecated
from rmlab.plots.frames import require_columns


@renamed_arguments("rmlab.plots.calibration_diagram", {"report": "frame"})
def calibration_diagram(frame: pd.DataFrame, *, title: str | None = None) -> go.Figure:
    """Reliability diagram of a reward model: observed accuracy against predicted confidence.

    Args:
        frame: the ``calibration`` frame of :func:`rmlab.reward_model_report` (one row per bin:
            ``count``, ``mean_confidence``, ``observed_accuracy``; ``accuracy_lower`` /
            ``accuracy_upper`` and ``mean_true_prob_of_preferred`` drawn when present). The whole
            :class:`rmlab.RewardModelReport` is still accepted, with a DeprecationWarning.
        title: figure title (default: the accuracy and expected calibration error of the bins).

    Each bin of folded confidence ``max(p, 1 - p)``, ``p = sigmoid(margin)``, is a point at its mean
    confidence and observed accuracy with a 95% Wilson interval; marker area grows with the number
    of pairs. A calibrated model lies on the diagonal (Guo et al. 2017); points below it are
    over-confident. When the data carry true preference probabilities, the mean true probability
    of the side the model prefers is drawn too. The title's accuracy and ECE (count-weighted mean of
    ``|observed_accuracy - mean_confidence|``) are computed from the bins, so they equal the report's
    ``summary``.
    """
    if not isinstance(frame, pd.DataFrame) and isinstance(getattr(frame, "calibration", None), pd.DataFrame):
        warn_deprecated(
            "rmlab.plots.calibration_diagram(report) is deprecated: pass the frame, "
            "calibration_diagram(report.calibration); the report object goes in the next release.",
            stacklevel=3,
        )
        frame = frame.calibration
    require_columns(frame, ["mean_confidence", "observed_accuracy", "count"], "rmlab.reward_model_report")
    c = frame[frame["count"] > 0]
    fig = go.Figure()
    fig.add_trace(
        go.Scatter(x=[0.5, 1], y=[0.5, 1], mode="lines", line=dict(dash="dash", color="gray"), name="calibrated")
    )
    error = None
    if {"accuracy_lower", "accuracy_upper"} <= set(c.columns):
        error = dict(
            type="data", symmetric=False,
            array=(c["accuracy_upper"] - c["observed_accuracy"]).to_numpy(),
            arrayminus=(c["observed_accuracy"] - c["accuracy_lower"]).to_numpy(),
        )
    size = 8 + 22 * np.sqrt(c["count"].to_numpy() / max(1, c["count"].max()))
    fig.add_trace(
        go.Scatter(
            x=c["mean_confidence"], y=c["observed_accuracy"], error_y=error, mode="markers+lines",
            marker=dict(size=size), name="observed accuracy (95% CI)",
            customdata=np.stack([c["count"]], axis=1),
            hovertemplate="confidence %{x:.3f}<br>accuracy %{y:.3f}<br>%{customdata[0]} pairs<extra></extra>",
        )
    )
    if "mean_true_prob_of_preferred" in c.columns:
        fig.add_trace(
            go.Scatter(
                x=c["mean_confidence"], y=c["mean_true_prob_of_preferred"], mode="markers",
                marker=dict(symbol="diamond", size=9), name="true P(preferred side wins)",
            )
        )
    if title is None:
        title = "Reward-model calibration"
        if len(c):
            weights = c["count"] / c["count"].sum()
            accuracy = float((weights * c["observed_accuracy"]).sum())
            ece = float((weights * (c["observed_accuracy"] - c["mean_confidence"]).abs()).sum())
            title += f" (accuracy {accuracy:.3f}, ECE {ece:.3f})"
    fig.update_layout(
        title=title, xaxis_title="confidence max(p, 1-p), p = sigmoid(margin)", yaxis_title="observed accuracy",
        xaxis_range=[0.48, 1.02], yaxis_range=[0, 1.02], legend=dict(orientation="h", y=-0.2),
    )
    return fig


@renamed_arguments("rmlab.plots.length_bias", {"scores": "frame"})
def length_bias(frame: pd.DataFrame, *, title: str | None = None) -> go.Figure:
    """Margin against the length difference of the two responses, one point per pair.

    Args:
        frame: from :func:`rmlab.reward_scores` (``margin``, ``tokens_chosen``,
            ``tokens_rejected``) or :func:`rmlab.implicit_rewards`.
        title: figure title.

    Points right of zero are pairs whose chosen response is longer; a reward model that mostly
    rewards length puts its points on a rising line through the origin and misranks the pairs in
    the lower-left quadrant ("longer answer rejected"; Singhal et al. 2023).
    """
    require_columns(frame, ["margin", "tokens_chosen", "tokens_rejected"], "rmlab.reward_scores")
    diff = frame["tokens_chosen"] - frame["tokens_rejected"]
    correct = frame["margin"] > 0
    fig = go.Figure()
    for ok, name, color in ((True, "ranked correctly", "#2166ac"), (False, "ranked wrongly", "#b2182b")):
        part = frame[correct == ok]
        fig.add_trace(
            go.Scattergl(
                x=diff[correct == ok], y=part["margin"], mode="markers", name=f"{name} ({len(part)})",
                marker=dict(color=color, size=6, opacity=0.6), customdata=part["pair"] if "pair" in part else None,
                hovertemplate="pair %{customdata}<br>length diff %{x}<br>margin %{y:.3f}<extra></extra>",
            )
        )
    fig.add_hline(y=0, line_dash="dash", line_color="gray")
    fig.add_vline(x=0, line_dash="dash", line_color="gray")
    rho = np.corrcoef(diff, frame["margin"])[0, 1] if len(frame) > 1 else np.nan
    fig.update_layout(
        title=title or f"Length bias: margin vs length difference (Pearson r = {rho:.2f})",
        xaxis_title="tokens(chosen) - tokens(rejected)", yaxis_title="margin",
    )
    return fig


@renamed_arguments("rmlab.plots.preference_strength_map", {"strength": "frame"})
def preference_strength_map(frame: pd.DataFrame, *, truth: str | None = "flipped", title: str | None = None) -> go.Figure:
    """Ensemble preference strength: mean against std of the reward difference, one point per pair.

    Args:
        frame: from :func:`rmlab.preference_strength`.
        truth: a boolean column that marks known mislabelled pairs (the toy world's ``flipped``);
            drawn as open circles when present. ``None`` to ignore.
        title: figure title.

    Pairs left of zero are likely mislabelled, pairs near zero ambiguous (Wang et al. 2024,
    "Secrets of RLHF Part II").
    """
    require_columns(frame, ["strength_mean", "strength_std", "likely_mislabelled", "ambiguous"], "rmlab.preference_strength")
    group = np.where(frame["likely_mislabelled"], "likely mislabelled",
                     np.where(frame["ambiguous"], "ambiguous", "clear"))
    colors = {"clear": "#4d4d4d", "ambiguous": "#f4a582", "likely mislabelled": "#b2182b"}
    fig = go.Figure()
    for name in ("clear", "ambiguous", "likely mislabelled"):
        part = frame[group == name]
        fig.add_trace(
            go.Scattergl(
                x=part["strength_mean"], y=part["strength_std"], mode="markers", name=f"{name} ({len(part)})",
                marker=dict(color=colors[name], size=6, opacity=0.7),
                customdata=part["pair"] if "pair" in part else None,
                hovertemplate="pair %{customdata}<br>mean %{x:.3f}<br>std %{y:.3f}<extra></extra>",
            )
        )
    if truth and truth in frame.columns:
        known = frame[frame[truth].astype(bool)]
        fig.add_trace(
            go.Scattergl(
                x=known["strength_mean"], y=known["strength_std"], mode="markers", name=f"{truth} ({len(known)})",
                marker=dict(symbol="circle-open", size=11, color="black", line=dict(width=1)),
                hoverinfo="skip",
            )
        )
    fig.add_vline(x=0, line_dash="dash", line_color="gray")
    fig.update_layout(
        title=title or "Preference strength over a reward-model ensemble",
        xaxis_title="mean reward difference r(chosen) - r(rejected)", yaxis_title="std over the ensemble",
    )
    return fig
