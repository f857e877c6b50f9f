"""Pure functions from rmlab's tidy DataFrames to plotly figures (no torch here)."""

from rmlab.plots.entanglement import (
    ches_vs_change,
    displacement_trajectories,
    entanglement_scatter,
    predicted_changes,
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
    "similarity_matrix",
    "token_reward_text",
]
