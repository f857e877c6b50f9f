"""Figures of gradient entanglement and likelihood displacement: why DPO can lower the chosen response."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from rmlab.deprecation import deprecated_alias, renamed_arguments
from rmlab.errors import DataError
from rmlab.plots.frames import require_columns
from rmlab.plots.rewards import REWARD_COLORSCALE


#: Short colour-bar titles for the columns entanglement figures are usually coloured by.
_COLOR_LABELS = {
    "pred_delta_chosen": "predicted<br>Δ log π(y_w)",
    "real_delta_chosen": "realised<br>Δ log π(y_w)",
    "pred_delta_rejected": "predicted<br>Δ log π(y_l)",
    "real_delta_rejected": "realised<br>Δ log π(y_l)",
}


def _spearman(x, y) -> float:
    x, y = pd.Series(np.asarray(x, dtype=float)), pd.Series(np.asarray(y, dtype=float))
    ok = x.notna() & y.notna()
    return float(x[ok].rank().corr(y[ok].rank())) if ok.sum() > 2 else float("nan")


def entanglement_scatter(frame: pd.DataFrame, *, color: str | None = None, title: str | None = None) -> go.Figure:
    """``<g_w, g_l>`` against ``|g_w|^2`` per pair, with the line above which the chosen log-prob falls.

    Args:
        frame: from :func:`rmlab.gradient_entanglement` (``grad_sq_chosen``, ``grad_inner``).
        color: column that colours the points (diverging, centred at zero); default
            ``real_delta_chosen`` when the frame has realised changes, else ``pred_delta_chosen``.
        title: figure title.

    Yuan et al. 2024 (gradient entanglement): one step of a margin loss changes the chosen log-prob by
    ``eta * c * (|g_w|^2 - <g_w, g_l>)``, so every pair above the diagonal ``<g_w, g_l> = |g_w|^2``
    has its chosen response pushed *down* even as the margin grows.
    """
    require_columns(frame, ["grad_sq_chosen", "grad_inner"], "rmlab.gradient_entanglement")
    if color is None:
        color = next((c for c in ("real_delta_chosen", "pred_delta_chosen") if c in frame.columns), None)
    x, y = frame["grad_sq_chosen"].to_numpy(float), frame["grad_inner"].to_numpy(float)
    marker: dict = dict(size=8, line=dict(width=0.5, color="black"))
    if color is not None:
        values = frame[color].to_numpy(float)
        # the colour range covers 95% of the pairs, so one outlier does not wash the others out
        bound = float(np.nanquantile(np.abs(values), 0.95)) if np.isfinite(values).any() else 1.0
        bound = bound or 1.0
        label = _COLOR_LABELS.get(color, color)
        marker.update(color=values, colorscale=REWARD_COLORSCALE, cmid=0, cmin=-bound, cmax=bound,
                      colorbar=dict(title=dict(text=label, side="top"), thickness=12, len=0.8))
    pairs = frame["pair"] if "pair" in frame.columns else pd.Series(np.arange(len(frame)))
    falls = y > x
    fig = go.Figure()
    fig.add_trace(
        go.Scatter(
            x=x, y=y, mode="markers", marker=marker, name="pairs",
            customdata=np.stack([pairs, falls, frame[color] if color else np.full(len(frame), np.nan)], axis=1),
            hovertemplate=(
                "pair %{customdata[0]}<br>|g_w|² %{x:.4g}<br>⟨g_w, g_l⟩ %{y:.4g}<br>chosen falls: %{customdata[1]}"
                + (f"<br>{color} %{{customdata[2]:.4g}}" if color else "") + "<extra></extra>"
            ),
        )
    )
    top = float(np.nanmax(np.r_[x, y, 0.0])) * 1.05 or 1.0
    fig.add_trace(
        go.Scatter(x=[0, top], y=[0, top], mode="lines", line=dict(dash="dash", color="black"),
                   name="⟨g_w, g_l⟩ = |g_w|²: above, the chosen log-prob falls")
    )
    fig.update_layout(
        title=title or f"Gradient entanglement: chosen log-prob predicted to fall on {falls.mean():.0%} of pairs",
        xaxis_title="|g_w|²  (squared gradient norm of log π(y_w))",
        yaxis_title="⟨g_w, g_l⟩",
        legend=dict(orientation="h", y=-0.2),
    )
    return fig


def similarity_heatmap(frame: pd.DataFrame, *, value: str = "inner", title: str | None = None) -> go.Figure:
    """Pair-by-pair gradient-similarity heatmap from :func:`rmlab.gradient_similarity`'s long frame.

    Args:
        frame: rows ``pair_a``, ``pair_b`` and a ``value`` column.
        value: which column to show (``"inner"`` or ``"cosine"``).
        title: figure title.

    Rows are the pair whose update is taken, columns the pair whose chosen log-prob it moves (see
    :func:`rmlab.gradient_similarity` for the exact entry); red cells are updates that push another
    pair's chosen response down (Yuan et al. 2024, gradient entanglement across pairs). The table
    itself is :func:`rmlab.diagnostics.similarity_matrix`.
    """
    require_columns(frame, ["pair_a", "pair_b", value], "rmlab.gradient_similarity")
    wide = frame.pivot(index="pair_a", columns="pair_b", values=value)
    z = wide.to_numpy(float)
    bound = float(np.nanmax(np.abs(z))) if np.isfinite(z).any() else 1.0
    fig = go.Figure(
        go.Heatmap(
            z=z, x=[str(c) for c in wide.columns], y=[str(r) for r in wide.index], colorscale=REWARD_COLORSCALE,
            zmid=0, zmin=-bound, zmax=bound, colorbar=dict(title=dict(text=value, side="right"), thickness=12),
            hovertemplate="update on pair %{y}<br>moves pair %{x}<br>" + value + " %{z:.4g}<extra></extra>",
        )
    )
    fig.update_layout(
        title=title or "Gradient similarity: how an update on one pair moves another pair's chosen log-prob",
        xaxis_title="pair whose chosen log-prob moves", yaxis_title="pair whose update is taken",
        yaxis_autorange="reversed", xaxis_type="category", yaxis_type="category",
    )
    return fig


#: The figure's old name, which clashed with :func:`rmlab.diagnostics.similarity_matrix` (the table).
similarity_matrix = deprecated_alias(
    similarity_heatmap, "rmlab.plots.similarity_matrix", "rmlab.plots.similarity_heatmap",
    renamed={"similarity": "frame"},
)


@renamed_arguments("rmlab.plots.displacement_trajectories", {"trajectories": "frame"})
def displacement_trajectories(
    frame: pd.DataFrame, *, pairs=None, max_pairs: int = 12, title: str | None = None
) -> go.Figure:
    """Chosen and rejected log-probs over DPO steps, relative to step 0, per pair and on average.

    Args:
        frame: the trajectories from :func:`rmlab.track_dpo` (``step``, ``pair``, ``logps_chosen``,
            ``logps_rejected``).
        pairs: which pairs to draw individually (default: the ``max_pairs`` whose chosen log-prob
            fell most).
        max_pairs: how many pairs to draw when ``pairs`` is None.
        title: figure title.

    Likelihood displacement (Razin et al. 2024): the margin grows while the chosen log-prob (solid)
    falls below its start; the thick lines are the means over all pairs.
    """
    require_columns(frame, ["step", "pair", "logps_chosen", "logps_rejected"], "rmlab.track_dpo")
    t = frame.sort_values(["pair", "step"]).copy()
    first = t.groupby("pair")[["logps_chosen", "logps_rejected"]].transform("first")
    t["d_chosen"] = t["logps_chosen"] - first["logps_chosen"]
    t["d_rejected"] = t["logps_rejected"] - first["logps_rejected"]
    last = t.groupby("pair").last()
    if pairs is None:
        pairs = last["d_chosen"].nsmallest(max_pairs).index.tolist()
    unknown = sorted(set(pairs) - set(last.index))
    if unknown:
        raise DataError(f"pairs {unknown[:5]} are not in the trajectories (pairs {last.index.min()}..{last.index.max()}).")
    fig = go.Figure()
    for k, pair in enumerate(pairs):
        part = t[t["pair"] == pair]
        group = f"pair {pair}"
        fig.add_trace(go.Scatter(x=part["step"], y=part["d_chosen"], mode="lines", name=group, legendgroup=group,
                                 line=dict(width=1, color="#2166ac"), opacity=0.5, showlegend=False,
                                 hovertemplate=f"pair {pair} chosen<br>step %{{x}}<br>Δ log π %{{y:.3f}}<extra></extra>"))
        fig.add_trace(go.Scatter(x=part["step"], y=part["d_rejected"], mode="lines", name=group, legendgroup=group,
                                 line=dict(width=1, color="#b2182b", dash="dot"), opacity=0.5, showlegend=False,
                                 hovertemplate=f"pair {pair} rejected<br>step %{{x}}<br>Δ log π %{{y:.3f}}<extra></extra>"))
    mean = t.groupby("step")[["d_chosen", "d_rejected"]].mean()
    fig.add_trace(go.Scatter(x=mean.index, y=mean["d_chosen"], mode="lines", line=dict(width=4, color="#2166ac"),
                             name="chosen (mean over all pairs)"))
    fig.add_trace(go.Scatter(x=mean.index, y=mean["d_rejected"], mode="lines", line=dict(width=4, color="#b2182b", dash="dot"),
                             name="rejected (mean over all pairs)"))
    fig.add_hline(y=0, line_color="gray", line_dash="dash")
    fell = float((last["d_chosen"] < 0).mean())
    fig.update_layout(
        title=title or f"Likelihood displacement: the chosen log-prob fell on {fell:.0%} of pairs",
        xaxis_title="DPO step", yaxis_title="log π(y) − log π₀(y)", legend=dict(orientation="h", y=-0.2),
    )
    return fig


@renamed_arguments("rmlab.plots.ches_vs_change", {"ches": "frame"})
def ches_vs_change(frame: pd.DataFrame, change: pd.DataFrame, *, score: str = "ln_ches", title: str | None = None) -> go.Figure:
    """CHES score of each pair against the realised change of its chosen log-prob in a DPO run.

    Args:
        frame: from :func:`rmlab.ches` (``pair`` and the ``score`` column).
        change: the realised changes on the same pairs: a :func:`rmlab.track_dpo` trajectories frame
            (change from the first to the last step of a joint run), or a
            :func:`rmlab.gradient_entanglement` frame with ``realised=True`` (``real_delta_chosen``:
            one DPO step on each pair alone).
        score: ``"ln_ches"`` (length-normalised, what Razin et al. filter by) or ``"ches"``.
        title: figure title.

    Razin et al. 2024: pairs whose chosen and rejected responses have similar hidden-state sums
    (high CHES) are the ones whose chosen likelihood a DPO update *on that pair* displaces; the
    title gives the Spearman rank correlation (negative when high CHES goes with a fall). In a
    joint run every pair also moves with the others' updates, which weakens the per-pair link.
    """
    require_columns(frame, ["pair", score], "rmlab.ches")
    if "real_delta_chosen" in change.columns:
        require_columns(change, ["pair"], "rmlab.gradient_entanglement")
        delta = change.set_index("pair")["real_delta_chosen"].rename("delta_chosen")
    else:
        require_columns(change, ["step", "pair", "logps_chosen"], "rmlab.track_dpo or rmlab.gradient_entanglement")
        t = change.sort_values(["pair", "step"]).groupby("pair")["logps_chosen"]
        delta = (t.last() - t.first()).rename("delta_chosen")
    merged = frame.set_index("pair")[[score]].join(delta, how="inner").reset_index()
    if merged.empty:
        raise DataError("ches and trajectories share no pair: compute both on the same data.")
    rho = _spearman(merged[score], merged["delta_chosen"])
    fig = go.Figure(
        go.Scatter(
            x=merged[score], y=merged["delta_chosen"], mode="markers", customdata=merged["pair"], name="pairs",
            showlegend=False,
            marker=dict(size=7, opacity=0.7, color=np.where(merged["delta_chosen"] < 0, "#b2182b", "#2166ac")),
            hovertemplate="pair %{customdata}<br>" + score + " %{x:.4g}<br>Δ log π(y_w) %{y:.3f}<extra></extra>",
        )
    )
    fig.add_hline(y=0, line_color="gray", line_dash="dash")
    fig.update_layout(
        title=title or f"{score.upper().replace('_', '-')} against the realised change (Spearman ρ = {rho:.2f})",
        xaxis_title=score, yaxis_title="realised change of log π(y_w)",
    )
    return fig


def predicted_changes(frame: pd.DataFrame, *, title: str | None = None) -> go.Figure:
    """Predicted change of each pair's rejected (x) and chosen (y) log-prob after one margin-loss step.

    Args:
        frame: from :func:`rmlab.gradient_entanglement` or :func:`rmlab.diagnostics.predict_entanglement`
            (``pred_delta_chosen``, ``pred_delta_rejected``; ``real_delta_*`` drawn too when present).
        title: figure title (default: the step's ``lr`` and ``beta`` and how many chosen log-probs fall).

    Yuan et al. 2024: the margin always grows (every point lies above the line ``y = x``), but points
    below ``y = 0`` are pairs whose chosen response becomes *less* likely; red points are those the
    first-order prediction says fall (``<g_w, g_l> > |g_w|^2``).
    """
    require_columns(frame, ["pred_delta_chosen", "pred_delta_rejected", "chosen_falls"], "rmlab.gradient_entanglement")
    pairs = frame["pair"].to_numpy() if "pair" in frame.columns else np.arange(len(frame))
    x, y = frame["pred_delta_rejected"].to_numpy(float), frame["pred_delta_chosen"].to_numpy(float)
    falls = frame["chosen_falls"].to_numpy(bool)
    fig = go.Figure()
    for mask, name, colour in ((~falls, "chosen rises", "#2166ac"), (falls, "chosen falls", "#b2182b")):
        fig.add_trace(
            go.Scatter(
                x=x[mask], y=y[mask], mode="markers", name=f"{name} ({int(mask.sum())})", customdata=pairs[mask],
                marker=dict(size=8, color=colour, opacity=0.75, line=dict(width=0.5, color="black")),
                hovertemplate="pair %{customdata}<br>Δ log π(y_l) %{x:.3g}<br>Δ log π(y_w) %{y:.3g}<extra></extra>",
            )
        )
    if {"real_delta_chosen", "real_delta_rejected"} <= set(frame.columns):
        fig.add_trace(
            go.Scatter(
                x=frame["real_delta_rejected"], y=frame["real_delta_chosen"], mode="markers", name="realised step",
                customdata=pairs, marker=dict(size=7, symbol="x-thin", line=dict(width=1.5, color="black")),
                hovertemplate="pair %{customdata} (realised)<br>Δ log π(y_l) %{x:.3g}<br>Δ log π(y_w) %{y:.3g}<extra></extra>",
            )
        )
    finite = np.r_[x[np.isfinite(x)], y[np.isfinite(y)], 0.0]
    lo, hi = float(finite.min()), float(finite.max())
    fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", line=dict(dash="dot", color="gray"),
                             name="y = x (margin unchanged)", hoverinfo="skip"))
    fig.add_hline(y=0, line_color="black", line_dash="dash")
    lr, beta = frame.attrs.get("lr"), frame.attrs.get("beta")
    step = f" (lr={lr:.2g}, beta={beta:.3g})" if lr is not None and beta is not None else ""
    fig.update_layout(
        title=title or f"One step on each pair{step}: the chosen log-prob falls on {falls.mean():.0%} of pairs",
        xaxis_title="predicted Δ log π(y_l)  (rejected)", yaxis_title="predicted Δ log π(y_w)  (chosen)",
        legend=dict(orientation="h", y=-0.2),
    )
    return fig
