"""Notebook explorers (ipywidgets): rmlab's core numbers and figures, live, with one shared selection.

- :class:`PairTable`: sort and filter pairs by margin, correctness, CHES, strength; a click selects.
- :class:`TokenRewardViewer`: a pair's responses coloured token by token (implicit DPO reward,
  dense reward-model reward, or attribution).
- :class:`EntanglementExplorer`: lr and beta sliders re-predict every pair's log-prob changes.
- :class:`DisplacementExplorer`: step through a tracked DPO run; CHES against the change.
- :class:`OveroptimizationExplorer`: proxy / ensemble, KL axis and fitted law.
- :class:`Dashboard`: the explorers in tabs, following one :class:`Selection`.

Figures are plotly ``FigureWidget`` s updated in place. Nothing here loads scripts from a CDN; the
explorers need a running kernel, while plain figures (``rmlab.plots`` after
``rmlab.plots.setup_notebook()``) also render in exported notebooks.
"""

from rmlab.widgets.base import Explorer, Selection
from rmlab.widgets.dashboard import Dashboard
from rmlab.widgets.displacement import DisplacementExplorer
from rmlab.widgets.entanglement import EntanglementExplorer
from rmlab.widgets.overoptimization import OveroptimizationExplorer
from rmlab.widgets.pair_table import PairTable
from rmlab.widgets.token_viewer import TokenRewardViewer

__all__ = [
    "Dashboard",
    "DisplacementExplorer",
    "EntanglementExplorer",
    "Explorer",
    "OveroptimizationExplorer",
    "PairTable",
    "Selection",
    "TokenRewardViewer",
]
