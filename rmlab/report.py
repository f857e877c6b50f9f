"""A static HTML report of rmlab figures: shareable without Jupyter, a kernel or a network.

plotly.js is embedded once, inline (no CDN, no requirejs), so the file opens offline in any
browser. All text taken from models or data is HTML-escaped.
"""

from __future__ import annotations

import html
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go


def write_report(
    path: str | Path,
    figures: dict[str, go.Figure],
    *,
    title: str = "rmlab report",
    tables: dict[str, pd.DataFrame] | None = None,
    notes: list[str] | None = None,
) -> Path:
    """Write figures (and small tables) into one self-contained HTML file.

    Args:
        path: output file.
        figures: section heading -> plotly figure.
        title: page title.
        tables: section heading -> DataFrame, rendered as escaped HTML tables.
        notes: paragraphs of plain text shown under the title.

    Returns:
        The path written.
    """
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;font-size:0.9em}td,th{border:1px solid #ccc;padding:2px 8px;"
        "text-align:right}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    parts += [f"<p>{html.escape(n)}</p>" for n in notes or []]
    for name, table in (tables or {}).items():
        parts.append(f"<h2>{html.escape(name)}</h2>")
        parts.append(table.to_html(escape=True, float_format=lambda v: f"{v:.4g}", index=False))
    first = True
    for name, fig in figures.items():
        parts.append(f"<h2>{html.escape(name)}</h2>")
        parts.append(fig.to_html(full_html=False, include_plotlyjs=True if first else False))
        first = False
    parts.append("</body></html>")
    path = Path(path)
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
