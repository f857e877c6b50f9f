"""The frames figures are drawn from: every figure function takes a tidy rmlab frame first and checks it here."""

from __future__ import annotations

from collections.abc import Iterable

import pandas as pd

from rmlab.errors import DataError


def require_columns(frame: pd.DataFrame, columns: Iterable[str], producer: str) -> None:
    """Raise :class:`rmlab.DataError` naming ``producer`` when ``frame`` lacks any of ``columns``.

    Args:
        frame: the frame a figure was given (its first argument).
        columns: the columns the figure reads.
        producer: the rmlab function(s) whose frames carry them, e.g. ``"rmlab.reward_scores"``.
    """
    if not isinstance(frame, pd.DataFrame):
        raise DataError(f"This figure needs a pandas DataFrame from {producer}, not a {type(frame).__name__}.")
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(f"This figure needs a frame from {producer}; it lacks the columns {missing}.")
