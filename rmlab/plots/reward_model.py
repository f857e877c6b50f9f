"""Figures for reading a reward model: calibration, length bias and preference strength."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from rmlab.plots.rewards import _require


def calibration_diagram(report, *, title: str | None = None) -> go.Figure:
    """Reliability diagram of a reward model: observed accuracy against predicted confidence.

    Args:
        report: a :class:`rmlab.RewardModelReport` (from :func:`rmlab.reward_model_report`) or its
            ``calibration`` frame.
        title: figure title (default: accuracy and ECE).

    Each bin of folded confidence ``max(p, 1 - p)``, ``p = sigmoid(margin)``, is a point at its mean
    confidence and observed accuracy with a 95% Wilson interval; marker area grows with the number
    of pairs. A calibrated model lies on the diagonal (Guo et al. 2017); points below it are
    over-confident. When the data carry true preference probabilities, the mean true probability
    of the side the model prefers is drawn too.
    """
    calibration = getattr(report, "calibration", report)
    summary = getattr(report, "summary", None)
    _require(calibration, ["mean_confidence", "observed_accuracy", "count"], "rmlab.reward_model_report")
    c = calibration[calibration["count"] > 0]
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
        if summary is not None and "ece" in summary:
            title += f" (accuracy {summary['accuracy']:.3f}, ECE {summary['ece']:.3f})"
    fig.update_layout(
        title=title, xaxis_title="confidence max(p, 1-p), p = sigmoid(margin)", yaxis_title="observed accuracy",
        xaxis_range=[0.48, 1.02], yaxis_range=[0, 1.02], legend=dict(orientation="h", y=-0.2),
    )
    return fig


def length_bias(scores: pd.DataFrame, *, title: str | None = None) -> go.Figure:
    """Margin against the length difference of the two responses, one point per pair.

    Args:
        scores: a frame from :func:`rmlab.reward_scores` (``margin``, ``tokens_chosen``,
            ``tokens_rejected``) or :func:`rmlab.implicit_rewards`.
        title: figure title.

    Points right of zero are pairs whose chosen response is longer; a reward model that mostly
    rewards length puts its points on a rising line through the origin and misranks the pairs in
    the lower-left quadrant ("longer answer rejected"; Singhal et al. 2023).
    """
    _require(scores, ["margin", "tokens_chosen", "tokens_rejected"], "rmlab.reward_scores")
    diff = scores["tokens_chosen"] - scores["tokens_rejected"]
    correct = scores["margin"] > 0
    fig = go.Figure()
    for ok, name, color in ((True, "ranked correctly", "#2166ac"), (False, "ranked wrongly", "#b2182b")):
        part = scores[correct == ok]
        fig.add_trace(
            go.Scattergl(
                x=diff[correct == ok], y=part["margin"], mode="markers", name=f"{name} ({len(part)})",
                marker=dict(color=color, size=6, opacity=0.6), customdata=part["pair"] if "pair" in part else None,
                hovertemplate="pair %{customdata}<br>length diff %{x}<br>margin %{y:.3f}<extra></extra>",
            )
        )
    fig.add_hline(y=0, line_dash="dash", line_color="gray")
    fig.add_vline(x=0, line_dash="dash", line_color="gray")
    rho = np.corrcoef(diff, scores["margin"])[0, 1] if len(scores) > 1 else np.nan
    fig.update_layout(
        title=title or f"Length bias: margin vs length difference (Pearson r = {rho:.2f})",
        xaxis_title="tokens(chosen) - tokens(rejected)", yaxis_title="margin",
    )
    return fig


def preference_strength_map(strength: pd.DataFrame, *, truth: str | None = "flipped", title: str | None = None) -> go.Figure:
    """Ensemble preference strength: mean against std of the reward difference, one point per pair.

    Args:
        strength: a frame from :func:`rmlab.preference_strength`.
        truth: a boolean column that marks known mislabelled pairs (the toy world's ``flipped``);
            drawn as open circles when present. ``None`` to ignore.
        title: figure title.

    Pairs left of zero are likely mislabelled, pairs near zero ambiguous (Wang et al. 2024,
    "Secrets of RLHF Part II").
    """
    _require(strength, ["strength_mean", "strength_std", "likely_mislabelled", "ambiguous"], "rmlab.preference_strength")
    group = np.where(strength["likely_mislabelled"], "likely mislabelled",
                     np.where(strength["ambiguous"], "ambiguous", "clear"))
    colors = {"clear": "#4d4d4d", "ambiguous": "#f4a582", "likely mislabelled": "#b2182b"}
    fig = go.Figure()
    for name in ("clear", "ambiguous", "likely mislabelled"):
        part = strength[group == name]
        fig.add_trace(
            go.Scattergl(
                x=part["strength_mean"], y=part["strength_std"], mode="markers", name=f"{name} ({len(part)})",
                marker=dict(color=colors[name], size=6, opacity=0.7),
                customdata=part["pair"] if "pair" in part else None,
                hovertemplate="pair %{customdata}<br>mean %{x:.3f}<br>std %{y:.3f}<extra></extra>",
            )
        )
    if truth and truth in strength.columns:
        known = strength[strength[truth].astype(bool)]
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
