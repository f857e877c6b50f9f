"""Preference probabilities stored in a column of the data: ``p = P(chosen is preferred)`` per pair.

The idealised ranking accuracy of :func:`rmlab.ranking_accuracy` (Chen et al. 2024) and the
labeller calibration of :func:`rmlab.reward_model_report` (Guo et al. 2017 on the Bradley-Terry
probability of Ouyang et al. 2022) both read such a column (``true_prob`` in the toy world, or the
fraction of raters who chose the response). It is checked here once, the same way for both.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from rmlab.errors import DataError


def show_cell(value) -> str:
    """A cell for an error message: its ``repr``, numpy scalars as plain Python values."""
    return repr(value.item() if isinstance(value, np.generic) else value)


def probability_column(frame: pd.DataFrame, column: str, advice: str) -> np.ndarray:
    """``frame[column]`` as float64 probabilities, every one a finite number in [0, 1]: the ``p`` of
    Chen et al. 2024's idealised ranking accuracy, or the labeller's probability a Bradley-Terry
    reward model is calibrated against (Guo et al. 2017).

    Raises:
        DataError: naming the first row that is missing, not a number or outside [0, 1], how many
            such rows there are, and ``advice`` (what to do about them).
    """
    raw = frame[column]
    values = pd.to_numeric(raw, errors="coerce").to_numpy(np.float64)
    bad = np.flatnonzero(~np.isfinite(values) | (values < 0) | (values > 1))
    if len(bad):
        row = int(bad[0])
        raise DataError(
            f"Row {row}, column {column!r}: {show_cell(raw.iloc[row])} is not a probability in [0, 1] "
            f"({len(bad)} such row(s)). {advice}"
        )
    return values
