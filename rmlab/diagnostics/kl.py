"""KL from the reference, estimated from the policy's own samples, with its standard error.

For a policy checkpoint KL has no closed form: it is estimated from the policy's samples,
``KL(pi || pi_ref) = E_{x, y ~ pi}[log pi(y|x) - log pi_ref(y|x)]`` (the "k1" estimator of
Schulman 2020, "Approximating KL Divergence"), the KL axis of Gao et al. 2022 ("Scaling Laws for
Reward Model Overoptimization"). Means are taken per prompt, then over prompts, and standard errors
across prompts (across samples with a single prompt).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from rmlab.errors import DataError


def _as_values(values, name: str) -> np.ndarray:
    try:
        out = np.asarray(values, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise DataError(f"{name} must be numbers (one per sample).") from None
    bad = np.flatnonzero(~np.isfinite(out))
    if len(bad):
        raise DataError(f"{name}[{bad[0]}] is {out[bad[0]]}; every value must be finite.")
    return out


def mean_se(values, groups=None) -> tuple[float, float, int]:
    """Mean over groups of the per-group means, and its standard error (the per-prompt averaging of
    Gao et al. 2022's curves).

    With two groups or more the standard error is the spread of the group means over the square
    root of their number (prompts treated as a sample of the prompt distribution, within- and
    between-prompt variation both included); with one group it is the spread of the values over
    the square root of their number. Returns ``(mean, se, groups)``; ``se`` is NaN with one value.
    """
    v = np.asarray(values, dtype=np.float64)
    if groups is None:
        groups = np.zeros(len(v), dtype=np.int64)
    means = pd.Series(v).groupby(np.asarray(groups), sort=False).mean().to_numpy()
    if len(means) >= 2:
        return float(means.mean()), float(means.std(ddof=1) / math.sqrt(len(means))), len(means)
    se = float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) >= 2 else float("nan")
    return float(v.mean()), se, 1


def kl_estimate(policy_logp, reference_logp, groups=None) -> pd.Series:
    """Monte-Carlo estimate of ``KL(pi || pi_ref)`` from samples of the policy, with its standard error.

    ``KL(pi || pi_ref) = E_{y ~ pi}[log pi(y) - log pi_ref(y)]``, estimated by the mean log-ratio of
    samples drawn from ``pi`` (the "k1" estimator, Schulman 2020, "Approximating KL Divergence"; the
    KL axis of Gao et al. 2022, "Scaling Laws for Reward Model Overoptimization"). With several
    prompts (``groups``) the log-ratios are averaged per prompt, then over prompts, and the standard
    error is taken across prompts; with one prompt, across samples.

    The k1 estimator is unbiased, but a single estimate can be negative (the true KL never is): the
    log-ratio is negative on samples the reference likes more than the policy does, and a finite
    sample can hold mostly those, especially when the policy is close to the reference. Its variance
    grows with the KL; read the estimate together with ``kl_se``.

    Args:
        policy_logp: log-prob of each sample under the policy that drew it (``rmlab.sample``'s
            ``logp``, temperature 1: samples drawn at another temperature or with top-p are not
            samples of ``pi``).
        reference_logp: log-prob of the same samples under the reference.
        groups: the prompt of each sample (e.g. ``prompt_index``); all one prompt if None.

    Returns:
        A Series with ``kl``, ``kl_se``, ``n_samples`` and ``prompts``.

    Raises:
        DataError: lengths differ, non-finite values, or fewer than 2 samples (no standard error).

    Example:
        >>> import rmlab
        >>> est = rmlab.kl_estimate([-1.0, -2.0, -1.5], [-1.2, -2.5, -1.4])
        >>> round(float(est["kl"]), 3), round(float(est["kl_se"]), 3)
        (0.2, 0.173)
    """
    lp = _as_values(policy_logp, "policy_logp")
    ref = _as_values(reference_logp, "reference_logp")
    if len(lp) != len(ref):
        raise DataError(f"policy_logp has {len(lp)} values but reference_logp has {len(ref)}; pass one per sample.")
    if groups is not None and len(np.asarray(groups).reshape(-1)) != len(lp):
        raise DataError(f"groups has {len(np.asarray(groups).reshape(-1))} values for {len(lp)} samples.")
    if len(lp) < 2:
        raise DataError(
            f"A KL estimate needs at least 2 samples (got {len(lp)}): its standard error comes from "
            "their spread. Draw more samples (n >= 2, or several prompts)."
        )
    kl, se, prompts = mean_se(lp - ref, None if groups is None else np.asarray(groups).reshape(-1))
    return pd.Series({"kl": kl, "kl_se": se, "n_samples": len(lp), "prompts": prompts})
