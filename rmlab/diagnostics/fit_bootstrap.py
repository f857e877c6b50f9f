"""Bootstrap intervals of an overoptimization fit: resample the prompts, or the points.

A best-of-n curve (Gao et al. 2022, "Scaling Laws for Reward Model Overoptimization") is one pool
of samples per prompt turned into a point per ``n``: its points are deterministic, correlated
functions of the same pool, so the sampling unit to resample is the prompt. :func:`prompt_bootstrap`
draws prompts with replacement (Efron 1979, "Bootstrap Methods: Another Look at the Jackknife"),
recomputes each point (and the ``KL = 0`` offset) from the drawn prompts' per-prompt values and
refits; :func:`point_bootstrap` resamples the points themselves (a pairs bootstrap), for curves
whose points are independent measurements. Intervals are percentile intervals.
"""

from __future__ import annotations

import numpy as np

from rmlab.diagnostics.scaling_forms import peak

#: Entries of the (points x draws x prompts) index block of one chunk of prompt-bootstrap draws.
CHUNK = 4_000_000


def interval(samples: np.ndarray, level: float) -> tuple[float, float]:
    """The percentile interval of ``samples`` at ``level``, NaNs left out (Efron 1979)."""
    samples = np.asarray(samples, dtype=np.float64)
    samples = samples[~np.isnan(samples)]
    if len(samples) == 0:
        return (float("nan"), float("nan"))
    q = [(1 - level) / 2, (1 + level) / 2]
    method = "linear" if np.isfinite(samples).all() else "inverted_cdf"
    lo, hi = np.quantile(samples, q, method=method)
    return (float(lo), float(hi))


def prompt_bootstrap(design, sw, inside, at_zero, base: float, draws: int, seed: int):
    """``(alpha, beta, offset)`` of every draw of prompts with replacement.

    ``design`` is the weighted feature matrix of the fitted points, ``sw`` the square roots of
    their weights, ``inside`` their ``(points, prompts)`` per-prompt values and ``at_zero`` those
    of the ``KL = 0`` rows (None when the offset ``base`` is given). The draws are
    ``numpy.random.default_rng(seed).integers(0, prompts, (draws, prompts))``, in chunks of
    :data:`CHUNK` index entries (Efron 1979; the sampling unit of Gao et al. 2022's curves).
    """
    rng = np.random.default_rng(seed)
    prompts = inside.shape[1]
    rows_used = len(inside) + (0 if at_zero is None else len(at_zero))
    per_chunk = max(1, CHUNK // (prompts * rows_used))
    parts_a, parts_b, parts_off = [], [], []
    for start in range(0, int(draws), per_chunk):
        idx = rng.integers(0, prompts, size=(min(per_chunk, int(draws) - start), prompts))
        curves = inside[:, idx].mean(axis=-1)  # (points, draws)
        offsets = at_zero[:, idx].mean(axis=-1).mean(axis=0) if at_zero is not None else np.full(len(idx), base)
        sol, *_ = np.linalg.lstsq(design, (curves - offsets[None, :]) * sw[:, None], rcond=None)
        parts_a.append(sol[0])
        parts_b.append(-sol[1])
        parts_off.append(offsets)
    return np.concatenate(parts_a), np.concatenate(parts_b), np.concatenate(parts_off)


def point_bootstrap(features, target, sw, d, draws: int, seed: int):
    """``(alpha, beta, dropped)`` of every resample of the points with replacement (a pairs
    bootstrap, Efron 1979): a ``(draws, points)`` index matrix, the 2x2 weighted normal equations
    solved at once; resamples with fewer than 2 distinct ``d > 0`` (or singular) are dropped."""
    rng = np.random.default_rng(seed)
    m = len(d)
    idx = rng.integers(0, m, size=(int(draws), m))
    xb = features[idx] * sw[idx][..., None]
    yb = target[idx] * sw[idx]
    xtx = np.einsum("bmi,bmj->bij", xb, xb)
    xty = np.einsum("bmi,bm->bi", xb, yb)
    distinct = np.array([len(np.unique(row[d[row] > 0])) >= 2 for row in idx])
    det = xtx[:, 0, 0] * xtx[:, 1, 1] - xtx[:, 0, 1] * xtx[:, 1, 0]
    scale = xtx[:, 0, 0] * xtx[:, 1, 1]
    ok = distinct & (np.abs(det) > 1e-12 * np.where(scale > 0, scale, 1.0))
    sol = np.linalg.solve(xtx[ok], xty[ok][..., None])[..., 0]
    return sol[:, 0], -sol[:, 1], int((~ok).sum())


def fit_intervals(form: str, boot_a, boot_b, boot_off, level: float, notes: list):
    """``(alpha_ci, beta_ci, peak_kl_ci, peak_gold_ci)`` of the bootstrap fits (NaN without any);
    the peak of each draw is its form's (Gao et al. 2022), the gold peak over draws that have one."""
    if not len(boot_a):
        nan = (float("nan"), float("nan"))
        return nan, nan, nan, nan
    bd, bg = peak(form, boot_a, boot_b)
    nopeak = float(np.mean(~np.isfinite(bd)))
    if nopeak > 0:
        notes.append(f"{nopeak:.1%} of bootstrap fits have no peak (beta <= 0)")
    return (interval(boot_a, level), interval(boot_b, level), interval(bd**2, level),
            interval((bg + boot_off)[np.isfinite(bg)], level))
