"""Reward overoptimization: best-of-n curves of proxy and gold reward, and proxy ensembles.

Follows Gao et al. 2022, "Scaling Laws for Reward Model Overoptimization" (arXiv 2210.10760):

- :func:`best_of_n` measures, for each ``n``, the expected proxy and gold reward of the sample a
  best-of-n policy picks by the proxy, from a pool of ``N >= n`` samples per prompt, with the
  paper's unbiased estimator (appendix): sorted ascending by proxy, sample ``i`` (1-based) is the
  best of a uniformly random n-subset with probability ``C(i-1, n-1) / C(N, n)``. Its KL from the
  sampling policy is the analytic ``log n - (n-1)/n``, which Beirami et al. 2024 ("Theoretical
  guarantees on the best-of-n alignment policy") show is an *upper bound* on the true KL.
- :func:`ensemble` combines several proxies as Coste et al. 2023 do ("Reward Model Ensembles Help
  Mitigate Overoptimization"): mean, worst case (min) or uncertainty-weighted (mean - lambda * var).
- The paper's functional forms are fitted by :func:`rmlab.fit_overoptimization`
  (:mod:`rmlab.diagnostics.scaling_laws`).

No model runs here unless a proxy or the gold reward is a reward model (scored through
:func:`rmlab.reward_scores`) or a callable. scipy is not used: least squares is numpy's.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import pandas as pd

from rmlab.errors import ArgumentError, DataError, closest

#: The note every best-of-n frame and figure carries about its KL axis.
KL_NOTE = (
    "best-of-n KL is the analytic log n - (n-1)/n, an upper bound on the true KL between the "
    "best-of-n policy and the sampling policy (Beirami et al. 2024)"
)

ENSEMBLE_METHODS = ("mean", "worst", "uwo")
_ENSEMBLE_ALIASES = {"min": "worst", "wco": "worst", "worst_case": "worst"}
CALL_WITH = ("auto", "completions", "prompts_and_completions")
#: Keyword arguments best_of_n passes on to rmlab.reward_scores for reward-model scorers.
_SCORE_KEYWORDS = ("label", "truncation_mode", "add_eos", "chat_template_kwargs", "trust_remote_code")


# --------------------------------------------------------------------------------------------------
# the unbiased best-of-n estimator
# --------------------------------------------------------------------------------------------------
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


def _sorted_pool(proxy: np.ndarray, values: list[np.ndarray]) -> list[np.ndarray]:
    """Values sorted ascending by proxy (stable), tie runs averaged."""
    order = np.argsort(proxy, kind="stable")
    p = proxy[order]
    return [_tie_average(p, np.asarray(v, dtype=np.float64)[order]) for v in values]


@lru_cache(maxsize=1024)
def _cached_weights(pool: int, n: int) -> np.ndarray:
    w = best_of_n_weights(pool, n)
    w.flags.writeable = False
    return w


def _expectation(sorted_values: np.ndarray, n: int) -> float:
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
    out = [_expectation(v, int(n)) for v in _sorted_pool(proxy, columns)]
    return out[0] if vals.ndim == 1 else np.array(out)


# --------------------------------------------------------------------------------------------------
# proxy ensembles
# --------------------------------------------------------------------------------------------------
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
    names = ", ".join(_spec_name(m, k) for k, m in enumerate(ens.members))
    extra = f", lam={ens.lam:g}" if ens.method == "uwo" else ""
    return f"{ens.method}({names}{extra})"


def ensemble(members, method: str = "mean", *, lam: float = 0.5, name: str | None = None) -> RewardEnsemble:
    """A proxy ensemble usable wherever :func:`best_of_n` takes a proxy (Coste et al. 2023).

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
            paths), callables (see :func:`best_of_n`), or a ``{name: scorer}`` mapping.
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
        member_list = [_Named(str(k), v) for k, v in members.items()]
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


# --------------------------------------------------------------------------------------------------
# scorers: columns, arrays, reward models, callables, ensembles
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Named:
    """A scorer with the name the user gave it (from a dict)."""

    name: str
    spec: object


