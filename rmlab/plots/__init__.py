"""Pure functions from rmlab's tidy DataFrames to plotly figures (no torch here)."""

from rmlab.plots.overoptimization import overoptimization_curve
from rmlab.plots.rewards import reward_margins, token_reward_text

__all__ = ["overoptimization_curve", "reward_margins", "token_reward_text"]
