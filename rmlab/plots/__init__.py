"""Pure functions from rmlab's tidy DataFrames to plotly figures (no torch here).

Every figure function has the call shape ``(frame, *, ...) -> plotly.graph_objects.Figure``: the frame
an rmlab analysis returned comes first (so a figure can be redrawn from a saved parquet file), options
are keywords (``token_reward_text(frame, pair)`` and ``ches_vs_change(frame, change)`` also take the pair
to show / the frame of realised changes second). ``similarity_matrix`` is the deprecated old name of :func:`similarity_heatmap` (the table
of the same name is :func:`rmlab.diagnostics.similarity_matrix`).
"""

from rmlab.plots.entanglement import (
    ches_vs_change,
    displacement_trajectories,
    entanglement_scatter,
    predicted_changes,
    similarity_heatmap,
    similarity_matrix,
)
from rmlab.plots.overoptimization import checkpoint_curves, overoptimization_curve
from rmlab.plots.renderer import setup_notebook
from rmlab.plots.reward_model import calibration_diagram, length_bias, preference_strength_map
from rmlab.plots.rewards import reward_margins, token_reward_text

__all__ = [
    "calibration_diagram",
    "checkpoint_curves",
    "ches_vs_change",
    "displacement_trajectories",
    "entanglement_scatter",
    "length_bias",
    "overoptimization_curve",
    "predicted_changes",
    "preference_strength_map",
    "reward_margins",
    "setup_notebook",
    "similarity_heatmap",
    "similarity_matrix",
    "token_reward_text",
]
