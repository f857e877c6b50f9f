"""A pair table to sort and filter: margins, correctness, CHES, preference strength; a click selects."""

from __future__ import annotations

import html

import ipywidgets as widgets
import numpy as np
import pandas as pd

from rmlab.errors import DataError
from rmlab.widgets.base import Explorer, Selection

#: Numeric columns offered as range filters when the frame has them (implicit_rewards, ches,
#: preference_strength, gradient_entanglement, reward_scores frames).
FILTER_COLUMNS = ("margin", "ln_ches", "strength_mean", "grad_cosine", "pred_delta_chosen")
#: Columns shown first in each row, when present.
SHOWN_COLUMNS = (
    "margin", "correct", "reward_chosen", "reward_rejected", "ln_ches", "strength_mean", "likely_mislabelled",
    "chosen_falls", "delta_chosen", "tokens_chosen", "tokens_rejected", "truncated",
)


def _fmt(value, width: int) -> str:
    if isinstance(value, (bool, np.bool_)):
        text = "yes" if value else "no"
    elif isinstance(value, (float, np.floating)):
        text = "nan" if np.isnan(value) else f"{value:.4g}"
    elif value is None or value is pd.NA:
        text = "-"
    else:
        text = str(value)
    return text[:width].rjust(width)


class PairTable(Explorer):
    """Every pair of a per-pair frame in a list: sort, filter, click a row to select that pair.

    Args:
        frame: one row per pair with a ``pair`` column, e.g. :func:`rmlab.implicit_rewards` (joined
            with :func:`rmlab.ches` or :func:`rmlab.preference_strength` columns to filter by them:
            ``frame.merge(ches_frame[["pair", "ln_ches"]], on="pair")``).
        selection: the shared :class:`Selection` (a new one if None).
        columns: which columns to show (default: the known ones present, see ``SHOWN_COLUMNS``).
        rows: visible rows of the list.

    Controls: a sort column and order; a range slider for each numeric filter column present
    (``margin``, ``ln_ches``, ``strength_mean``, ...); "correct" all / yes / no when the frame has
    ``correct``. ``table.visible`` is the filtered, sorted frame.
    """

    def __init__(
        self,
        frame: pd.DataFrame,
        *,
        selection: Selection | None = None,
        columns: list[str] | None = None,
        rows: int = 14,
    ):
        if not isinstance(frame, pd.DataFrame) or "pair" not in frame.columns:
            raise DataError(
                "PairTable needs a per-pair DataFrame with a 'pair' column (e.g. from rmlab.implicit_rewards)."
            )
        self.frame = frame.reset_index(drop=True)
        if columns is None:
            columns = [c for c in SHOWN_COLUMNS if c in frame.columns]
        unknown = [c for c in columns if c not in frame.columns]
        if unknown:
            raise DataError(f"columns {unknown} are not in the frame (it has {list(frame.columns)}).")
        self.columns = ["pair", *[c for c in columns if c != "pair"]]
        self.width = 10
        sortable = [c for c in self.columns if pd.api.types.is_numeric_dtype(frame[c]) or pd.api.types.is_bool_dtype(frame[c])]
        self.sort_by = widgets.Dropdown(options=sortable, value="margin" if "margin" in sortable else "pair",
                                        description="sort by", layout=widgets.Layout(width="230px"))
        self.descending = widgets.Checkbox(value=False, description="descending", indent=False,
                                           layout=widgets.Layout(width="110px"))
        self.filters: dict[str, widgets.FloatRangeSlider] = {}
        for name in FILTER_COLUMNS:
            if name in frame.columns and pd.api.types.is_numeric_dtype(frame[name]):
                values = frame[name].to_numpy(dtype=float)
                values = values[np.isfinite(values)]
                if len(values) == 0 or values.min() == values.max():
                    continue
                lo, hi = float(values.min()), float(values.max())
                self.filters[name] = widgets.FloatRangeSlider(
                    value=(lo, hi), min=lo, max=hi, step=(hi - lo) / 200, description=name,
                    readout_format=".3g", continuous_update=False, layout=widgets.Layout(width="420px"),
                )
        self.correct = None
        if "correct" in frame.columns:
            self.correct = widgets.ToggleButtons(options=["all", "correct", "wrong"], value="all",
                                                 description="ranking", style={"button_width": "70px"})
        self.count = widgets.HTML()
        self.header = widgets.HTML()
        self.list = widgets.Select(options=[], rows=rows, layout=widgets.Layout(width="100%"))
        self.list.add_class("rmlab-pair-list")
        # a fixed-width font keeps the columns of the list aligned under the header
        style = widgets.HTML("<style>.rmlab-pair-list select{font-family:monospace;font-size:0.85em}</style>")
        controls = [widgets.HBox([self.sort_by, self.descending]), *self.filters.values()]
        if self.correct is not None:
            controls.append(self.correct)
        super().__init__([style, *controls, self.count, self.header, self.list], selection=selection)
        for control in [self.sort_by, self.descending, *self.filters.values(), *([self.correct] if self.correct else [])]:
            control.observe(self.callback(lambda _change: self.refresh()), "value")
        self.list.observe(self.callback(self._clicked), "value")
        self.refresh()

    @property
    def visible(self) -> pd.DataFrame:
        """The rows passing the filters, in the chosen order."""
        f = self.frame
        keep = np.ones(len(f), dtype=bool)
        for name, slider in self.filters.items():
            lo, hi = slider.value
            values = f[name].to_numpy(dtype=float)
            at_edge = (lo <= slider.min) and (hi >= slider.max)
            keep &= ((values >= lo) & (values <= hi)) | (at_edge & ~np.isfinite(values))
        if self.correct is not None and self.correct.value != "all":
            # a pair without a result (NA: a response truncated to nothing) is neither correct nor wrong
            keep &= f["correct"].eq(self.correct.value == "correct").fillna(False).to_numpy(dtype=bool)
        return f[keep].sort_values(self.sort_by.value, ascending=not self.descending.value, kind="stable")

    def refresh(self) -> None:
        """Re-apply sort and filters to the list (controls call it)."""
        shown = self.visible
        w = self.width
        self.header.value = (
            "<pre style='margin:0;font-size:0.85em'>"
            + html.escape(" ".join(c[:w].rjust(w) for c in self.columns))
            + "</pre>"
        )
        options = [
            (" ".join(_fmt(row[c], w) for c in self.columns), int(row["pair"]))
            for _, row in shown[self.columns].iterrows()
        ]
        self._updating = True
        try:
            self.list.options = options
            current = self.selection.pair
            self.list.value = current if current in set(shown["pair"].astype(int)) else None
        finally:
            self._updating = False
        self.count.value = f"{len(shown)} of {len(self.frame)} pairs"

    def _clicked(self, change) -> None:
        if not getattr(self, "_updating", False) and change["new"] is not None:
            self.select(change["new"])

    def show_pair(self, pair: int | None) -> None:
        if not hasattr(self, "list"):
            return
        values = {v for _, v in self.list.options}
        self._updating = True
        try:
            self.list.value = pair if pair in values else None
        finally:
            self._updating = False
