"""Figures of implicit and explicit rewards: margin distributions and token-level reward text."""

from __future__ import annotations

import html

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from rmlab.deprecation import renamed_arguments
from rmlab.errors import DataError
from rmlab.plots.frames import require_columns

#: Diverging scale for rewards: red below zero, white at zero, blue above.
REWARD_COLORSCALE = "RdBu"


def reward_margins(frame: pd.DataFrame, *, by: str | None = None, title: str | None = None) -> go.Figure:
    """Histogram of reward margins (chosen minus rejected), one trace per group.

    Args:
        frame: from :func:`rmlab.implicit_rewards` (``margin``) or :func:`rmlab.reward_scores`.
        by: column whose values become separate, overlaid histograms (e.g. ``"beta"``).
        title: figure title.

    Margins right of the dashed zero line are pairs the reward ranks correctly (DPO's
    ``rewards/accuracies``).
    """
    require_columns(frame, ["margin"], "rmlab.implicit_rewards or rmlab.reward_scores")
    fig = go.Figure()
    groups = frame.groupby(by, sort=True) if by else [("all pairs", frame)]
    for name, group in groups:
        margins = group["margin"].dropna()
        acc = float((margins > 0).mean()) if len(margins) else float("nan")
        label = f"{by}={name}" if by else str(name)
        fig.add_trace(
            go.Histogram(x=margins, name=f"{label} (accuracy {acc:.0%})", opacity=0.6, nbinsx=50)
        )
    fig.add_vline(x=0, line_dash="dash", line_color="black")
    fig.update_layout(
        barmode="overlay",
        title=title or "Reward margin r(x, y_chosen) - r(x, y_rejected)",
        xaxis_title="margin",
        yaxis_title="pairs",
        legend_title=by or "",
    )
    return fig


@renamed_arguments("rmlab.plots.token_reward_text", {"tokens": "frame"})
def token_reward_text(
    frame: pd.DataFrame,
    pair: int,
    *,
    width: int = 12,
    max_tokens: int = 600,
    start: int = 0,
    value: str = "reward",
    title: str | None = None,
) -> go.Figure:
    """One pair's responses as text, each token coloured by its reward, chosen beside rejected.

    Args:
        frame: a per-token frame: :func:`rmlab.token_rewards` (implicit DPO rewards),
            :func:`rmlab.dense_rewards` (reward-model rewards) or :func:`rmlab.attribute_reward`
            (``value="attribution"``); columns ``pair`` (or ``row`` for single texts), ``side``,
            ``position``, ``token`` and the ``value`` column.
        pair: which pair (or row) to show.
        width: tokens per line.
        max_tokens: at most this many tokens of each response are drawn (the title says which), so a
            figure stays usable for responses of thousands of tokens; page through them with ``start``.
        start: index of the first token drawn (pages: ``start = k * max_tokens``).
        value: the column that colours the tokens (``"reward"`` by default).
        title: figure title.

    The colour scale is diverging and centred at zero, symmetric in the largest absolute value of
    the pair. Token text is HTML-escaped; whitespace and newlines are shown as visible marks.
    Hovering a token shows its position, text, log-probs and reward.
    """
    columns = getattr(frame, "columns", ())
    key = "row" if "row" in columns and "pair" not in columns else "pair"
    require_columns(frame, [key, "side", "position", "token", value], "rmlab.token_rewards or rmlab.dense_rewards")
    rows = frame[frame[key] == pair]
    if rows.empty:
        raise DataError(f"{key}={pair} is not in the frame ({key}s {frame[key].min()}..{frame[key].max()}).")
    sides = [s for s in ("chosen", "rejected", "response") if (rows["side"] == s).any()]
    fig = make_subplots(rows=1, cols=len(sides), subplot_titles=sides, horizontal_spacing=0.04)
    bound = float(np.nanmax(np.abs(rows[value].to_numpy()))) or 1.0
    if isinstance(start, bool) or not isinstance(start, (int, np.integer)) or start < 0:
        raise DataError(f"start={start!r} must be a token index >= 0.")
    longest = int(rows.groupby("side", observed=True).size().max())
    cut = start > 0 or longest > max_tokens
    for col, side in enumerate(sides, start=1):
        part = rows[rows["side"] == side].sort_values("position").iloc[start : start + max_tokens]
        n = len(part)
        lines = max(1, int(np.ceil(n / width)))
        z = np.full((lines, width), np.nan)
        text = np.full((lines, width), "", dtype=object)
        hover = np.full((lines, width), "", dtype=object)
        for k, (_, r) in enumerate(part.iterrows()):
            i, j = divmod(k, width)
            shown = html.escape(str(r["token"])).replace("\n", "⏎").replace(" ", "·")
            z[i, j] = r[value]
            text[i, j] = shown
            extra = "".join(
                f"<br>{c} = {r[c]:.4f}" for c in ("logp", "ref_logp", "prefix_score", "cum_reward", "attribution")
                if c != value and c in r and pd.notna(r[c])
            )
            hover[i, j] = f"#{int(r['position'])} {shown}<br>{value} = {r[value]:.4f}{extra}"
        fig.add_trace(
            go.Heatmap(
                z=z, text=text, customdata=hover, texttemplate="%{text}", textfont=dict(size=11), hovertemplate="%{customdata}<extra></extra>",
                colorscale=REWARD_COLORSCALE, zmid=0, zmin=-bound, zmax=bound, xgap=2, ygap=2,
                showscale=(col == len(sides)), colorbar=dict(title=dict(text=value, side="right"), thickness=12),
            ),
            row=1, col=col,
        )
        fig.update_yaxes(autorange="reversed", showticklabels=False, row=1, col=col)
        fig.update_xaxes(showticklabels=False, row=1, col=col)
    total = rows.groupby("side", observed=True)[value].sum()
    summary = ", ".join(f"{s}: {total.get(s, float('nan')):+.3f}" for s in sides)
    fig.update_layout(
        title=(title or f"{value} per token, {key} {pair} ({summary})")
        + (f" - tokens {start}-{min(start + max_tokens, longest) - 1} of {longest}" if cut else ""),
        height=170 + 42 * max(2, int(np.ceil(max(1, min(longest - start, max_tokens)) / width))),
        margin=dict(t=90, b=20, l=20, r=20),
        plot_bgcolor="white",
    )
    return fig
