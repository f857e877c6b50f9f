"""The unbiased best-of-n estimator of Gao et al. 2022 ("Scaling Laws for Reward Model
Overoptimization", appendix), from one pool of samples per prompt.

With the pool of ``N >= n`` samples sorted ascending by proxy score, sample ``i`` (1-based) is the
best of a uniformly random n-subset with probability ``C(i-1, n-1) / C(N, n)``: the expectation of
any value of the best-of-n sample is a weighted sum over the sorted pool, exactly the mean over
all ``C(N, n)`` subsets, without drawing any. Weights are computed from log-binomials (``lgamma``)
so that large pools do not overflow; exact proxy ties are averaged (a tie broken uniformly at
random).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from rmlab.errors import ArgumentError, DataError


@lru_cache(maxsize=64)
def _log_factorials(big: int) -> np.ndarray:
    """``lgamma(k + 1)`` for ``k = 0 .. big``."""
    table = np.array([math.lgamma(k + 1) for k in range(big + 1)], dtype=np.float64)
    table.flags.writeable = False
    return table


def best_of_n_weights(pool: int, n: int) -> np.ndarray:
    """Probability that the ``i``-th lowest of ``pool`` samples (``i = n .. pool``) is the best of n.

    ``C(i-1, n-1) / C(pool, n)`` (Gao et al. 2022, appendix), computed from log-binomials
    (``lgamma``) so that large pools do not overflow. The weights sum to 1.
    """
    if not 1 <= n <= pool:
        raise ArgumentError(f"best-of-n needs 1 <= n <= pool size; got n={n}, pool={pool}.")
    lf = _log_factorials(int(pool))
    i = np.arange(n, pool + 1)
    top = lf[i - 1] - lf[n - 1] - lf[i - n]
    return np.exp(top - (lf[pool] - lf[n] - lf[pool - n]))


def _tie_average(sorted_proxy: np.ndarray, sorted_values: np.ndarray) -> np.ndarray:
    """Replace each value by the mean over its run of equal proxy scores (where the run's values differ).

    Runs whose values are all equal are left untouched (so their values stay bitwise the same).
    """
    if len(sorted_proxy) < 2:
        return sorted_values
    starts = np.r_[True, sorted_proxy[1:] != sorted_proxy[:-1]]
    if starts.all():
        return sorted_values
    run = np.cumsum(starts) - 1
    first = np.flatnonzero(starts)
    counts = np.diff(np.r_[first, len(sorted_proxy)])
    low = np.minimum.reduceat(sorted_values, first)
    high = np.maximum.reduceat(sorted_values, first)
    mixed = (counts > 1) & (low != high)
    if not mixed.any():
        return sorted_values
    means = np.add.reduceat(sorted_values, first) / counts
    out = sorted_values.copy()
    where = mixed[run]
    out[where] = means[run][where]
    return out


def sorted_pool(proxy: np.ndarray, values: list[np.ndarray]) -> list[np.ndarray]:
    """Values sorted ascending by proxy (stable), tie runs averaged: the pool as the estimator of
    Gao et al. 2022 (appendix) weights it."""
    order = np.argsort(proxy, kind="stable")
    p = proxy[order]
    return [_tie_average(p, np.asarray(v, dtype=np.float64)[order]) for v in values]


@lru_cache(maxsize=1024)
def _cached_weights(pool: int, n: int) -> np.ndarray:
    w = best_of_n_weights(pool, n)
    w.flags.writeable = False
    return w


def expectation(sorted_values: np.ndarray, n: int) -> float:
    """``sum_{i=n..N} C(i-1, n-1) / C(N, n) * value_(i)`` of a pool sorted by :func:`sorted_pool`
    (Gao et al. 2022, appendix)."""
    w = _cached_weights(len(sorted_values), n)
    return float((w * sorted_values[n - 1 :]).sum())


def best_of_n_expectation(proxy, values, n: int):
    """Unbiased expected ``values`` of the best-of-n sample, chosen by ``proxy``, from one pool.

    Follows Gao et al. 2022 ("Scaling Laws for Reward Model Overoptimization", appendix): with the
    pool of ``N >= n`` samples sorted ascending by proxy, sample ``i`` (1-based) is the best of a
    uniformly random n-subset with probability ``C(i-1, n-1) / C(N, n)``; the expectation is
    ``sum_{i=n..N} C(i-1, n-1) / C(N, n) * value_(i)``, exactly the mean over all ``C(N, n)``
    subsets of the value of each subset's best sample, without drawing any subset.

    Ties: samples with exactly equal proxy scores are treated symmetrically, as if a tie among the
    best were broken uniformly at random: their values are averaged within each tie before
    weighting. So ``n = 1`` gives the pool mean and ``n = N`` the value of the top-scored sample (the
    mean over tied maxima), whatever the order of the rows.

    Args:
        proxy: the ranking scores, shape ``(N,)``, finite.
        values: what to average over the chosen sample (e.g. the gold reward), shape ``(N,)`` or
            ``(N, k)`` for several at once; kept aligned with ``proxy`` row by row.
        n: 1 <= n <= N.

    Returns:
        A float for 1-D ``values``, else an array of ``k`` floats.

    Example:
        >>> round(best_of_n_expectation([0.1, 0.5, 0.3], [1.0, 2.0, 3.0], 2), 6)  # (2 + 3 + 2) / 3
        2.333333
    """
    proxy = np.asarray(proxy, dtype=np.float64)
    vals = np.asarray(values, dtype=np.float64)
    if proxy.ndim != 1 or vals.ndim not in (1, 2) or len(vals) != len(proxy):
        raise ArgumentError(
            f"proxy must be 1-D and values (N,) or (N, k) with the same N; got shapes {proxy.shape} "
            f"and {vals.shape}."
        )
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= len(proxy):
        raise ArgumentError(f"n={n!r} must be an integer with 1 <= n <= N = {len(proxy)} (the pool size).")
    if not (np.isfinite(proxy).all() and np.isfinite(vals).all()):
        raise DataError("proxy and values must be finite (no NaN or inf): drop or fix those samples first.")
    columns = [vals] if vals.ndim == 1 else [np.ascontiguousarray(vals[:, j]) for j in range(vals.shape[1])]
    out = [expectation(v, int(n)) for v in sorted_pool(proxy, columns)]
    return out[0] if vals.ndim == 1 else np.array(out)


