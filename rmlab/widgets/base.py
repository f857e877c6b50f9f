"""What every rmlab explorer shares: one pair selection, figures updated in place, errors shown.

An explorer is an ``ipywidgets.VBox`` of controls and plotly ``FigureWidget`` s. It holds UI state
only: numbers come from rmlab's core functions, figures from :mod:`rmlab.plots`. Explorers that show
preference pairs share a :class:`Selection`; clicking a pair in one of them selects it in all that
share the object (:class:`rmlab.widgets.Dashboard` hands one to each of its tabs).

Errors raised inside a callback (a slider moved, a point clicked) do not vanish into the kernel log:
the explorer shows them in a red box under its controls and keeps the exception in ``last_error``.
"""

from __future__ import annotations

import functools
import html
import math

import ipywidgets as widgets
import numpy as np
import plotly.graph_objects as go
import traitlets


class Selection(traitlets.HasTraits):
    """The preference pair selected in every view that shares this object.

    ``pair`` is the pair's index, as in the ``pair`` column of rmlab's frames (the row of the data
    they were computed from), or None. Observe it with ``selection.observe(fn, "pair")``.
    """

    pair = traitlets.Int(None, allow_none=True)

    def __repr__(self) -> str:
        return f"Selection(pair={self.pair})"


def replace_figure(target: go.FigureWidget, source: go.Figure) -> None:
    """Show ``source`` in the live ``target`` widget: its traces and layout replace the old ones.

    The widget keeps its identity (and its place in the notebook); only the traces and the layout
    travel to the browser. Click handlers belong to traces, so re-attach them afterwards.
    """
    target.data = []
    target.add_traces([_json_safe(trace.to_plotly_json()) for trace in source.data])
    target.layout = source.layout


def _json_safe(value):
    """``value`` with every NaN / infinite float replaced by None (a gap, as plotly draws null).

    Widget state travels as strict JSON, which has no NaN: a heatmap padded with NaN would fail to
    serialise in the browser ("Out of range float values are not JSON compliant").
    """
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (list, tuple, np.ndarray)):
        try:
            arr = np.asarray(value)
        except ValueError:  # ragged
            arr = None
        if arr is not None and arr.dtype.kind == "f":
            if np.isfinite(arr).all():
                return value
            out = arr.astype(object)
            out[~np.isfinite(arr)] = None
            return out.tolist()
        if arr is not None and arr.dtype.kind in "iub":
            return value
        return [_json_safe(v) for v in value]
    return value


def pair_of_point(trace, index: int) -> int | None:
    """The pair id behind point ``index`` of a trace whose ``customdata`` starts with the pair."""
    data = trace.customdata
    if data is None or index >= len(data):
        return None
    value = data[index]
    if isinstance(value, (list, tuple)) or getattr(value, "ndim", 0):
        value = value[0]
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


class Explorer(widgets.VBox):
    """Base of the explorers: a shared :class:`Selection`, an error box, guarded callbacks."""

    def __init__(self, children, *, selection: Selection | None = None, **kwargs):
        self.error_box = widgets.HTML(layout=widgets.Layout(display="none"))
        self.last_error: BaseException | None = None
        super().__init__([*children, self.error_box], **kwargs)
        self.selection = None
        self.bind(selection if selection is not None else Selection())

    # -- the shared selection ------------------------------------------------------------------
    def bind(self, selection: Selection) -> None:
        """Follow (and drive) ``selection`` instead of the current one."""
        if not isinstance(selection, Selection):
            raise TypeError(f"selection must be an rmlab.widgets.Selection, not {type(selection).__name__}.")
        if self.selection is not None:
            self.selection.unobserve(self._selection_changed, "pair")
        self.selection = selection
        selection.observe(self._selection_changed, "pair")
        self._selection_changed({"new": selection.pair})

    def select(self, pair: int | None) -> None:
        """Select ``pair`` in this explorer and in every view sharing its selection."""
        self.selection.pair = None if pair is None else int(pair)

    def _selection_changed(self, change) -> None:
        self.guarded(self.show_pair, change["new"])

    def show_pair(self, pair: int | None) -> None:
        """Redraw for a newly selected pair (explorers without pairs ignore it)."""

    # -- errors --------------------------------------------------------------------------------
    def guarded(self, fn, *args, **kwargs):
        """Run ``fn``; show an exception in the explorer's error box instead of losing it."""
        try:
            out = fn(*args, **kwargs)
        except Exception as err:  # shown to the user; also kept for programmatic access
            self.last_error = err
            self.error_box.value = (
                "<div style='color:#b00020;border:1px solid #b00020;padding:4px 8px;border-radius:3px'>"
                f"<b>{html.escape(type(err).__name__)}</b>: {html.escape(str(err))}</div>"
            )
            self.error_box.layout.display = None
            return None
        self.last_error = None
        self.error_box.value = ""
        self.error_box.layout.display = "none"
        return out

    def callback(self, fn):
        """``fn`` wrapped by :meth:`guarded`, for ``observe`` / ``on_click`` handlers."""

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            return self.guarded(fn, *args, **kwargs)

        return wrapper

    def on_point_click(self, figure: go.FigureWidget, trace_names=None) -> None:
        """Clicking a point of these traces (default: all with ``customdata``) selects its pair."""

        def clicked(trace, points, _state=None):
            if points.point_inds:
                pair = pair_of_point(trace, points.point_inds[0])
                if pair is not None:
                    self.select(pair)

        for trace in figure.data:
            if trace.customdata is not None and (trace_names is None or trace.name in trace_names):
                trace.on_click(self.callback(clicked))


def highlight(fig: go.Figure, x, y, pair: int) -> go.Figure:
    """Ring the selected pair's point in a figure (an extra trace, outside the legend)."""
    fig.add_trace(
        go.Scatter(
            x=[x], y=[y], mode="markers", name=f"selected: pair {pair}", showlegend=False, hoverinfo="skip",
            marker=dict(size=20, symbol="circle-open", color="black", line=dict(width=3)),
        )
    )
    return fig
