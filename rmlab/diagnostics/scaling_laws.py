"""Scaling-law fits of reward overoptimization: gold reward against KL, with bootstrap intervals.

Follows Gao et al. 2022, "Scaling Laws for Reward Model Overoptimization" (arXiv 2210.10760, eqs.
1-2): with ``d = sqrt(KL)``, best-of-n ``R(d) = d * (alpha - beta * d)`` and RL
``R(d) = d * (alpha - beta * log d)``. Both are linear in their parameters, so
:func:`fit_overoptimization` solves least squares without intercept (numpy, no scipy), draws
bootstrap percentile intervals and reports the peak of the fitted curve. The curves come from
:func:`rmlab.best_of_n` or :func:`rmlab.checkpoint_curve`.

The bootstrap resamples the sampling unit. A best-of-n curve is one pool of samples per prompt
turned into a point per ``n``: its points are deterministic, correlated functions of the same
pool, so resampling *them* measures how far the points lie from the form (lack of fit), not how
much the curve would move with other prompts and samples. With the per-prompt expectations that
:func:`rmlab.best_of_n` returns (``<y>_by_prompt``), prompts are drawn with replacement, the curve
is recomputed from each resampled pool and refitted.

The forms and the fitted-curve object live in :mod:`rmlab.diagnostics.scaling_forms`, the
bootstrap in :mod:`rmlab.diagnostics.fit_bootstrap`.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from rmlab.diagnostics.fit_bootstrap import fit_intervals, point_bootstrap, prompt_bootstrap
from rmlab.diagnostics.scaling_forms import FORMS, OveroptimizationFit, features, peak
from rmlab.errors import ArgumentError, DataError, closest

RESAMPLE = ("auto", "prompts", "points")


def _column(frame: pd.DataFrame, name: str, role: str) -> np.ndarray:
    if name not in frame.columns:
        raise DataError(
            f"{role}={name!r} is not a column of the frame (columns: {list(frame.columns)})." + closest(name, frame.columns)
        )
    if not pd.api.types.is_numeric_dtype(frame[name]):
        raise DataError(f"{role}: column {name!r} holds {frame[name].dtype} values, not numbers.")
    values = frame[name].to_numpy(dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(values))
    if len(bad):
        raise DataError(f"{role}: column {name!r} has {len(bad)} NaN/inf value(s), first at row {bad[0]}.")
    return values


def _by_prompt(frame: pd.DataFrame, column: str, y: str, values: np.ndarray) -> np.ndarray:
    """The ``(points, prompts)`` matrix of per-prompt values in ``column``, checked to average to ``y``."""
    hint = (f"Column {column!r} must hold, per row, the array of per-prompt values whose mean is {y!r} "
            "(as rmlab.best_of_n returns it)")
    try:
        rows = [np.asarray(cell, dtype=np.float64).reshape(-1) for cell in frame[column].tolist()]
    except (TypeError, ValueError):
        raise DataError(f"{hint}; it holds {frame[column].dtype} values that are not arrays of numbers "
                        "(a CSV round trip turns them into text: save curves as parquet).") from None
    lengths = sorted({len(r) for r in rows})
    if len(lengths) != 1 or lengths[0] == 0:
        raise DataError(f"{hint}; its rows hold {lengths} prompts: the points come from different pools. "
                        "Fit one curve (one pool, one proxy) at a time.")
    matrix = np.stack(rows)
    if not np.isfinite(matrix).all():
        raise DataError(f"{hint}; it has NaN or inf values.")
    means = matrix.mean(axis=1)
    bad = np.flatnonzero(~np.isclose(means, values, rtol=1e-9, atol=1e-12))
    if len(bad):
        k = int(bad[0])
        raise DataError(
            f"{hint}; at row {k} they average to {means[k]:.6g}, not {y} = {values[k]:.6g}, so they belong to "
            "another curve. Drop the column, or pass resample='points', to resample the points instead."
        )
    return matrix


def fit_overoptimization(
    frame: pd.DataFrame,
    form: str = "bon",
    *,
    x: str = "kl",
    y: str = "gold",
    relative: bool = True,
    offset: float | None = None,
    weights=None,
    bootstrap: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    resample: str = "auto",
) -> OveroptimizationFit:
    """Fit Gao et al.'s overoptimization law to a curve of gold reward against KL.

    Follows Gao et al. 2022, "Scaling Laws for Reward Model Overoptimization" (eqs. 1-2): with
    ``d = sqrt(KL)``, best-of-n ``R(d) = d * (alpha - beta * d)`` and RL
    ``R(d) = d * (alpha - beta * log d)``. Both are linear in their parameters, so the fit is ordinary
    (or weighted) least squares without intercept in the features ``(d, d^2)`` (best-of-n) or
    ``(d, d log d)`` (RL, with ``0 log 0 = 0``). Peaks of the fitted curve: best-of-n
    ``d* = alpha / (2 beta)``, ``R* = alpha^2 / (4 beta)``; RL ``d* = exp(alpha / beta - 1)``,
    ``R* = beta d*``; reported as ``peak_kl = d*^2`` and ``peak_gold = offset + R*``. With
    ``beta <= 0`` the form has no maximum: ``peak_kl = inf``, ``peak_gold = NaN``, with a note.

    Offset: the paper measures gold relative to the initial policy (``R(0) = 0``). With
    ``relative=True`` (default) the fit subtracts ``offset``: by default the ``y`` value at ``KL = 0``
    (best-of-n's ``n = 1``, the sampling policy; the mean if several rows sit at 0). That point then
    carries no information about alpha and beta and is left out of the fit, of ``r2`` and of the
    bootstrap; ``fit.offset`` reports it, and predictions add it back. Pass ``offset=`` (e.g. the
    starting policy's mean gold measured elsewhere) when the frame has no ``KL = 0`` row, or
    ``relative=False`` to fit ``y`` as is (forcing the curve through 0 at ``KL = 0``).

    Intervals resample the sampling unit, the prompts (``resample="prompts"``, the default when the
    frame has a ``<y>_by_prompt`` column, as :func:`rmlab.best_of_n` frames do). A best-of-n curve
    is computed from one pool of samples per prompt, so its points are deterministic, correlated
    functions of that pool: resampling the points would measure the form's lack of fit, not the
    uncertainty of the curve. Each of the ``bootstrap`` draws takes the curve's prompts with
    replacement (``numpy.random.default_rng(seed).integers(0, prompts, (draws, prompts))``, in
    chunks of draws), recomputes every point from the resampled pool (the mean of the drawn
    prompts' unbiased best-of-n expectations, which is what :func:`rmlab.best_of_n` returns for the
    resampled pool), recomputes the default offset the same way, and refits. ``*_ci`` are
    percentile intervals at ``level``; ``peak_gold_ci`` is over the draws that have a peak. The KL
    of a best-of-n point is analytic and does not move.

    Without per-prompt values (a curve typed in, or one saved without its ``*_by_prompt`` columns)
    or with ``resample="points"``, the points are resampled with replacement (pairs bootstrap),
    which treats them as independent measurements (as for separately sampled checkpoints), and a
    note says so; resamples with fewer than 2 distinct ``d`` cannot be fitted and are dropped
    (counted in the notes).

    ``r2`` is ``1 - SS_res / SS_tot`` on the fitted points, ``SS_tot`` about their (weighted) mean,
    so it compares the form with a flat line (it can be negative).

    Args:
        frame: one row per point, e.g. from :func:`best_of_n` (one proxy at a time: filter a
            several-proxy frame on ``proxy_name``) or a checkpoint curve.
        form: ``"bon"`` (best-of-n) or ``"rl"``.
        x: the KL column (>= 0); y: the reward column.
        relative, offset: see above.
        weights: None, a column name or an array of per-point weights (> 0) for weighted least
            squares, e.g. ``1 / gold_se**2``.
        bootstrap: number of resamples (0: no intervals).
        level: interval coverage (default 0.95).
        seed: seeds the bootstrap.
        resample: ``"auto"`` (prompts when the frame has ``<y>_by_prompt``, else points),
            ``"prompts"`` or ``"points"``.

    Returns:
        An :class:`OveroptimizationFit` with ``alpha``, ``beta``, ``alpha_ci``, ``beta_ci``,
        ``peak_kl``, ``peak_kl_ci``, ``peak_gold``, ``peak_gold_ci``, ``r2``, ``offset``, ``form``,
        ``points`` (the fitted points with ``fitted``), ``predict(kl)`` / ``fit(kl)``, ``band(kl)``,
        ``to_frame()``, ``resampled`` (``"prompts"`` or ``"points"``) and ``prompts``.

    Raises:
        ArgumentError: unknown form or resample (closest name), bad bootstrap / level / weights.
        DataError: missing or non-numeric columns, NaN, negative KL, several proxies in one frame,
            no ``KL = 0`` point for the default offset, fewer than 2 points with ``KL > 0``,
            per-prompt values that are missing (``resample="prompts"``), unequal in length or do not
            average to ``y``.

    Example:
        >>> import numpy as np, pandas as pd
        >>> d = np.linspace(0, 2, 9)
        >>> curve = pd.DataFrame({"kl": d**2, "gold": 1.0 + d * (1.2 - 0.5 * d)})
        >>> fit = fit_overoptimization(curve, "bon", bootstrap=0)
        >>> round(fit.alpha, 6), round(fit.beta, 6), round(fit.peak_kl, 4), fit.offset
        (1.2, 0.5, 1.44, 1.0)
    """
    if not isinstance(frame, pd.DataFrame):
        raise DataError(f"fit_overoptimization needs a DataFrame (e.g. from rmlab.best_of_n), not a {type(frame).__name__}.")
    if form not in FORMS:
        raise ArgumentError(
            f"form={form!r} is not supported; choose 'bon' (best-of-n: d*(alpha - beta*d)) or 'rl' "
            "(d*(alpha - beta*log d))." + closest(form, FORMS)
        )
    if isinstance(bootstrap, bool) or not isinstance(bootstrap, (int, np.integer)) or bootstrap < 0:
        raise ArgumentError(f"bootstrap={bootstrap!r} must be an integer >= 0 (the number of resamples).")
    if not isinstance(level, (int, float)) or not 0 < level < 1:
        raise ArgumentError(f"level={level!r} must be between 0 and 1 (e.g. 0.95).")
    if not isinstance(resample, str) or resample not in RESAMPLE:
        raise ArgumentError(
            f"resample={resample!r} must be one of {list(RESAMPLE)}: 'prompts' draws the curve's prompts (the "
            "sampling unit of a best-of-n curve), 'points' its points." + closest(str(resample), RESAMPLE)
        )
    if "proxy_name" in frame.columns and frame["proxy_name"].nunique() > 1:
        names = list(frame["proxy_name"].unique())
        raise DataError(
            f"The frame holds curves of {len(names)} proxies {names}; fit one at a time, e.g. "
            f"fit_overoptimization(frame[frame.proxy_name == {names[0]!r}])."
        )
    kl = _column(frame, x, "x")
    reward = _column(frame, y, "y")
    by_column = f"{y}_by_prompt"
    if resample == "auto":
        resample = "prompts" if by_column in frame.columns else "points"
    if resample == "prompts" and by_column not in frame.columns:
        raise DataError(
            f"resample='prompts' needs the per-prompt values of {y!r} in a column {by_column!r}, as "
            "rmlab.best_of_n returns them; this frame has none (columns: "
            f"{list(frame.columns)}). Pass resample='points' to resample the points."
        )
    by_prompt = _by_prompt(frame, by_column, y, reward) if resample == "prompts" else None
    negative = np.flatnonzero(kl < 0)
    if len(negative):
        raise DataError(
            f"x: column {x!r} has {len(negative)} negative KL value(s), first {kl[negative[0]]:.3g} at row "
            f"{negative[0]}; KL is >= 0 (clip estimation noise first: frame.assign({x}=frame[{x!r}].clip(lower=0)))."
        )
    if weights is None:
        w = np.ones(len(frame))
    elif isinstance(weights, str):
        w = _column(frame, weights, "weights")
    else:
        w = np.asarray(weights, dtype=np.float64).reshape(-1)
        if len(w) != len(frame):
            raise ArgumentError(f"weights has {len(w)} values for {len(frame)} points; pass one per row.")
    if not (np.isfinite(w).all() and (w > 0).all()):
        raise ArgumentError("weights must be finite and > 0 (e.g. 1 / gold_se**2 with no zero SE).")

    notes: list[str] = []
    keep = np.ones(len(frame), dtype=bool)
    zero_rows = None  # the rows whose mean is the offset, when it is taken from the curve
    if not relative:
        if offset is not None:
            raise ArgumentError("offset= is only used with relative=True; drop one of them.")
        base = 0.0
    elif offset is not None:
        base = float(offset)
        if not math.isfinite(base):
            raise ArgumentError(f"offset={offset!r} must be a finite number.")
    else:
        zero = kl == 0
        if not zero.any():
            raise DataError(
                f"relative=True measures {y} relative to the starting policy (KL = 0), but no row has "
                f"{x} == 0. Pass offset= (the starting policy's mean {y}), or relative=False to fit {y} as is."
            )
        base = float(reward[zero].mean())
        keep = ~zero
        zero_rows = zero
        notes.append(f"offset {base:.4g} = mean {y} at {x} = 0 ({int(zero.sum())} row(s)), left out of the fit")
    d_all = np.sqrt(kl)
    d, target, w = d_all[keep], reward[keep] - base, w[keep]
    if len(np.unique(d[d > 0])) < 2:
        raise DataError(
            f"A fit of 2 parameters needs at least 2 points with distinct {x} > 0; the frame has "
            f"{len(np.unique(d[d > 0]))} (after setting aside the KL = 0 offset point)."
        )

    design = features(form, d)
    sw = np.sqrt(w)
    coef, *_ = np.linalg.lstsq(design * sw[:, None], target * sw, rcond=None)
    alpha, beta = float(coef[0]), float(-coef[1])
    fitted = design @ coef
    ss_res = float((w * (target - fitted) ** 2).sum())
    centre = float((w * target).sum() / w.sum())
    ss_tot = float((w * (target - centre) ** 2).sum())
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")

    boot_a = boot_b = boot_off = np.empty(0)
    prompts = None if by_prompt is None else int(by_prompt.shape[1])
    if bootstrap and by_prompt is not None and prompts < 2:
        notes.append("one prompt only: the prompts cannot be resampled, so there are no intervals")
    elif bootstrap and by_prompt is not None:
        # each draw recomputes the curve (and the offset) from the resampled pool
        at_zero = by_prompt[zero_rows] if zero_rows is not None else None
        boot_a, boot_b, boot_off = prompt_bootstrap(design * sw[:, None], sw, by_prompt[keep], at_zero, base,
                                                    int(bootstrap), seed)
    elif bootstrap:
        boot_a, boot_b, dropped = point_bootstrap(design, target, sw, d, int(bootstrap), seed)
        boot_off = np.full(len(boot_a), base)
        why = "resample='points'" if by_column in frame.columns else f"no per-prompt {by_column!r} to resample prompts with"
        notes.append(
            f"intervals: bootstrap resamples of the {len(d)} points, as if they were independent measurements ({why}); "
            "the points of a best-of-n curve come from one pool, and for them such intervals measure lack of fit "
            "rather than uncertainty"
        )
        if dropped:
            notes.append(f"{dropped} of {bootstrap} bootstrap resamples had < 2 distinct points and were dropped")
    peak_d, peak_gain = peak(form, alpha, beta)
    peak_d, peak_gain = float(peak_d), float(peak_gain)
    if not math.isfinite(peak_d):
        notes.append(f"beta = {beta:.3g} <= 0: the fitted {y} keeps rising with KL (no peak)")
    alpha_ci, beta_ci, peak_kl_ci, peak_gold_ci = fit_intervals(form, boot_a, boot_b, boot_off, level, notes)
    points = pd.DataFrame({x: kl[keep], "d": d, y: reward[keep], "relative": target, "weight": w, "fitted": fitted + base})
    name = None
    if "proxy_name" in frame.columns and frame["proxy_name"].nunique() == 1:
        name = str(frame["proxy_name"].iloc[0])
    elif frame.attrs.get("proxy_name") is not None:
        name = str(frame.attrs["proxy_name"])
    return OveroptimizationFit(
        form=form, alpha=alpha, beta=beta, alpha_ci=alpha_ci, beta_ci=beta_ci,
        peak_kl=peak_d**2, peak_kl_ci=peak_kl_ci, peak_gold=peak_gain + base, peak_gold_ci=peak_gold_ci,
        r2=r2, offset=base, relative=bool(relative), x=x, y=y, n_points=int(len(d)), level=float(level),
        bootstrap=int(len(boot_a)), points=points, boot_alpha=boot_a, boot_beta=boot_b, name=name, notes=notes,
        resampled=resample, prompts=prompts, boot_offset=boot_off,
    )


__all__ = ["FORMS", "RESAMPLE", "OveroptimizationFit", "fit_overoptimization"]