def _is_model(obj) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.nn.Module)


def _unwrap(spec):
    return spec.spec if isinstance(spec, _Named) else spec


def _spec_name(spec, k: int) -> str:
    if isinstance(spec, _Named):
        return spec.name
    if isinstance(spec, str):
        return spec
    if isinstance(spec, os.PathLike):
        return os.fspath(spec)
    if isinstance(spec, RewardEnsemble):
        return spec.name or _ensemble_label(spec)
    if _is_model(spec):
        path = getattr(getattr(spec, "config", None), "_name_or_path", "") or ""
        return str(path) or f"reward_model_{k}"
    if isinstance(spec, (np.ndarray, pd.Series)):
        name = getattr(spec, "name", None)
        return str(name) if name is not None else f"scores_{k}"
    if callable(spec):
        return getattr(spec, "__name__", None) or type(spec).__name__
    return f"proxy_{k}"


def _call_mode(fn, call_with: str, where: str) -> str:
    """How to call a scoring callable: ``"completions"``, ``"positional"`` or ``"keywords"``."""
    if call_with == "completions":
        return "completions"
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = None
    if params is not None and {"prompts", "completions"} <= set(params):
        return "keywords"  # TRL-style reward function: f(prompts=..., completions=..., **kwargs)
    if call_with == "prompts_and_completions":
        return "positional"
    if params is None:
        raise ArgumentError(
            f"Cannot read the signature of the callable {where}; pass call_with='completions' "
            "(it takes a list of completions) or call_with='prompts_and_completions' (it takes prompts, "
            "completions)."
        )
    positional = [
        p for p in params.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    required = [p for p in positional if p.default is p.empty]
    if len(required) == 1:
        return "completions"
    if len(required) == 2:
        return "positional"
    raise ArgumentError(
        f"The callable {where} takes {len(required)} required positional arguments; a scorer is "
        "callable(prompts: list, completions: list) -> array, or callable(completions: list) -> array. "
        "Say which with call_with='prompts_and_completions' or call_with='completions'."
    )


class _Scorer:
    """Resolves scorers to one float per sample, with every check done before anything runs."""

    def __init__(self, frame: pd.DataFrame, *, prompt_column: str, completion_column: str,
                 call_with: str, model_kwargs: dict, progress: bool):
        self.frame = frame
        self.prompt_column = prompt_column
        self.completion_column = completion_column
        self.call_with = call_with
        self.model_kwargs = model_kwargs
        self.progress = progress
        self._cache: dict[int, np.ndarray] = {}
        self._models: dict[int, tuple] = {}
        self._needs_texts = False

    # checks -------------------------------------------------------------------------------------
    def check(self, spec, where: str) -> None:
        """Validate a scorer (recursively for ensembles) without running it."""
        spec = _unwrap(spec)
        if isinstance(spec, RewardEnsemble):
            for k, member in enumerate(spec.members):
                self.check(member, f"{where}, ensemble member {k} ({_spec_name(member, k)})")
            return
        if isinstance(spec, str) and spec in self.frame.columns:
            column = self.frame[spec]
            if not pd.api.types.is_numeric_dtype(column) or pd.api.types.is_bool_dtype(column):
                raise DataError(f"Column {spec!r} ({where}) holds {column.dtype} values; scores must be numbers.")
            return
        if isinstance(spec, str) and not (os.path.exists(spec) or "/" in spec or "\\" in spec):
            scores = [c for c in self.frame.columns if pd.api.types.is_numeric_dtype(self.frame[c])]
            raise DataError(
                f"{where}: the samples have no column {spec!r}; their numeric columns are {scores}."
                + closest(spec, scores)
                + " To score with a reward model, pass the model or its path (a name with '/')."
            )
        if isinstance(spec, (np.ndarray, pd.Series)):
            if len(spec) != len(self.frame):
                raise DataError(
                    f"{where}: an array of {len(spec)} scores for {len(self.frame)} samples; pass one "
                    "score per row, in the rows' order."
                )
            return
        if isinstance(spec, (str, os.PathLike)) or _is_model(spec):
            self._needs_texts = True
            return
        if callable(spec):
            self._needs_texts = True
            _call_mode(spec, self.call_with, where)
            return
        raise ArgumentError(
            f"{where}: cannot score with a {type(spec).__name__}. Pass a column name, a reward model (or its "
            "path), a callable(prompts, completions) -> scores, an array of scores, or rmlab.ensemble(...)."
        )

    def check_texts(self) -> None:
        """Models and callables read prompts and completions: check those columns (cheaply)."""
        if not self._needs_texts:
            return
        if self.completion_column not in self.frame.columns:
            raise DataError(
                f"Scoring with a reward model or callable needs the completions, but the samples have no "
                f"column {self.completion_column!r} (columns: {list(self.frame.columns)})."
                + closest(self.completion_column, self.frame.columns)
                + " Pass completion_column= to name it."
            )
        bad = [i for i, v in enumerate(self.frame[self.completion_column]) if not isinstance(v, (str, list, np.ndarray))]
        if bad:
            raise DataError(
                f"Row {bad[0]} of column {self.completion_column!r} is a {type(self.frame[self.completion_column].iloc[bad[0]]).__name__}"
                f" ({len(bad)} such rows); completions must be strings (or chat messages)."
            )

    def load_models(self, specs) -> None:
        """Load and check every reward model (path or object) with its tokenizer, before any scoring."""
        from rmlab.engine.reward_model import prepare_reward_inputs

        kwargs = {k: v for k, v in self.model_kwargs.items() if k != "tokenizer"}
        for where, spec in specs:
            spec = _unwrap(spec)
            if isinstance(spec, RewardEnsemble):
                self.load_models([(f"{where}, member {k}", m) for k, m in enumerate(spec.members)])
                continue
            if id(spec) in self._models or not (
                _is_model(spec) or (isinstance(spec, (str, os.PathLike)) and spec not in self.frame.columns)
            ):
                continue
            one = self._rows().head(1)
            inputs = prepare_reward_inputs(
                spec, one, tokenizer=self.model_kwargs.get("tokenizer"), role=where, **kwargs
            )
            self._models[id(spec)] = (inputs.model, inputs.tokenizer)

    # scoring ------------------------------------------------------------------------------------
    def _rows(self) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "prompt": self.frame[self.prompt_column].to_numpy(),
                "completion": self.frame[self.completion_column].to_numpy(),
            }
        )

    def scores(self, spec, where: str) -> np.ndarray:
        spec = _unwrap(spec)
        key = id(spec)
        if key in self._cache:
            return self._cache[key]
        if isinstance(spec, RewardEnsemble):
            matrix = np.column_stack(
                [self.scores(m, f"{where}, ensemble member {k}") for k, m in enumerate(spec.members)]
            )
            out = spec.combine(matrix)
        elif isinstance(spec, str) and spec in self.frame.columns:
            out = self.frame[spec].to_numpy(dtype=np.float64)
        elif isinstance(spec, (np.ndarray, pd.Series)):
            out = np.asarray(spec, dtype=np.float64).reshape(-1)
        elif key in self._models:
            from rmlab.rewards.scores import reward_scores

            model, tok = self._models[key]
            kwargs = {k: v for k, v in self.model_kwargs.items() if k != "tokenizer"}
            frame = reward_scores(model, self._rows(), tokenizer=tok, progress=self.progress, **kwargs)
            out = frame["score"].to_numpy(dtype=np.float64)
        else:
            prompts = [_to_plain(v) for v in self.frame[self.prompt_column]]
            completions = [_to_plain(v) for v in self.frame[self.completion_column]]
            mode = _call_mode(spec, self.call_with, where)
            if mode == "completions":
                raw = spec(completions)
            elif mode == "keywords":
                raw = spec(prompts=prompts, completions=completions)
            else:
                raw = spec(prompts, completions)
            try:
                out = np.asarray(raw, dtype=np.float64).reshape(-1)
            except (TypeError, ValueError) as err:
                raise DataError(f"The callable {where} returned values that are not numbers ({err}).") from None
            if len(out) != len(self.frame):
                raise DataError(
                    f"The callable {where} returned {len(out)} scores for {len(self.frame)} completions; it "
                    "must return one score per completion, in order."
                )
        bad = np.flatnonzero(~np.isfinite(out))
        if len(bad):
            prompt = self.frame[self.prompt_column].iloc[bad[0]]
            raise DataError(
                f"{where} has {len(bad)} non-finite score(s) (NaN or inf), first at row {bad[0]} "
                f"(prompt {_show(prompt)}). Drop those samples or fix their scores: best-of-n cannot rank them."
            )
        self._cache[key] = out
        return out


