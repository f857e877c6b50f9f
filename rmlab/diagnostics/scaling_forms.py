"""The functional forms of reward overoptimization and a fitted curve.

Gao et al. 2022, "Scaling Laws for Reward Model Overoptimization" (arXiv 2210.10760, eqs. 1-2):
with ``d = sqrt(KL)``, best-of-n ``R(d) = d * (alpha - beta * d)`` and RL
``R(d) = d * (alpha - beta * log d)``, both linear in ``(alpha, beta)``; peaks at
``d* = alpha / (2 beta)`` (best-of-n) and ``d* = exp(alpha / beta - 1)`` (RL).
:class:`OveroptimizationFit` is what :func:`rmlab.fit_overoptimization` returns.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

FORMS = ("bon", "rl")


def features(form: str, d: np.ndarray) -> np.ndarray:
    """The least-squares features of a form at ``d = sqrt(KL)``: ``(d, d^2)`` for best-of-n, ``(d, d log d)``
    for RL (``0 log 0 = 0``), Gao et al. 2022, eqs. 1-2."""
    d = np.asarray(d, dtype=np.float64)
    if form == "bon":
        return np.stack([d, d * d], axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        dlogd = np.where(d > 0, d * np.log(np.where(d > 0, d, 1.0)), 0.0)
    return np.stack([d, dlogd], axis=-1)


def form_curve(form: str, alpha, beta, d) -> np.ndarray:
    """``R(d)`` (relative to the start) for parameter arrays broadcast against ``d``: best-of-n
    ``d (alpha - beta d)``, RL ``d (alpha - beta log d)`` (Gao et al. 2022, eqs. 1-2)."""
    x = features(form, d)
    return alpha * x[..., 0] - beta * x[..., 1]


def peak(form: str, alpha, beta) -> tuple[np.ndarray, np.ndarray]:
    """Peak ``d*`` and ``R(d*)`` of the fitted form; ``d* = inf``, ``R = NaN`` where there is no peak
    (best-of-n ``d* = alpha / (2 beta)``, RL ``d* = exp(alpha / beta - 1)``; Gao et al. 2022)."""
    alpha = np.asarray(alpha, dtype=np.float64)
    beta = np.asarray(beta, dtype=np.float64)
    d = np.full(alpha.shape, np.inf)
    gain = np.full(alpha.shape, np.nan)
    rising = beta > 0
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        if form == "bon":
            d = np.where(rising, np.maximum(alpha / (2 * beta), 0.0), d)
            gain = np.where(rising, d * (alpha - beta * d), gain)
        else:
            d = np.where(rising, np.exp(alpha / beta - 1.0), d)
            gain = np.where(rising, beta * d, gain)
    flat_down = (beta == 0) & (alpha <= 0)  # a straight line that never rises: best at the start
    d = np.where(flat_down, 0.0, d)
    gain = np.where(flat_down, 0.0, gain)
    return d, gain



@dataclass
class OveroptimizationFit:
    """A fitted overoptimization curve (Gao et al. 2022); built by :func:`fit_overoptimization`.

    ``fit(kl)`` / ``fit.predict(kl)`` evaluate the fitted reward (in the frame's units, offset added
    back) at any KL; ``fit.band(kl)`` gives the pointwise bootstrap interval; ``fit.to_frame()`` one
    row per parameter with its interval. ``resampled`` says what the bootstrap drew: ``"prompts"``
    (``prompts`` of them, the curve recomputed per draw) or ``"points"``; ``boot_offset`` holds
    each draw's offset (it moves with the prompts when it is the curve's own ``KL = 0`` value).
    """

    form: str
    alpha: float
    beta: float
    alpha_ci: tuple[float, float]
    beta_ci: tuple[float, float]
    peak_kl: float
    peak_kl_ci: tuple[float, float]
    peak_gold: float
    peak_gold_ci: tuple[float, float]
    r2: float
    offset: float
    relative: bool
    x: str
    y: str
    n_points: int
    level: float
    bootstrap: int
    points: pd.DataFrame = field(repr=False)
    boot_alpha: np.ndarray = field(repr=False)
    boot_beta: np.ndarray = field(repr=False)
    name: str | None = None
    notes: list = field(default_factory=list)
    resampled: str = "points"
    prompts: int | None = None
    boot_offset: np.ndarray | None = field(default=None, repr=False)

    def predict(self, kl) -> np.ndarray:
        """Fitted reward at ``kl`` (scalar or array), offset included: ``offset + R(sqrt(kl))``."""
        d = np.sqrt(np.asarray(kl, dtype=np.float64))
        return self.offset + form_curve(self.form, self.alpha, self.beta, d)

    __call__ = predict

    def band(self, kl, level: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Pointwise bootstrap percentile interval of the fitted curve at ``kl`` (NaN without bootstrap)."""
        level = self.level if level is None else level
        d = np.sqrt(np.atleast_1d(np.asarray(kl, dtype=np.float64)))
        if len(self.boot_alpha) == 0:
            nan = np.full(d.shape, np.nan)
            return nan, nan.copy()
        curves = form_curve(self.form, self.boot_alpha[:, None], self.boot_beta[:, None], d[None, :])
        offsets = np.full(len(curves), self.offset) if self.boot_offset is None else self.boot_offset
        lo, hi = np.quantile(curves + offsets[:, None], [(1 - level) / 2, (1 + level) / 2], axis=0)
        return lo, hi

    def to_frame(self) -> pd.DataFrame:
        """One row per quantity: ``parameter``, ``estimate``, ``lower``, ``upper`` (bootstrap interval)."""
        nan = (float("nan"), float("nan"))
        rows = [
            ("alpha", self.alpha, self.alpha_ci),
            ("beta", self.beta, self.beta_ci),
            ("peak_kl", self.peak_kl, self.peak_kl_ci),
            (f"peak_{self.y}", self.peak_gold, self.peak_gold_ci),
            ("r2", self.r2, nan),
            ("offset", self.offset, nan),
        ]
        frame = pd.DataFrame(
            [{"parameter": p, "estimate": float(e), "lower": ci[0], "upper": ci[1]} for p, e, ci in rows]
        )
        frame.attrs.update(form=self.form, level=self.level, bootstrap=self.bootstrap, resampled=self.resampled,
                           prompts=self.prompts, notes=list(self.notes))
        return frame

    def __repr__(self) -> str:
        def ci(pair):
            return f"[{pair[0]:.4g}, {pair[1]:.4g}]"

        formula = "d*(alpha - beta*d)" if self.form == "bon" else "d*(alpha - beta*log d)"
        lines = [
            f"OveroptimizationFit(form={self.form!r}: {self.y} - offset = {formula}, d = sqrt({self.x}))",
            f"  alpha     = {self.alpha:.4g}  {int(self.level * 100)}% CI {ci(self.alpha_ci)}",
            f"  beta      = {self.beta:.4g}  {int(self.level * 100)}% CI {ci(self.beta_ci)}",
            f"  peak_kl   = {self.peak_kl:.4g}  CI {ci(self.peak_kl_ci)}",
            f"  peak_{self.y} = {self.peak_gold:.4g}  CI {ci(self.peak_gold_ci)}",
            f"  r2 = {self.r2:.4f}, offset = {self.offset:.4g}, points = {self.n_points}, bootstrap = {self.bootstrap}"
            + (f" resamples of {self.prompts} prompts" if self.resampled == "prompts" else " resamples of the points"),
        ]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)
