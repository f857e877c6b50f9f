"""The displacement explorer: step through a tracked DPO run and watch chosen log-probs fall."""

from __future__ import annotations

import ipywidgets as widgets
import pandas as pd
import plotly.graph_objects as go

from rmlab import plots
from rmlab.errors import DataError
from rmlab.widgets.base import Explorer, Selection, highlight, replace_figure


class DisplacementExplorer(Explorer):
    """A tracked DPO run (:func:`rmlab.track_dpo`) with a step slider, and CHES against the change.

    Razin et al. 2024 (likelihood displacement): DPO can lower the chosen response's likelihood while
    the margin grows, most for pairs whose responses have similar hidden representations (high CHES).

    Args:
        run: a :class:`rmlab.DisplacementRun` or its ``trajectories`` frame.
        ches: optional :func:`rmlab.ches` frame on the same pairs: adds LN-CHES against the change of
            the chosen log-prob up to the selected step (click a point to select its pair).
        selection: the shared :class:`Selection`; the selected pair is drawn thick.
        max_pairs: pairs drawn individually besides the selected one (those whose chosen log-prob
            fell most by the selected step).
    """

    def __init__(self, run, *, ches: pd.DataFrame | None = None, selection: Selection | None = None, max_pairs: int = 8):
        trajectories = getattr(run, "trajectories", run)
        if not isinstance(trajectories, pd.DataFrame) or not {"step", "pair", "logps_chosen"} <= set(trajectories.columns):
            raise DataError("DisplacementExplorer needs rmlab.track_dpo's result (or its trajectories frame).")
        if ches is not None and not {"pair", "ln_ches"} <= set(getattr(ches, "columns", [])):
            raise DataError("ches must be a frame from rmlab.ches (columns 'pair' and 'ln_ches').")
        self.trajectories, self.ches, self.max_pairs = trajectories, ches, max_pairs
        steps = sorted(int(s) for s in trajectories["step"].unique())
        if len(steps) < 2:
            raise DataError("the run has a single step; track at least two (steps >= 1) to see a change.")
        self.step = widgets.SelectionSlider(options=steps, value=steps[-1], description="step",
                                            continuous_update=False, layout=widgets.Layout(width="520px"))
        self.summary = widgets.HTML()
        self.lines = go.FigureWidget()
        self.points = go.FigureWidget()
        children = [self.step, self.summary, self.lines] + ([self.points] if ches is not None else [])
        super().__init__(children, selection=selection)
        self.step.observe(self.callback(lambda _change: self.redraw()), "value")
        self.guarded(self.redraw)

    def redraw(self) -> None:
        """Redraw up to the slider's step."""
        if not hasattr(self, "points"):
            return
        step, pair = self.step.value, self.selection.pair
        upto = self.trajectories[self.trajectories["step"] <= step]
        t = upto.sort_values(["pair", "step"])
        delta = t.groupby("pair")["logps_chosen"].last() - t.groupby("pair")["logps_chosen"].first()
        shown = delta.nsmallest(self.max_pairs).index.tolist()
        if pair is not None and pair in delta.index and pair not in shown:
            shown.append(pair)
        lines = plots.displacement_trajectories(upto, pairs=shown)
        if pair is not None and pair in delta.index:
            mine = t[t["pair"] == pair]
            base = mine.iloc[0]
            lines.add_trace(go.Scatter(x=mine["step"], y=mine["logps_chosen"] - base["logps_chosen"], mode="lines",
                                       line=dict(width=5, color="black"), name=f"pair {pair} chosen (selected)"))
            lines.add_trace(go.Scatter(x=mine["step"], y=mine["logps_rejected"] - base["logps_rejected"], mode="lines",
                                       line=dict(width=5, color="black", dash="dot"), name=f"pair {pair} rejected"))
        steps = self.step.options
        lines.update_layout(xaxis_range=[steps[0], steps[-1]], height=440, title_font_size=13)
        replace_figure(self.lines, lines)
        if self.ches is not None:
            points = plots.ches_vs_change(self.ches, upto)
            if pair is not None and pair in delta.index:
                row = self.ches[self.ches["pair"] == pair]
                if not row.empty:
                    highlight(points, row["ln_ches"].iloc[0], delta[pair], pair)
            points.update_layout(height=400, title_font_size=13)
            replace_figure(self.points, points)
            self.on_point_click(self.points)
        text = f"step {step}: the chosen log-prob fell on {int((delta < 0).sum())} of {len(delta)} pairs"
        if pair is not None and pair in delta.index:
            text += f"; pair {pair}: Δ log π(y_w) = {delta[pair]:+.3f}"
        self.summary.value = text

    def show_pair(self, pair: int | None) -> None:
        self.redraw()
