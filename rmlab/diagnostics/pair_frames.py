"""What every per-pair diagnostic frame shares: summed response log-probs and the pairs' columns.

The frames of :func:`rmlab.gradient_entanglement` (Yuan et al. 2024), :func:`rmlab.ches` and
:func:`rmlab.track_dpo` (Razin et al. 2024) and of the TRL callback describe each response by its
summed log-prob ``lp(y) = sum_t log pi(y_t | x, y_<t)`` (as DPO, Rafailov et al. 2023) and each pair
by its response token counts, its truncation flag and the input's columns, the same way everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from rmlab.engine.pairs import PairInputs

#: The two responses of a pair, in the order of their rows.
SIDES = ("chosen", "rejected")


def response_sums(values: Sequence[np.ndarray]) -> np.ndarray:
    """The summed log-prob ``lp(y)`` of each response's per-token log-probs ``values`` (float64, summed
    in float64; NaN for a response truncated to nothing), as DPO sums them (Rafailov et al. 2023)."""
    return np.array([float(v.sum(dtype=np.float64)) if len(v) else float("nan") for v in values], dtype=np.float64)


def pair_columns(
    frame: pd.DataFrame, inputs: PairInputs, *, prompt_tokens: bool = False, input_columns: bool = True
) -> pd.DataFrame:
    """``frame`` (one row per pair of ``inputs``) with ``tokens_chosen``, ``tokens_rejected`` (response
    tokens scored), ``prompt_tokens`` if asked, ``truncated``, then the input's columns unless
    ``input_columns=False``."""
    frame["tokens_chosen"] = [p.chosen.n_response for p in inputs.encoded]
    frame["tokens_rejected"] = [p.rejected.n_response for p in inputs.encoded]
    if prompt_tokens:
        frame["prompt_tokens"] = [p.prompt_tokens for p in inputs.encoded]
    frame["truncated"] = [p.truncated for p in inputs.encoded]
    if not input_columns:
        return frame
    return pd.concat([frame, inputs.pairs.reset_index(drop=True)], axis=1)
