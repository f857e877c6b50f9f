"""Figures of reward overoptimization: gold and proxy reward against the distance from the start."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from rmlab.plots.rewards import _require


def overoptimization_curve(frame: pd.DataFrame, *, title: str | None = None) -> go.Figure:
    """Gold and proxy reward against sqrt(KL) (Gao et al. 2022, "Scaling Laws for Reward Model
    Overoptimization").

    Args:
        frame: one row per point with ``kl``, ``proxy``, ``gold`` and optionally ``n`` (best-of-n),
            ``proxy_se`` / ``gold_se`` (error bars).

    For best-of-n the KL is the analytic ``log n - (n-1)/n``, an upper bound on the true KL
    (Beirami et al. 2024); the x-axis title says so when an ``n`` column is present.
    """
    _require(frame, ["kl", "proxy", "gold"], "a best-of-n or checkpoint curve")
    x = np.sqrt(frame["kl"].to_numpy())
    hover = [f"n = {n}" for n in frame["n"]] if "n" in frame else None
    fig = go.Figure()
    for column, color in (("proxy", "#1f77b4"), ("gold", "#d62728")):
        error = frame.get(f"{column}_se")
        fig.add_trace(
            go.Scatter(
                x=x, y=frame[column], name=column, mode="lines+markers", line=dict(color=color),
                error_y=dict(type="data", array=error, visible=True) if error is not None else None,
                hovertext=hover,
            )
        )
    bon = "n" in frame
    fig.update_layout(
        title=title or ("Best-of-n: proxy vs gold reward" if bon else "Proxy vs gold reward"),
        xaxis_title="sqrt(KL) " + ("(analytic log n - (n-1)/n, an upper bound)" if bon else "to the initial policy"),
        yaxis_title="reward",
        hovermode="x unified",
    )
    return fig
