"""Figures of reward overoptimization: gold and proxy reward against the distance from the start."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from rmlab.errors import ArgumentError
from rmlab.plots.frames import require_columns

#: One colour per proxy (plotly's default cycle); a single proxy keeps blue proxy / red gold.
_PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")

_KL_NOTE = "best-of-n KL log n - (n-1)/n is an upper bound on the true KL (Beirami et al. 2024)"


def _rgba(hex_color: str, alpha: float) -> str:
    r, g, b = (int(hex_color[i : i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha})"


def _fits(fit) -> list:
    if fit is None:
        return []
    if isinstance(fit, Mapping):
        return [(str(k), v) for k, v in fit.items()]
    if isinstance(fit, (list, tuple)):
        return [(getattr(f, "name", None), f) for f in fit]
    return [(getattr(fit, "name", None), fit)]


def overoptimization_curve(
    frame: pd.DataFrame,
    *,
    fit=None,
    title: str | None = None,
    show_proxy: bool = True,
    points: int = 200,
    x_axis: str = "sqrt_kl",
) -> go.Figure:
    """Gold and proxy reward against sqrt(KL) (Gao et al. 2022, "Scaling Laws for Reward Model
    Overoptimization"), with optional fitted curves and their bootstrap bands.

    Args:
        frame: one row per point with ``kl``, ``proxy``, ``gold`` and optionally ``n`` (best-of-n),
            ``proxy_se`` / ``gold_se`` (error bars) and ``proxy_name`` (several proxies or ensembles
            from :func:`rmlab.best_of_n`: one colour each, gold solid, proxy dashed; clicking a legend
            entry shows or hides that proxy's traces).
        fit: an :func:`rmlab.fit_overoptimization` result, or a list / ``{label: fit}`` dict of them:
            each is drawn as a dotted curve over the data's KL range with its pointwise bootstrap band
            (shaded) and its peak (a diamond, when the fitted peak is finite), in the colour of the
            proxy it was fitted on.
        title: figure title.
        show_proxy: draw the proxy reward too (default True).
        points: points along each fitted curve.
        x_axis: ``"sqrt_kl"`` (default; Gao et al. plot against ``d = sqrt(KL)``, where best-of-n gold
            is a parabola) or ``"kl"``.

    For best-of-n the KL is the analytic ``log n - (n-1)/n``, an upper bound on the true KL
    (Beirami et al. 2024); the x-axis title says so when an ``n`` column is present.
    """
    require_columns(frame, ["kl", "proxy", "gold"], "a best-of-n or checkpoint curve")
    if x_axis not in ("sqrt_kl", "kl"):
        raise ArgumentError(f"x_axis={x_axis!r} is not known; use 'sqrt_kl' or 'kl'.")
    to_x = np.sqrt if x_axis == "sqrt_kl" else np.asarray
    bon = "n" in frame
    several = "proxy_name" in frame.columns
    groups = list(frame.groupby("proxy_name", sort=False)) if several else [(frame.attrs.get("proxy_name"), frame)]
    colours = {}
    fig = go.Figure()
    for k, (name, group) in enumerate(groups):
        x = to_x(group["kl"].to_numpy(dtype=np.float64))
        hover = [f"n = {n}" for n in group["n"]] if bon else None
        if several:
            colour = _PALETTE[k % len(_PALETTE)]
            styles = (("proxy", colour, "dash"), ("gold", colour, "solid"))
        else:
            colour = "#d62728"
            styles = (("proxy", "#1f77b4", "solid"), ("gold", "#d62728", "solid"))
        colours[name] = colour
        for column, color, dash in styles:
            if column == "proxy" and not show_proxy:
                continue
            error = group[f"{column}_se"].to_numpy() if f"{column}_se" in group else None
            fig.add_trace(
                go.Scatter(
                    x=x, y=group[column], name=f"{column} ({name})" if several else column,
                    mode="lines+markers", line=dict(color=color, dash=dash),
                    error_y=dict(type="data", array=error, visible=True) if error is not None else None,
                    hovertext=hover, legendgroup=str(name) if several else None,
                )
            )
    kl_max = float(frame["kl"].max())
    fits = _fits(fit)
    for k, (label, result) in enumerate(fits):
        if not hasattr(result, "predict") or not hasattr(result, "band"):
            raise ArgumentError(
                f"fit must be a result of rmlab.fit_overoptimization (or a list / dict of them), not a "
                f"{type(result).__name__}."
            )
        fitted_on = getattr(result, "name", None)
        name = label if label is not None else fitted_on
        if several and fitted_on in colours:
            colour, group_key = colours[fitted_on], str(fitted_on)  # toggles with its proxy's traces
        elif not several and len(fits) == 1:
            colour, group_key = colours[groups[0][0]], f"fit {k}"
        else:
            colour, group_key = _PALETTE[(len(groups) + 1 + k) % len(_PALETTE)], f"fit {k}"
        kl = np.linspace(0.0, kl_max, points)
        d = to_x(kl)
        lo, hi = result.band(kl)
        if np.isfinite(lo).all() and np.isfinite(hi).all():
            fig.add_trace(go.Scatter(x=d, y=hi, mode="lines", line=dict(width=0), hoverinfo="skip",
                                     showlegend=False, legendgroup=group_key))
            fig.add_trace(
                go.Scatter(
                    x=d, y=lo, mode="lines", line=dict(width=0), fill="tonexty", fillcolor=_rgba(colour, 0.18),
                    name=f"{int(round(result.level * 100))}% bootstrap band", legendgroup=group_key,
                    hoverinfo="skip", showlegend=False,
                )
            )
        text = f"alpha={result.alpha:.3g}, beta={result.beta:.3g}, R²={result.r2:.3f}"
        fig.add_trace(
            go.Scatter(
                x=d, y=result.predict(kl), mode="lines", line=dict(color=colour, dash="dot", width=2),
                name=f"{result.form} fit{f' ({name})' if name else ''}: {text}", legendgroup=group_key,
            )
        )
        if np.isfinite(result.peak_kl) and result.peak_kl <= kl_max * 1.5:
            fig.add_trace(
                go.Scatter(
                    x=[float(to_x(result.peak_kl))], y=[result.peak_gold], mode="markers",
                    marker=dict(symbol="diamond", size=11, color=colour, line=dict(color="black", width=1)),
                    name=f"fitted peak: KL={result.peak_kl:.3g}, {result.y}={result.peak_gold:.3g}",
                    legendgroup=group_key, showlegend=False,
                    hovertext=f"peak KL {result.peak_kl:.3g} (CI {result.peak_kl_ci[0]:.3g}-{result.peak_kl_ci[1]:.3g})",
                )
            )
    fig.update_layout(
        title=title or ("Best-of-n: proxy vs gold reward" if bon else "Proxy vs gold reward"),
        xaxis_title=("sqrt(KL) " if x_axis == "sqrt_kl" else "KL ") + ("(analytic log n - (n-1)/n, an upper bound)" if bon else "to the initial policy"),
        yaxis_title="reward",
        hovermode="x unified",
    )
    if bon:
        fig.add_annotation(
            text=_KL_NOTE, xref="paper", yref="paper", x=0, y=-0.3, showarrow=False, font=dict(size=10),
            xanchor="left", yanchor="top",
        )
        fig.update_layout(margin=dict(b=110))
    return fig


def checkpoint_curves(frame: pd.DataFrame, *, by: str = "beta", title: str | None = None) -> go.Figure:
    """Gold and proxy reward of policy checkpoints against sqrt(KL(pi || pi_ref)), one line per ``by``.

    Args:
        frame: from :func:`rmlab.checkpoint_curve` (``kl``, ``gold``, ``proxy``, their ``*_se``,
            ``checkpoint``, and ``by`` / ``step`` when the labels carry them).
        by: the column whose values get separate lines (e.g. ``"beta"``); ``None`` for one line.
        title: figure title.

    Direct alignment algorithms overoptimise too (Rafailov et al. 2024, "Scaling Laws for Reward
    Model Overoptimization in Direct Alignment Algorithms"): along training, and across betas, the
    gold reward can peak and fall while KL grows. Here KL is estimated from each checkpoint's own
    samples (not the best-of-n bound), with its standard error as horizontal bars.
    """
    require_columns(frame, ["kl", "gold", "proxy"], "rmlab.checkpoint_curve")
    data = frame.copy()
    data["sqrt_kl"] = np.sqrt(np.clip(data["kl"].to_numpy(float), 0, None))
    groups = data.groupby(by, sort=True) if by and by in data.columns else [(None, data)]
    palette = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
    fig = go.Figure()
    for k, (value, part) in enumerate(groups):
        part = part.sort_values("step" if "step" in part.columns else "kl")
        color = palette[k % len(palette)]
        name = f"{by}={value:g}" if value is not None and isinstance(value, (int, float)) else str(value or "checkpoints")
        labels = part["step"].astype(str) if "step" in part.columns else part.get("checkpoint", part.index).astype(str)
        for column, dash in (("gold", "solid"), ("proxy", "dash")):
            se = part.get(f"{column}_se")
            fig.add_trace(
                go.Scatter(
                    x=part["sqrt_kl"], y=part[column], mode="lines+markers+text", text=labels,
                    textposition="top center", textfont=dict(size=9, color=color),
                    line=dict(color=color, dash=dash), name=f"{column}, {name}", legendgroup=name,
                    error_y=dict(type="data", array=se.to_numpy(float)) if se is not None else None,
                    hovertemplate=f"{name}<br>step %{{text}}<br>sqrt KL %{{x:.3f}}<br>{column} %{{y:.3f}}<extra></extra>",
                )
            )
    fig.update_layout(
        title=title or "Checkpoints: gold (solid) and proxy (dashed) reward against KL to the reference",
        xaxis_title="sqrt(KL(π || π_ref)), estimated from the policy's own samples",
        yaxis_title="reward", legend=dict(orientation="h", y=-0.2),
    )
    return fig
