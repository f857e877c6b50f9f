"""Rank correlations and intervals in numpy alone (rmlab does not depend on scipy).

Spearman's rho on average ranks, Kendall's tau-b with Knight's O(n log n) algorithm (Knight 1966,
"A Computer Method for Calculating Kendall's Tau with Ungrouped Data"), Pearson's r, and the Wilson
score interval of a proportion (Wilson 1927). They equal ``scipy.stats.spearmanr`` /
``scipy.stats.kendalltau`` (checked in the tests). No torch here: the figures use them too.
"""

from __future__ import annotations

import math

import numpy as np

#: z of a two-sided 95% normal interval (Wilson score interval on observed accuracies).
Z95 = 1.959963984540054


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson's r; NaN for fewer than 2 values or a constant input."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) < 2:
        return float("nan")
    dx, dy = x - x.mean(), y - y.mean()
    denom = math.sqrt(float(dx @ dx) * float(dy @ dy))
    if denom == 0 or not np.isfinite(denom):
        return float("nan")
    return float(np.clip((dx @ dy) / denom, -1.0, 1.0))


def rankdata(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank (``scipy.stats.rankdata(method="average")``)."""
    x = np.asarray(x)
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    starts = np.r_[True, sorted_x[1:] != sorted_x[:-1]]
    group = np.cumsum(starts) - 1
    first = np.flatnonzero(starts)
    counts = np.diff(np.r_[first, len(x)])
    average = first + (counts + 1) / 2.0  # mean of the 1-based positions first+1 .. first+count
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = average[group]
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rho: Pearson's r of the average ranks."""
    if len(x) < 2:
        return float("nan")
    return pearson(rankdata(x), rankdata(y))


def tie_pairs(values: np.ndarray) -> int:
    """Number of pairs (i < j) with equal values."""
    _, counts = np.unique(values, return_counts=True)
    return int((counts * (counts - 1) // 2).sum())


def inversions(y: np.ndarray) -> int:
    """Pairs i < j with y[i] > y[j] (strictly), by a vectorised bottom-up merge sort: O(n log^2 n)."""
    n = len(y)
    a = np.unique(y, return_inverse=True)[1].astype(np.int64)  # dense ranks 0 .. n-1
    index = np.arange(n, dtype=np.int64)
    total, width = 0, 1
    while width < n:
        block = index // (2 * width)
        key = a + block * n  # blocks separated, so every run stays sorted in one global order
        left = (index % (2 * width)) < width
        left_keys, right_keys, right_block = key[left], key[~left], block[~left]
        if len(right_keys):
            block_end = np.searchsorted(left_keys, (right_block + 1) * n, side="left")
            total += int((block_end - np.searchsorted(left_keys, right_keys, side="right")).sum())
        a = np.sort(key) - block * n  # merge: sort within each block (block sizes are unchanged)
        width *= 2
    return total


def kendall_tau_b(x: np.ndarray, y: np.ndarray) -> float:
    """Kendall's tau-b (ties adjusted), Knight's algorithm: sort by (x, y), count inversions of y."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    n = len(x)
    if n < 2:
        return float("nan")
    order = np.lexsort((y, x))
    xs, ys = x[order], y[order]
    n0 = n * (n - 1) // 2
    n1 = tie_pairs(xs)
    n2 = tie_pairs(ys)
    joint = np.unique(np.stack([xs, ys], axis=1), axis=0, return_counts=True)[1]
    n3 = int((joint * (joint - 1) // 2).sum())
    discordant = inversions(ys)  # within x-ties y is sorted ascending, so ties add no inversions
    concordant_minus_discordant = n0 - n1 - n2 + n3 - 2 * discordant
    denom = math.sqrt(float(n0 - n1) * float(n0 - n2))
    if denom == 0:
        return float("nan")
    return float(concordant_minus_discordant / denom)


def wilson(hits: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (Wilson 1927)."""
    if n == 0:
        return float("nan"), float("nan")
    p = hits / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -np.asarray(x, dtype=np.float64)))
