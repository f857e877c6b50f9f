"""Proxy ensembles (Coste et al. 2023, "Reward Model Ensembles Help Mitigate Overoptimization") and
the names scorers carry in frames and figures.

:func:`ensemble` combines several scorers into one proxy: their mean, their minimum (worst-case
optimisation) or their mean less ``lam`` times their population variance (uncertainty-weighted
optimisation). Every scorer a best-of-n curve or a checkpoint curve takes (a column, a reward
model, a callable, an array, an ensemble) is named by :func:`spec_name`.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd

from rmlab.errors import ArgumentError, closest

ENSEMBLE_METHODS = ("mean", "worst", "uwo")
_ENSEMBLE_ALIASES = {"min": "worst", "wco": "worst", "worst_case": "worst"}


@dataclass(frozen=True)
class RewardEnsemble:
    """Several reward scorers combined into one proxy (Coste et al. 2023); build with :func:`ensemble`."""

    members: tuple
    method: str = "mean"
    lam: float = 0.5
    name: str | None = None

    def combine(self, scores) -> np.ndarray:
        """Combine a ``(samples, members)`` score matrix into one score per sample.

        ``mean``: the members' mean; ``worst``: their minimum; ``uwo``: ``mean - lam * var`` with the
        population variance (``ddof=0``) across members.
        """
        scores = np.asarray(scores, dtype=np.float64)
        if scores.ndim != 2 or scores.shape[1] != len(self.members):
            raise ArgumentError(
                f"combine needs a (samples, {len(self.members)}) matrix, one column per member; got "
                f"shape {scores.shape}."
            )
        if self.method == "mean":
            return scores.mean(axis=1)
        if self.method == "worst":
            return scores.min(axis=1)
        return scores.mean(axis=1) - self.lam * scores.var(axis=1, ddof=0)

    def __repr__(self) -> str:
        label = self.name or _ensemble_label(self)
        return f"RewardEnsemble({label!r})"


def _ensemble_label(ens: RewardEnsemble) -> str:
    names = ", ".join(spec_name(m, k) for k, m in enumerate(ens.members))
    extra = f", lam={ens.lam:g}" if ens.method == "uwo" else ""
    return f"{ens.method}({names}{extra})"


def ensemble(members, method: str = "mean", *, lam: float = 0.5, name: str | None = None) -> RewardEnsemble:
    """A proxy ensemble usable wherever :func:`rmlab.best_of_n` or :func:`rmlab.checkpoint_curve` takes a
    proxy (Coste et al. 2023).

    Follows Coste et al. 2023, "Reward Model Ensembles Help Mitigate Overoptimization": with the
    members' scores ``r_1 .. r_M`` of a sample,

    - ``"mean"``: ``mean_k r_k``;
    - ``"worst"`` (worst-case optimisation, WCO): ``min_k r_k`` (aliases ``"min"``, ``"wco"``);
    - ``"uwo"`` (uncertainty-weighted optimisation): ``mean_k r_k - lam * var_k r_k``, the population
      variance (``ddof=0``) across members; the paper uses small ``lam`` for best-of-n (0.5 here).

    The members' scores are combined as they come, so they should be on comparable scales (reward
    models trained alike, as in the paper; standardise columns first otherwise).

    Args:
        members: two or more scorers: column names of the samples frame, reward models (objects or
            paths), callables (see :func:`rmlab.best_of_n`), or a ``{name: scorer}`` mapping.
        method: ``"mean"``, ``"worst"`` or ``"uwo"``.
        lam: the variance penalty of ``"uwo"`` (>= 0).
        name: label of the ensemble in frames and figures (default e.g. ``"uwo(rm0, rm1, lam=0.5)"``).

    Returns:
        A :class:`RewardEnsemble`; ``.combine(matrix)`` applies it to a ``(samples, members)`` array.

    Raises:
        ArgumentError: fewer than 2 members, an unknown method (with the closest name), ``lam < 0``.

    Example:
        >>> ens = ensemble(["rm0", "rm1", "rm2"], "uwo", lam=0.5)
        >>> ens.combine([[1.0, 2.0, 3.0]])  # 2 - 0.5 * 2/3
        array([1.66666667])
    """
    if isinstance(members, Mapping):
        member_list = [Named(str(k), v) for k, v in members.items()]
    elif isinstance(members, (list, tuple)):
        member_list = list(members)
    else:
        raise ArgumentError(
            f"members must be a list (or dict) of scorers, not a {type(members).__name__}; e.g. "
            "rmlab.ensemble(['proxy_0', 'proxy_1', 'proxy_2'], 'uwo')."
        )
    if len(member_list) < 2:
        raise ArgumentError(
            f"An ensemble needs at least 2 members; got {len(member_list)}. Pass a single proxy directly."
        )
    for k, member in enumerate(member_list):
        if isinstance(member, (list, tuple, RewardEnsemble)):
            raise ArgumentError(
                f"Ensemble member {k} is a {type(member).__name__}; members must be single scorers "
                "(a column name, a reward model or path, a callable)."
            )
    if not isinstance(method, str):
        raise ArgumentError(f"method={method!r} must be one of {list(ENSEMBLE_METHODS)}.")
    key = _ENSEMBLE_ALIASES.get(method.lower(), method.lower())
    if key not in ENSEMBLE_METHODS:
        raise ArgumentError(
            f"Unknown ensemble method={method!r}; choose one of {list(ENSEMBLE_METHODS)} (mean, worst case "
            "= min, uncertainty-weighted = mean - lam * var)."
            + closest(method, list(ENSEMBLE_METHODS) + list(_ENSEMBLE_ALIASES))
        )
    try:
        lam = float(lam)
    except (TypeError, ValueError):
        lam = float("nan")
    if not math.isfinite(lam) or lam < 0:
        raise ArgumentError(f"lam={lam!r} must be a finite number >= 0 (the weight of the members' variance).")
    return RewardEnsemble(members=tuple(member_list), method=key, lam=lam, name=name)


@dataclass(frozen=True)
class Named:
    """A scorer with the name the user gave it (a ``{name: scorer}`` entry), as ensembles of Coste
    et al. 2023 label their members."""

    name: str
    spec: object


def is_model(obj) -> bool:
    """Whether ``obj`` is a torch module (checked without importing torch): a reward model among the
    scorers of an ensemble (Coste et al. 2023)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.nn.Module)


def unwrap(spec):
    """The scorer inside a :class:`Named` entry (anything else unchanged), e.g. an ensemble member of
    Coste et al. 2023."""
    return spec.spec if isinstance(spec, Named) else spec


def spec_name(spec, k: int) -> str:
    """The name of scorer ``spec`` (the ``k``-th given) in frames and figures: its given name, column
    name, path, ensemble label or function name (the proxies of Gao et al. 2022 / Coste et al. 2023)."""
    if isinstance(spec, Named):
        return spec.name
    if isinstance(spec, str):
        return spec
    if isinstance(spec, os.PathLike):
        return os.fspath(spec)
    if isinstance(spec, RewardEnsemble):
        return spec.name or _ensemble_label(spec)
    if is_model(spec):
        path = getattr(getattr(spec, "config", None), "_name_or_path", "") or ""
        return str(path) or f"reward_model_{k}"
    if isinstance(spec, (np.ndarray, pd.Series)):
        name = getattr(spec, "name", None)
        return str(name) if name is not None else f"scores_{k}"
    if callable(spec):
        return getattr(spec, "__name__", None) or type(spec).__name__
    return f"proxy_{k}"
