"""The entanglement explorer: move lr and beta, watch the predicted changes of every pair's log-probs."""

from __future__ import annotations

import math

import ipywidgets as widgets
import pandas as pd
import plotly.graph_objects as go

from rmlab import plots
from rmlab.diagnostics.entanglement import predict_entanglement
from rmlab.errors import DataError
from rmlab.widgets.base import Explorer, Selection, highlight, replace_figure


class EntanglementExplorer(Explorer):
    """Gradient entanglement of a policy on preference pairs, with the step's lr and beta on sliders.

    Yuan et al. 2024: one step of the DPO loss on a pair changes ``log pi(y_w)`` by
    ``lr * c * (|g_w|^2 - <g_w, g_l>)`` with ``c = beta * sigmoid(-margin)``. The gradients do not
    depend on lr or beta, so the sliders re-predict every pair instantly from the frame
    (:func:`rmlab.diagnostics.predict_entanglement`); no model runs.

    Args:
        frame: from :func:`rmlab.gradient_entanglement` (with a ``reference``, beta acts through DPO's
            loss weight; without one the beta slider is disabled).
        selection: the shared :class:`Selection`; clicking a point selects its pair.

    Top: ``<g_w, g_l>`` against ``|g_w|^2`` (above the dashed line the chosen log-prob falls), coloured
    by the predicted change of the chosen log-prob. Below: the predicted changes of the rejected and
    the chosen log-prob per pair.
    """

    def __init__(self, frame: pd.DataFrame, *, selection: Selection | None = None):
        if not isinstance(frame, pd.DataFrame) or "grad_inner" not in frame.columns or "lr" not in frame.attrs:
            raise DataError("EntanglementExplorer needs a frame from rmlab.gradient_entanglement.")
        self.frame = frame
        lr, beta = float(frame.attrs["lr"]), float(frame.attrs["beta"])
        self.lr = widgets.FloatLogSlider(value=lr, base=10, min=math.log10(lr) - 3, max=math.log10(lr) + 2, step=0.05,
                                         description="lr", readout_format=".2e", continuous_update=False)
        self.beta = widgets.FloatLogSlider(value=beta, base=10, min=-3, max=1, step=0.05, description="beta",
                                           readout_format=".3g", continuous_update=False,
                                           disabled=frame.attrs.get("loss_weight") != "dpo")
        self.summary = widgets.HTML()
        self.scatter = go.FigureWidget()
        self.changes = go.FigureWidget()
        for fig in (self.scatter, self.changes):
            fig.layout.height = 460
        super().__init__(
            [widgets.HBox([self.lr, self.beta]), self.summary, self.scatter, self.changes],
            selection=selection,
        )
        for slider in (self.lr, self.beta):
            slider.observe(self.callback(lambda _change: self.redraw()), "value")
        self.guarded(self.redraw)

    @property
    def predicted(self) -> pd.DataFrame:
        """The frame re-predicted at the sliders' lr and beta."""
        return predict_entanglement(self.frame, beta=self.beta.value, lr=self.lr.value)

    def redraw(self) -> None:
        """Re-predict at the sliders' values and redraw both figures (and the selected pair)."""
        if not hasattr(self, "changes"):
            return
        frame = self.predicted
        pair = self.selection.pair
        scatter = plots.entanglement_scatter(frame, color="pred_delta_chosen")
        changes = plots.predicted_changes(frame)
        row = frame[frame["pair"] == pair] if pair is not None else frame.iloc[:0]
        if not row.empty:
            r = row.iloc[0]
            highlight(scatter, r["grad_sq_chosen"], r["grad_inner"], pair)
            highlight(changes, r["pred_delta_rejected"], r["pred_delta_chosen"], pair)
        for target, source in ((self.scatter, scatter), (self.changes, changes)):
            source.update_layout(height=460, title_font_size=13)
            replace_figure(target, source)
            self.on_point_click(target)
        margin_growth = (frame["pred_delta_chosen"] - frame["pred_delta_rejected"]).mean()
        text = (
            f"lr = {self.lr.value:.2e}, beta = {self.beta.value:.3g}: mean predicted change of log π(y_w) "
            f"{frame['pred_delta_chosen'].mean():+.3g}, of log π(y_l) {frame['pred_delta_rejected'].mean():+.3g}; "
            f"the log-ratio margin grows by {margin_growth:.3g} on average. The chosen log-prob falls on "
            f"{int(frame['chosen_falls'].sum())} of {len(frame)} pairs at every lr and beta (a sign of the gradients)."
        )
        if not row.empty:
            r = row.iloc[0]
            text += (
                f"<br><b>pair {pair}</b>: Δ log π(y_w) {r['pred_delta_chosen']:+.3g}, Δ log π(y_l) "
                f"{r['pred_delta_rejected']:+.3g}, gradient cosine {r['grad_cosine']:.3f}"
            )
        self.summary.value = text

    def show_pair(self, pair: int | None) -> None:
        self.redraw()
