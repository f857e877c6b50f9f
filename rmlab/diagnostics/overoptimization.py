"""Reward overoptimization: best-of-n curves of proxy and gold reward.

Follows Gao et al. 2022, "Scaling Laws for Reward Model Overoptimization" (arXiv 2210.10760):

- :func:`best_of_n` measures, for each ``n``, the expected proxy and gold reward of the sample a
  best-of-n policy picks by the proxy, from a pool of ``N >= n`` samples per prompt, with the
  paper's unbiased estimator (appendix, :mod:`rmlab.diagnostics.best_of_n_estimator`). Its KL from
  the sampling policy is the analytic ``log n - (n-1)/n``, which Beirami et al. 2024 ("Theoretical
  guarantees on the best-of-n alignment policy") show is an *upper bound* on the true KL.
- Proxies may be columns, reward models, callables, arrays or ensembles of them
  (:mod:`rmlab.diagnostics.scorers`; :func:`ensemble` combines several as Coste et al. 2023,
  "Reward Model Ensembles Help Mitigate Overoptimization", do, :mod:`rmlab.diagnostics.ensembles`).
- The paper's functional forms are fitted by :func:`rmlab.fit_overoptimization`
  (:mod:`rmlab.diagnostics.scaling_laws`).

No model runs here unless a proxy or the gold reward is a reward model (scored as
:func:`rmlab.reward_scores` scores prompt/completion rows) or a callable. scipy is not used.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from rmlab.diagnostics.best_of_n_estimator import best_of_n_expectation, best_of_n_weights, expectation, sorted_pool
from rmlab.diagnostics.ensembles import ENSEMBLE_METHODS, RewardEnsemble, ensemble, spec_name
from rmlab.diagnostics.scorers import CALL_WITH, SampleScorer, show
from rmlab.errors import ArgumentError, DataError, closest
from rmlab.io.pairs import to_python
from rmlab.options import CACHING, LOADING, RUNNING, TOKENIZING, Options, with_options

#: The note every best-of-n frame and figure carries about its KL axis.
KL_NOTE = (
    "best-of-n KL is the analytic log n - (n-1)/n, an upper bound on the true KL between the "
    "best-of-n policy and the sampling policy (Beirami et al. 2024)"
)


def _prompt_codes(column: pd.Series) -> tuple[np.ndarray, list]:
    """Integer code per row (prompts in sorted order) and each code's prompt."""
    values = column.tolist()
    if all(isinstance(v, str) for v in values):
        codes, uniques = pd.factorize(column, sort=True)
        return np.asarray(codes), list(uniques)
    keys = [v if isinstance(v, str) else json.dumps(to_python(v), sort_keys=True, default=str) for v in values]
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
        items = [(spec_name(p, k), p) for k, p in enumerate(proxy)]
    else:
        items = [(spec_name(proxy, 0), proxy)]
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
            f"n={top} is larger than the pool of prompt {show(prompts[k])}, which has {int(pools[k])} "
            f"samples ({len(short)} of {len(pools)} prompts have fewer than {top}). Best-of-n from a pool "
            f"of N needs n <= N: use n_values up to {smallest}, or drop or resample the small pools."
        )
    return ns


@with_options(*TOKENIZING, *RUNNING, *LOADING, *CACHING, defaults={"add_eos": None})
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
    label=None,
    options: Options,
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
            name containing '/'), scored on the rows' prompt and completion as
            :func:`rmlab.reward_scores` scores them (see :mod:`rmlab.diagnostics.scorers`); a callable ``f(prompts: list, completions: list) -> array`` (TRL-style
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
        label: which output of a reward model is the reward, for a head with several (index or
            ``id2label`` name).
        tokenizer: one tokenizer for every reward model (None: each model's own).
        max_length, truncation_mode, add_eos, chat_template_kwargs, batch_tokens, device, dtype,
            progress, trust_remote_code, revision, use_safetensors, runner, cache_dir,
            overwrite_cache: how reward models tokenise and score the rows, as in
            :func:`rmlab.reward_scores` (see :class:`rmlab.Options`); with a cache the scores are
            kept (``scores-<key>/``) and a repeated curve runs no model.
        options: the run options above as one :class:`rmlab.Options` (flat keywords override it).

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
    gold_name = spec_name(gold, 0)
    scorer = SampleScorer(frame.columns, options=options, call_with=call_with, label=label, tokenizer=options.tokenizer,
                          prompt_column=prompt_column, completion_column=completion_column).bind(frame)
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
    scorer.load_models()
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
            pool = sorted_pool(proxy_scores[idx], [proxy_scores[idx], gold_scores[idx]] + [e[idx] for e in extra])
            for j, n in enumerate(ns):
                per_prompt[j, p] = [expectation(v, int(n)) for v in pool]
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



__all__ = [
    "CALL_WITH",
    "ENSEMBLE_METHODS",
    "KL_NOTE",
    "RewardEnsemble",
    "best_of_n",
    "best_of_n_expectation",
    "best_of_n_weights",
    "ensemble",
]
