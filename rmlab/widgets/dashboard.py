"""The dashboard: rmlab's explorers in tabs, all following one selected pair."""

from __future__ import annotations

from collections.abc import Mapping

import ipywidgets as widgets

from rmlab.errors import ArgumentError
from rmlab.widgets.base import Explorer, Selection


class Dashboard(widgets.VBox):
    """Explorers in tabs with ONE shared :class:`Selection`: a pair clicked in any tab shows in all.

    Args:
        explorers: ``{tab title: explorer}`` (or a list of explorers, titled by their class), e.g. a
            :class:`PairTable`, a :class:`TokenRewardViewer`, an :class:`EntanglementExplorer`, a
            :class:`DisplacementExplorer` and an :class:`OveroptimizationExplorer`.
        selection: the selection to share (default: the first explorer's).

    Each explorer is re-bound to the shared selection, so the pair selected before the dashboard was
    built stays selected. ``dashboard.selection.pair = 3`` selects pair 3 everywhere.
    """

    def __init__(self, explorers, *, selection: Selection | None = None):
        if not isinstance(explorers, Mapping):
            explorers = {type(e).__name__: e for e in explorers}
        if not explorers:
            raise ArgumentError("Dashboard needs at least one explorer.")
        bad = [name for name, e in explorers.items() if not isinstance(e, Explorer)]
        if bad:
            raise ArgumentError(f"tabs {bad} are not rmlab explorers (rmlab.widgets.*).")
        self.explorers = dict(explorers)
        first = next(iter(self.explorers.values()))
        self.selection = selection or first.selection
        for explorer in self.explorers.values():
            explorer.bind(self.selection)
        self.banner = widgets.HTML()
        self.tabs = widgets.Tab(children=list(self.explorers.values()), titles=list(self.explorers))
        super().__init__([self.banner, self.tabs])
        self.selection.observe(self._selected, "pair")
        self._selected({"new": self.selection.pair})

    def _selected(self, change) -> None:
        pair = change["new"]
        self.banner.value = "no pair selected" if pair is None else f"<b>selected: pair {pair}</b> (shown in every tab)"