def _to_plain(value):
    """Nested numpy arrays (parquet's chat messages) as lists; everything else unchanged."""
    if isinstance(value, np.ndarray):
        return [_to_plain(v) for v in value.tolist()]
    if isinstance(value, list):
        return [_to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    return value


def _show(prompt, width: int = 60) -> str:
    text = prompt if isinstance(prompt, str) else json.dumps(_to_plain(prompt), default=str)
    return repr(text if len(text) <= width else text[: width - 3] + "...")


def _prompt_codes(column: pd.Series) -> tuple[np.ndarray, list]:
    """Integer code per row (prompts in sorted order) and each code's prompt."""
    values = column.tolist()
    if all(isinstance(v, str) for v in values):
        codes, uniques = pd.factorize(column, sort=True)
        return np.asarray(codes), list(uniques)
    keys = [v if isinstance(v, str) else json.dumps(_to_plain(v), sort_keys=True, default=str) for v in values]
    codes, uniques = pd.factorize(pd.Series(keys), sort=True)
    first = {}
    for code, value in zip(codes, values):
        first.setdefault(code, value)
    return np.asarray(codes), [first[c] for c in range(len(uniques))]


def _read_samples(samples) -> pd.DataFrame:
    if isinstance(samples, pd.DataFrame):
        frame = samples
    elif isinstance(samples, (str, os.PathLike)):
        from rmlab.io.pairs import read_table

        frame = read_table(samples)
    elif isinstance(samples, (Mapping, list, tuple)):
        frame = pd.DataFrame(samples)
    else:
        raise DataError(
            f"Cannot read samples from a {type(samples).__name__}; pass a DataFrame with one row per "
            "completion (columns 'prompt', 'completion' and scores), records, or a .parquet/.jsonl path."
        )
    if len(frame) == 0:
        raise DataError("The samples are empty: best-of-n needs at least one completion per prompt.")
    frame = frame.reset_index(drop=True)
    frame.columns = [str(c) for c in frame.columns]
    return frame


def _proxy_list(proxy) -> list[tuple[str, object]]:
    if isinstance(proxy, Mapping):
        items = [(str(k), v) for k, v in proxy.items()]
    elif isinstance(proxy, (list, tuple)):
        items = [(_spec_name(p, k), p) for k, p in enumerate(proxy)]
    else:
        items = [(_spec_name(proxy, 0), proxy)]
    if not items:
        raise ArgumentError("proxy is empty; pass a column name, a reward model, a callable or a list of them.")
    seen: dict[str, int] = {}
    named = []
    for name, spec in items:
        if isinstance(spec, (list, tuple)):
            raise ArgumentError(
                f"proxy {name!r} is a {type(spec).__name__}; to combine several scorers into one proxy use "
                "rmlab.ensemble([...]); a list passed as proxy= compares each entry separately."
            )
        count = seen.get(name, 0)
        seen[name] = count + 1
        named.append((name if count == 0 else f"{name}_{count}", spec))
    return named


def _check_n_values(n_values, pools: np.ndarray, prompts: list) -> np.ndarray:
    smallest = int(pools.min())
    if n_values is None:
        return 2 ** np.arange(int(math.floor(math.log2(smallest))) + 1)
    if isinstance(n_values, (int, np.integer)) and not isinstance(n_values, bool):
        n_values = [n_values]
    try:
        ns = list(n_values)
    except TypeError:
        raise ArgumentError(f"n_values={n_values!r} must be a list of positive integers.") from None
    bad = [n for n in ns if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1]
    if bad or not ns:
        raise ArgumentError(f"n_values must be positive integers; got {bad or ns}.")
    ns = np.unique(np.asarray(ns, dtype=np.int64))
    top = int(ns.max())
    if top > smallest:
        short = np.flatnonzero(pools < top)
        k = int(short[np.argmin(pools[short])])
        raise ArgumentError(
            f"n={top} is larger than the pool of prompt {_show(prompts[k])}, which has {int(pools[k])} "
            f"samples ({len(short)} of {len(pools)} prompts have fewer than {top}). Best-of-n from a pool "
            f"of N needs n <= N: use n_values up to {smallest}, or drop or resample the small pools."
        )
    return ns


# --------------------------------------------------------------------------------------------------
# best-of-n curves
# --------------------------------------------------------------------------------------------------
def best_of_n(
    samples,
    *,
    proxy,
    gold,
    n_values=None,
    prompt_column: str = "prompt",
    completion_column: str = "completion",
    values: Sequence[str] = (),
    call_with: str = "auto",
    tokenizer=None,
    batch_tokens: int | None = None,
    max_length: int | None = None,
    device="auto",
    dtype="auto",
    progress: bool = True,
    **score_kwargs,
) -> pd.DataFrame:
    """Expected proxy and gold reward of best-of-n against the KL, per ``n`` (Gao et al. 2022).

    Follows Gao et al. 2022, "Scaling Laws for Reward Model Overoptimization": for each prompt, the
    pool of its ``N`` samples (``N >= n``, each prompt its own ``N``) gives the *unbiased* expected
    proxy and gold reward of the sample that best-of-n picks by the proxy: with the pool sorted
    ascending by proxy, sample ``i`` (1-based) is the best of a uniformly random n-subset with
    probability ``C(i-1, n-1) / C(N, n)`` (appendix; log-binomials via ``lgamma``). No subsets are
    drawn, so the curve has no Monte-Carlo noise beyond the pool's own. Per-prompt expectations are
    averaged over prompts; ``*_se`` are standard errors of that mean across prompts
    (``std(ddof=1) / sqrt(prompts)``, so they include each pool's sampling noise as it varies between
    prompts); with a single prompt they are NaN (noted in ``frame.attrs["notes"]``).

    The KL column is the analytic best-of-n KL ``log n - (n-1)/n``. Beirami et al. 2024
    ("Theoretical guarantees on the best-of-n alignment policy") show it is an **upper bound** on the
    true KL of the best-of-n policy from the sampling policy (tight when ``n`` is small relative to
    the number of distinct responses); ``frame.attrs["kl_note"]`` says so.

    Ties: samples with exactly equal proxy scores are treated symmetrically (a tie for the best broken
    uniformly at random): their gold (and other values) are averaged within each tie before weighting.
    The result does not depend on the order of the rows. Gold scores stay with their own samples when
    the pool is re-ranked by a proxy.

    When ``n`` approaches ``N`` the estimate rests on the few top samples of each pool (``n = N`` is the
    single best), so prefer pools several times larger than the largest ``n``.

    Args:
        samples: one row per completion, e.g. from ``rmlab.sample``: a DataFrame (or records, or a
            .parquet/.jsonl path) with ``prompt_column``, ``completion_column`` (needed only when a
            reward model or callable scores) and any score columns.
        proxy: what best-of-n maximises: a column name; a reward model (object, or a local path / hub
            name containing '/'), scored by :func:`rmlab.reward_scores` on the rows' prompt and
            completion; a callable ``f(prompts: list, completions: list) -> array`` (TRL-style
            ``f(prompts=..., completions=..., **kw)`` too) or ``f(completions: list) -> array`` (read
            from the signature, or set by ``call_with``); an array of per-row scores; an
            :func:`ensemble`; or a list / ``{name: scorer}`` dict of these to compare several proxies.
        gold: the true reward, one scorer of the same kinds (not a list). The toy world's
            ``world.gold`` (a callable on a list of texts) works as is.
        n_values: the ``n`` to evaluate (integers >= 1); default the powers of two up to the smallest
            pool.
        prompt_column, completion_column: column names in ``samples``.
        values: other numeric columns to average over the chosen sample (e.g. ``["words"]``); each gets
            a column and a ``*_se`` column.
        call_with: ``"auto"`` (read the callable's signature), ``"completions"`` or
            ``"prompts_and_completions"``.
        tokenizer, batch_tokens, max_length, device, dtype, progress, **score_kwargs: passed to
            :func:`rmlab.reward_scores` for reward models (one tokenizer for all of them, or None to
            load each model's own).

    Returns:
        One row per ``n`` (per proxy and ``n`` when several): ``proxy_name`` (only when several),
        ``n``, ``kl``, ``proxy``, ``gold``, ``proxy_se``, ``gold_se``, then ``values`` and their
        ``*_se``, then ``proxy_by_prompt``, ``gold_by_prompt`` and ``<value>_by_prompt``: per row, the
        float64 array of the per-prompt expectations (prompts in sorted order, the same order in every
        row) whose mean is the row's value. Prompts are the sampling unit of the curve, and
        :func:`rmlab.fit_overoptimization` resamples them through these columns.
        ``frame.attrs``: ``kl_note``, ``estimator``, ``prompts``, ``pool_min``, ``pool_max``,
        ``proxy_name`` (single proxy), ``gold_name``, ``notes``.

    Raises:
        DataError: missing columns (with the closest name), non-numeric or non-finite scores (naming
            the row and prompt), empty samples.
        ArgumentError: an ``n`` larger than some prompt's pool (naming the prompt and its pool size),
            bad ``n_values``, an unreadable callable signature, an unknown option.
        ModelError / TokenizerError: a reward model that cannot score (raised before any scoring).

    Example:
        >>> import pandas as pd
        >>> pool = pd.DataFrame({"prompt": ["a"] * 4, "completion": list("wxyz"),
        ...                      "proxy": [0.1, 0.4, 0.3, 0.2], "gold": [1.0, 0.0, 2.0, 3.0]})
        >>> best_of_n(pool, proxy="proxy", gold="gold", n_values=[1, 4])[["n", "proxy", "gold"]]
           n  proxy  gold
        0  1   0.25   1.5
        1  4   0.40   0.0
    """
    if call_with not in CALL_WITH:
        raise ArgumentError(f"call_with={call_with!r} must be one of {list(CALL_WITH)}." + closest(call_with, CALL_WITH))
    unknown = sorted(set(score_kwargs) - set(_SCORE_KEYWORDS))
    if unknown:
        raise ArgumentError(
            f"best_of_n got unexpected keyword argument(s) {unknown}; reward models also accept "
            f"{sorted(_SCORE_KEYWORDS)}." + closest(unknown[0], list(_SCORE_KEYWORDS) + ["n_values", "values"])
        )
    frame = _read_samples(samples)
    if prompt_column not in frame.columns:
        raise DataError(
            f"The samples have no column {prompt_column!r} (columns: {list(frame.columns)})."
            + closest(prompt_column, frame.columns)
            + " Best-of-n pools samples per prompt; pass prompt_column= to name the prompt column."
        )
    if isinstance(values, str):
        values = [values]
    values = list(values)
    for column in values:
        if column not in frame.columns:
            raise DataError(f"values: the samples have no column {column!r}." + closest(column, frame.columns))
        if not pd.api.types.is_numeric_dtype(frame[column]):
            raise DataError(f"values: column {column!r} holds {frame[column].dtype} values, not numbers.")
    if isinstance(gold, (list, tuple, Mapping)):
        raise ArgumentError(
            "gold must be one scorer (a column, reward model, callable or ensemble), not a "
            f"{type(gold).__name__}; compare several proxies with proxy=[...] instead."
        )
    proxies = _proxy_list(proxy)
    gold_name = _spec_name(gold, 0)
    model_kwargs = dict(score_kwargs, tokenizer=tokenizer, batch_tokens=batch_tokens, max_length=max_length,
                        device=device, dtype=dtype)
    scorer = _Scorer(frame, prompt_column=prompt_column, completion_column=completion_column,
                     call_with=call_with, model_kwargs=model_kwargs, progress=progress)
    for name, spec in proxies:
        scorer.check(spec, f"proxy {name!r}")
    scorer.check(gold, f"gold {gold_name!r}")
    scorer.check_texts()
    for column in values:
        if not np.isfinite(frame[column].to_numpy(dtype=np.float64)).all():
            raise DataError(f"values: column {column!r} has NaN or inf; drop or fix those samples.")

    codes, prompts = _prompt_codes(frame[prompt_column])
    pools = np.bincount(codes)
    ns = _check_n_values(n_values, pools, prompts)

    # every reward model is loaded and checked before the first one scores
    scorer.load_models([(f"proxy {name!r}", spec) for name, spec in proxies] + [(f"gold {gold_name!r}", gold)])
    gold_scores = scorer.scores(gold, f"gold {gold_name!r}")
    extra = [frame[c].to_numpy(dtype=np.float64) for c in values]

    # rows grouped by prompt (prompts in sorted order), original row order kept inside each group
    order = np.argsort(codes, kind="stable")
    bounds = np.r_[0, np.cumsum(pools)]
    rows = []
    for name, spec in proxies:
        proxy_scores = scorer.scores(spec, f"proxy {name!r}")
        per_prompt = np.empty((len(ns), len(pools), 2 + len(extra)))
        for p in range(len(pools)):
            idx = order[bounds[p] : bounds[p + 1]]
            pool = _sorted_pool(proxy_scores[idx], [proxy_scores[idx], gold_scores[idx]] + [e[idx] for e in extra])
            for j, n in enumerate(ns):
                per_prompt[j, p] = [_expectation(v, int(n)) for v in pool]
        for j, n in enumerate(ns):
            mean = per_prompt[j].mean(axis=0)
            se = per_prompt[j].std(axis=0, ddof=1) / math.sqrt(len(pools)) if len(pools) > 1 else np.full(len(mean), np.nan)
            row = {"proxy_name": name, "n": int(n), "kl": float(np.log(n) - (n - 1) / n),
                   "proxy": float(mean[0]), "gold": float(mean[1]), "proxy_se": float(se[0]), "gold_se": float(se[1])}
            for k, column in enumerate(values):
                row[column] = float(mean[2 + k])
                row[f"{column}_se"] = float(se[2 + k])
            # the per-prompt expectations the means average: the sampling unit, for prompt bootstraps
            for k, column in enumerate(["proxy", "gold", *values]):
                row[f"{column}_by_prompt"] = per_prompt[j][:, k].copy()
            rows.append(row)
    out = pd.DataFrame(rows)
    if len(proxies) == 1:
        out = out.drop(columns="proxy_name")
    notes = []
    if len(pools) == 1:
        notes.append("one prompt only: standard errors across prompts are undefined (NaN)")
    out.attrs.update(
        kl_note=KL_NOTE,
        estimator="unbiased best-of-n estimator over each prompt's pool (Gao et al. 2022, appendix); "
        "exact proxy ties averaged",
        prompts=int(len(pools)),
        pool_min=int(pools.min()),
        pool_max=int(pools.max()),
        gold_name=gold_name,
        notes=notes,
    )
    if len(proxies) == 1:
        out.attrs["proxy_name"] = proxies[0][0]
    return out
