"""Best-of-n curves, proxy ensembles and overoptimization fits (Gao et al. 2022; Coste et al. 2023)."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rmlab.diagnostics.overoptimization import best_of_n, best_of_n_expectation, best_of_n_weights, ensemble
from rmlab.diagnostics.scaling_laws import fit_overoptimization
from rmlab.errors import ArgumentError, DataError
from rmlab.toy import language
from rmlab.toy.world import default_dir


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
def brute_force(proxy, gold, n):
    """Mean over every n-subset of the gold of its best sample (ties: mean over the tied maxima)."""
    proxy, gold = np.asarray(proxy, float), np.asarray(gold, float)
    total = []
    for subset in itertools.combinations(range(len(proxy)), n):
        s = np.array(subset)
        top = proxy[s].max()
        total.append(gold[s][proxy[s] == top].mean())
    return float(np.mean(total))


def pool_frame(proxy, gold, prompt="p", **extra):
    frame = pd.DataFrame({"prompt": prompt, "completion": [f"c{i}" for i in range(len(proxy))],
                          "proxy": proxy, "gold": gold})
    for k, v in extra.items():
        frame[k] = v
    return frame


# --------------------------------------------------------------------------------------------------
# the estimator
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ties", [False, True])
def test_estimator_equals_enumeration_of_all_subsets(ties):
    rng = np.random.default_rng(1 + ties)
    for big in (5, 8):
        proxy = rng.integers(0, 3, big).astype(float) if ties else rng.normal(size=big)
        gold = rng.normal(size=big)
        if ties:
            assert len(np.unique(proxy)) < big
        frame = best_of_n(pool_frame(proxy, gold), proxy="proxy", gold="gold", n_values=range(1, big + 1))
        for n in range(1, big + 1):
            expected = brute_force(proxy, gold, n)
            assert best_of_n_expectation(proxy, gold, n) == pytest.approx(expected, rel=1e-10, abs=1e-12)
            assert frame.loc[frame.n == n, "gold"].item() == pytest.approx(expected, rel=1e-10, abs=1e-12)


def test_weights_sum_to_one_and_survive_large_pools():
    for big, n in [(7, 3), (512, 256), (5000, 17), (5000, 5000)]:
        w = best_of_n_weights(big, n)
        assert len(w) == big - n + 1 and np.isfinite(w).all()
        assert w.sum() == pytest.approx(1.0, rel=1e-9)
    assert best_of_n_weights(5000, 5000)[-1] == pytest.approx(1.0)


def test_estimator_matches_monte_carlo_best_of_n():
    rng = np.random.default_rng(7)
    big, n, draws = 40, 6, 20000
    proxy, gold = rng.normal(size=big), rng.normal(size=big)
    subsets = np.argsort(rng.random((draws, big)), axis=1)[:, :n]  # uniform n-subsets without replacement
    best = subsets[np.arange(draws), np.argmax(proxy[subsets], axis=1)]
    picked = gold[best]
    se = picked.std(ddof=1) / math.sqrt(draws)
    assert abs(best_of_n_expectation(proxy, gold, n) - picked.mean()) < 4 * se


def test_n_one_is_the_pool_mean_and_n_big_the_top_sample():
    proxy = np.array([0.3, 2.0, -1.0, 0.7, 2.0, 1.1])
    gold = np.array([1.0, 5.0, 2.0, 3.0, 9.0, 4.0])
    assert best_of_n_expectation(proxy, gold, 1) == pytest.approx(gold.mean())
    # two samples tie for the top proxy score: n = N gives the mean of their gold
    assert best_of_n_expectation(proxy, gold, 6) == pytest.approx(7.0)
    unique = np.array([0.3, 2.5, -1.0, 0.7, 2.0, 1.1])
    assert best_of_n_expectation(unique, gold, 6) == pytest.approx(5.0)
    # several value columns at once, each kept with its own sample
    both = best_of_n_expectation(unique, np.column_stack([gold, -gold]), 3)
    np.testing.assert_allclose(both, [brute_force(unique, gold, 3), -brute_force(unique, gold, 3)])


def test_ties_do_not_depend_on_row_order():
    proxy = np.array([1.0, 1.0, 1.0, 0.0, 2.0, 2.0])
    gold = np.array([0.0, 3.0, 6.0, 1.0, -4.0, 8.0])
    perm = np.array([5, 2, 0, 4, 1, 3])
    for n in range(1, 7):
        a = best_of_n_expectation(proxy, gold, n)
        assert a == pytest.approx(best_of_n_expectation(proxy[perm], gold[perm], n), rel=1e-12)
        assert a == pytest.approx(brute_force(proxy, gold, n), rel=1e-12)


# --------------------------------------------------------------------------------------------------
# best_of_n frames: alignment, pools, SEs, scorers
# --------------------------------------------------------------------------------------------------
def test_gold_stays_with_its_sample_when_reranked_and_row_order_is_irrelevant():
    rng = np.random.default_rng(3)
    rows = []
    for p in range(4):
        proxy = rng.normal(size=32)
        rows.append(pool_frame(proxy, -proxy, prompt=f"prompt {p}"))
    frame = pd.concat(rows, ignore_index=True)
    curve = best_of_n(frame, proxy="proxy", gold="gold")
    assert list(curve.n) == [1, 2, 4, 8, 16, 32]
    assert np.all(np.diff(curve.proxy) > 0) and np.all(np.diff(curve.gold) < 0)
    np.testing.assert_allclose(curve.gold, -curve.proxy, rtol=1e-12)
    shuffled = frame.sample(frac=1.0, random_state=0)  # prompts interleaved, index scrambled
    pd.testing.assert_frame_equal(best_of_n(shuffled, proxy="proxy", gold="gold"), curve, rtol=1e-12)


def test_pools_of_different_sizes_and_standard_errors_across_prompts():
    rng = np.random.default_rng(4)
    sizes = {"a": 9, "b": 16, "c": 12}
    frame = pd.concat(
        [pool_frame(rng.normal(size=k), rng.normal(size=k), prompt=p, words=rng.integers(1, 30, k)) for p, k in sizes.items()],
        ignore_index=True,
    )
    curve = best_of_n(frame, proxy="proxy", gold="gold", values=["words"])
    assert list(curve.n) == [1, 2, 4, 8]  # powers of two up to the smallest pool (9)
    assert list(curve.columns) == ["n", "kl", "proxy", "gold", "proxy_se", "gold_se", "words", "words_se",
                                   "proxy_by_prompt", "gold_by_prompt", "words_by_prompt"]
    for row in curve.itertuples():
        per = np.array([
            best_of_n_expectation(g.proxy.to_numpy(), g[["proxy", "gold", "words"]].to_numpy(float), row.n)
            for _, g in frame.groupby("prompt")  # prompts in sorted order
        ])
        np.testing.assert_allclose(row.proxy_by_prompt, per[:, 0], rtol=1e-12)
        np.testing.assert_allclose(row.gold_by_prompt, per[:, 1], rtol=1e-12)
        np.testing.assert_allclose(row.words_by_prompt, per[:, 2], rtol=1e-12)
        per = per[:, 1:]
        assert row.gold == pytest.approx(per[:, 0].mean())
        assert row.gold_se == pytest.approx(per[:, 0].std(ddof=1) / math.sqrt(3))
        assert row.words == pytest.approx(per[:, 1].mean())
        assert row.kl == pytest.approx(math.log(row.n) - (row.n - 1) / row.n)
    assert "upper bound" in curve.attrs["kl_note"] and curve.attrs["prompts"] == 3
    assert (curve.attrs["pool_min"], curve.attrs["pool_max"]) == (9, 16)


def test_one_prompt_has_no_standard_error():
    curve = best_of_n(pool_frame([0.1, 0.2, 0.3, 0.4], [1, 2, 3, 4]), proxy="proxy", gold="gold")
    assert curve.gold_se.isna().all() and curve.proxy_se.isna().all()
    assert any("one prompt" in note for note in curve.attrs["notes"])


def test_callables_arrays_and_several_proxies():
    rng = np.random.default_rng(5)
    texts = [language.sample_review(rng) for _ in range(24)]
    frame = pd.DataFrame({"prompt": ["x:"] * 12 + ["y:"] * 12, "completion": texts, "rm0": rng.normal(size=24)})
    frame["gold_col"] = language.gold_reward(texts)

    def by_length(prompts, completions):  # callable(prompts, completions)
        assert len(prompts) == len(completions) == 24 and prompts[0] == "x:"
        return [len(c) for c in completions]

    def trl_style(prompts, completions, **kwargs):
        return np.array([c.count("great") for c in completions], dtype=float)

    curve = best_of_n(
        frame, proxy={"rm0": "rm0", "length": by_length, "trl": trl_style, "arr": frame["rm0"].to_numpy() * 2},
        gold=language.gold_reward,  # callable(completions), as the toy world's world.gold
        n_values=[1, 4, 12],
    )
    assert list(curve.columns[:3]) == ["proxy_name", "n", "kl"]
    assert curve.proxy_name.tolist() == ["rm0"] * 3 + ["length"] * 3 + ["trl"] * 3 + ["arr"] * 3
    same = best_of_n(frame, proxy="rm0", gold="gold_col", n_values=[1, 4, 12])
    np.testing.assert_allclose(curve[curve.proxy_name == "rm0"].gold, same.gold)
    # a proxy scaled by 2 ranks the same samples: same gold, twice the proxy
    np.testing.assert_allclose(curve[curve.proxy_name == "arr"].gold, same.gold)
    np.testing.assert_allclose(curve[curve.proxy_name == "arr"].proxy, 2 * same.proxy)
    lengths = frame.completion.str.len().to_numpy(float)
    top = best_of_n(frame.assign(length=lengths), proxy="length", gold="gold_col", n_values=[1, 4, 12])
    np.testing.assert_allclose(curve[curve.proxy_name == "length"].gold, top.gold)
    # an explicit call_with overrides the signature
    one = best_of_n(frame, proxy=lambda texts, extra=None: [len(t) for t in texts], gold="gold_col",
                    n_values=[4], call_with="completions")
    assert one.gold.item() == pytest.approx(top.gold.iloc[1])


def test_reward_model_scorer_matches_reward_scores(tok):
    import rmlab
    from rmlab.toy import tiny_reward_model

    rm = tiny_reward_model("gpt2", seed=3)
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"prompt": ["Review:"] * 4 + ["Film:"] * 4,
                          "completion": [language.sample_review(rng) for _ in range(8)]})
    frame["gold"] = language.gold_reward(frame.completion)
    curve = best_of_n(frame, proxy=rm, gold="gold", tokenizer=tok, n_values=[1, 4], progress=False)
    scores = rmlab.reward_scores(rm, frame[["prompt", "completion"]], tokenizer=tok, progress=False)["score"]
    assert curve.proxy.iloc[0] == pytest.approx(scores.groupby(frame.prompt).mean().mean(), rel=1e-6)
    best = frame.assign(s=scores.to_numpy()).sort_values("s").groupby("prompt").gold.last().mean()
    assert curve.gold.iloc[1] == pytest.approx(best)


def test_reward_model_scorer_takes_options(tok):
    """best_of_n takes rmlab.Options (flat keywords on top); reward-model options reach the scoring."""
    import rmlab
    from rmlab.toy import tiny_reward_model

    rm = tiny_reward_model("gpt2", seed=3)
    rng = np.random.default_rng(1)
    frame = pd.DataFrame({"prompt": ["Review:"] * 4, "completion": [language.sample_review(rng) for _ in range(4)]})
    frame["gold"] = language.gold_reward(frame.completion)
    flat = best_of_n(frame, proxy=rm, gold="gold", tokenizer=tok, n_values=[1, 4], progress=False)
    opts = rmlab.Options(tokenizer=tok, progress=False)
    pd.testing.assert_frame_equal(best_of_n(frame, proxy=rm, gold="gold", n_values=[1, 4], options=opts), flat)
    cut = best_of_n(frame, proxy=rm, gold="gold", n_values=[1], options=opts, max_length=6)
    direct = rmlab.reward_scores(rm, frame[["prompt", "completion"]], tokenizer=tok, max_length=6, progress=False)
    assert cut.proxy.iloc[0] == pytest.approx(direct["score"].mean(), rel=1e-6)
    assert cut.proxy.iloc[0] != pytest.approx(flat.proxy.iloc[0], rel=1e-6)


def test_every_model_is_checked_before_any_scores(tok, monkeypatch):
    from rmlab.errors import ModelError
    from rmlab.toy import tiny_causal_lm, tiny_reward_model

    def forbidden(*args, **kwargs):
        raise AssertionError("a reward model scored before the input error was raised")

    monkeypatch.setattr("rmlab.engine.reward_model.score_sequences", forbidden)  # what the local runner scores with
    frame = pool_frame([0.0, 1.0], [1.0, 0.0])
    rm = tiny_reward_model("gpt2", seed=3)
    with pytest.raises(ModelError):  # a causal LM is no reward model
        best_of_n(frame, proxy=[rm, tiny_causal_lm("gpt2", seed=0)], gold="gold", tokenizer=tok)
    with pytest.raises(DataError, match="Did you mean 'gold'"):
        best_of_n(frame, proxy=rm, gold="gld", tokenizer=tok)


# --------------------------------------------------------------------------------------------------
# ensembles
# --------------------------------------------------------------------------------------------------
def test_ensembles_against_numpy():
    rng = np.random.default_rng(6)
    scores = rng.normal(size=(50, 3))
    np.testing.assert_allclose(ensemble(["a", "b", "c"]).combine(scores), scores.mean(axis=1))
    np.testing.assert_allclose(ensemble(["a", "b", "c"], "worst").combine(scores), scores.min(axis=1))
    np.testing.assert_allclose(ensemble(["a", "b", "c"], "min").combine(scores), scores.min(axis=1))
    var = ((scores - scores.mean(axis=1, keepdims=True)) ** 2).mean(axis=1)  # population variance
    np.testing.assert_allclose(ensemble(["a", "b", "c"], "uwo", lam=0.7).combine(scores), scores.mean(axis=1) - 0.7 * var)

    frame = pd.DataFrame(scores, columns=["a", "b", "c"]).assign(prompt="p", completion="c", gold=rng.normal(size=50))
    uwo = ensemble(["a", "b", "c"], "uwo")
    combined = scores.mean(axis=1) - 0.5 * var
    curve = best_of_n(frame, proxy={"uwo": uwo, "worst": ensemble(["a", "b", "c"], "worst")}, gold="gold", n_values=[1, 50])
    got = curve[curve.proxy_name == "uwo"]
    assert got.proxy.iloc[0] == pytest.approx(combined.mean())
    assert got.gold.iloc[1] == pytest.approx(frame.gold.iloc[np.argmax(combined)])
    worst = curve[curve.proxy_name == "worst"]
    assert worst.gold.iloc[1] == pytest.approx(frame.gold.iloc[np.argmax(scores.min(axis=1))])
    assert "uwo(a, b, c, lam=0.5)" in repr(uwo)


def test_ensemble_errors():
    with pytest.raises(ArgumentError, match="Did you mean 'uwo'"):
        ensemble(["a", "b"], "uwoo")
    with pytest.raises(ArgumentError, match="Did you mean 'worst'"):
        ensemble(["a", "b"], "worts")
    with pytest.raises(ArgumentError, match="at least 2 members"):
        ensemble(["a"])
    with pytest.raises(ArgumentError, match="lam"):
        ensemble(["a", "b"], "uwo", lam=-1)
    frame = pool_frame([1.0, 2.0], [0.0, 1.0]).assign(b=[0.0, 1.0])
    with pytest.raises(DataError, match="ensemble member 1.*'bb'"):
        best_of_n(frame, proxy=ensemble(["proxy", "bb"]), gold="gold")


# --------------------------------------------------------------------------------------------------
# best_of_n errors, raised before any scoring
# --------------------------------------------------------------------------------------------------
def test_best_of_n_errors():
    frame = pd.concat([pool_frame(np.arange(8.0), np.arange(8.0), prompt="big pool"),
                       pool_frame(np.arange(3.0), np.arange(3.0), prompt="a small pool")], ignore_index=True)
    with pytest.raises(ArgumentError, match=r"n=4 .*'a small pool'.* 3 samples"):
        best_of_n(frame, proxy="proxy", gold="gold", n_values=[1, 4])
    with pytest.raises(DataError, match="Did you mean 'proxy'"):
        best_of_n(frame, proxy="proxi", gold="gold")
    with pytest.raises(DataError, match="no column 'prompt'"):
        best_of_n(frame.drop(columns="prompt"), proxy="proxy", gold="gold")
    with pytest.raises(DataError, match="no column 'completion'"):
        best_of_n(frame.drop(columns="completion"), proxy="proxy", gold=lambda texts: [0.0] * len(texts))
    nan = frame.assign(gold=frame.gold.where(frame.index != 5))
    with pytest.raises(DataError, match="non-finite.*row 5"):
        best_of_n(nan, proxy="proxy", gold="gold", n_values=[1])
    with pytest.raises(DataError, match="non-finite"):
        best_of_n(frame, proxy=lambda texts: [float("nan")] * len(texts), gold="gold", n_values=[1])
    with pytest.raises(DataError, match="returned 2 scores for 11"):
        best_of_n(frame, proxy=lambda texts: [0.0, 1.0], gold="gold", n_values=[1])
    with pytest.raises(ArgumentError, match="compare several proxies"):
        best_of_n(frame, proxy="proxy", gold=["gold", "proxy"])
    with pytest.raises(ArgumentError, match="positive integers"):
        best_of_n(frame, proxy="proxy", gold="gold", n_values=[0, 2])
    with pytest.raises(ArgumentError, match="call_with"):
        best_of_n(frame, proxy=lambda a, b, c: a, gold="gold")
    with pytest.raises(ArgumentError, match="Did you mean 'label'"):
        best_of_n(frame, proxy="proxy", gold="gold", lable=0)
    calls = []
    with pytest.raises(DataError, match="no column 'gld'"):  # the proxy callable never ran
        best_of_n(frame, proxy=lambda texts: calls.append(1) or [0.0] * len(texts), gold="gld")
    assert not calls


# --------------------------------------------------------------------------------------------------
# fits
# --------------------------------------------------------------------------------------------------
def synthetic(form, alpha, beta, offset=0.0, noise=0.0, seed=0, points=25, d_max=3.0):
    d = np.linspace(0.0, d_max, points)
    rel = d * (alpha - beta * d) if form == "bon" else np.where(d > 0, d * (alpha - beta * np.log(np.where(d > 0, d, 1))), 0)
    y = offset + rel + np.random.default_rng(seed).normal(0, noise, points) * (d > 0)
    return pd.DataFrame({"kl": d**2, "gold": y})


@pytest.mark.parametrize("form,alpha,beta,d_max", [("bon", 1.5, 0.4, 3.0), ("rl", 1.0, 0.5, 6.0)])
def test_fit_recovers_known_parameters_with_bootstrap_coverage(form, alpha, beta, d_max):
    frame = synthetic(form, alpha, beta, offset=2.0, noise=0.03, seed=1, d_max=d_max)
    fit = fit_overoptimization(frame, form, bootstrap=500, seed=0)
    assert fit.offset == 2.0 and fit.n_points == 24
    assert fit.alpha == pytest.approx(alpha, abs=0.05) and fit.beta == pytest.approx(beta, abs=0.05)
    assert fit.alpha_ci[0] < alpha < fit.alpha_ci[1] and fit.beta_ci[0] < beta < fit.beta_ci[1]
    assert fit.alpha_ci[1] - fit.alpha_ci[0] < 0.2
    true_d = alpha / (2 * beta) if form == "bon" else math.exp(alpha / beta - 1)
    assert fit.peak_kl_ci[0] < true_d**2 < fit.peak_kl_ci[1]
    # the same nonlinear least squares by scipy (a test-only dependency)
    from scipy.optimize import curve_fit

    pts = frame[frame.kl > 0]
    d = np.sqrt(pts.kl.to_numpy())
    model = (lambda d, a, b: d * (a - b * d)) if form == "bon" else (lambda d, a, b: d * (a - b * np.log(d)))
    (a, b), _ = curve_fit(model, d, pts.gold.to_numpy() - 2.0, p0=[1, 1])
    assert fit.alpha == pytest.approx(a, rel=1e-6) and fit.beta == pytest.approx(b, rel=1e-6)
    # r2 by hand
    resid = pts.gold.to_numpy() - 2.0 - model(d, fit.alpha, fit.beta)
    rel = pts.gold.to_numpy() - 2.0
    assert fit.r2 == pytest.approx(1 - (resid**2).sum() / ((rel - rel.mean()) ** 2).sum(), rel=1e-10)
    np.testing.assert_allclose(fit(pts.kl), 2.0 + model(d, fit.alpha, fit.beta), rtol=1e-12)
    lo, hi = fit.band(pts.kl)
    assert np.all(lo <= fit(pts.kl) + 1e-9) and np.all(fit(pts.kl) <= hi + 1e-9)
    table = fit.to_frame()
    assert list(table.parameter) == ["alpha", "beta", "peak_kl", "peak_gold", "r2", "offset"]
    assert "alpha" in repr(fit) and form in repr(fit)


def test_peak_formulas_on_exact_curves():
    bon = fit_overoptimization(synthetic("bon", 1.2, 0.5, offset=1.0), "bon", bootstrap=0)
    assert (bon.alpha, bon.beta) == (pytest.approx(1.2), pytest.approx(0.5))
    assert bon.peak_kl == pytest.approx((1.2 / (2 * 0.5)) ** 2)
    assert bon.peak_gold == pytest.approx(1.0 + 1.2**2 / (4 * 0.5))
    assert bon.r2 == pytest.approx(1.0) and np.isnan(bon.alpha_ci).all()
    rl = fit_overoptimization(synthetic("rl", 1.0, 0.5, d_max=6.0), "rl", relative=False, bootstrap=0)
    d_star = math.exp(1.0 / 0.5 - 1)
    assert rl.peak_kl == pytest.approx(d_star**2) and rl.peak_gold == pytest.approx(0.5 * d_star)
    assert rl.offset == 0.0 and rl.n_points == 25
    assert rl(0.0) == pytest.approx(0.0)
    # no peak when beta <= 0: the gold keeps rising
    rising = fit_overoptimization(synthetic("bon", 1.0, -0.2), "bon", bootstrap=50)
    assert rising.beta < 0 and math.isinf(rising.peak_kl) and math.isnan(rising.peak_gold)
    assert any("no peak" in note for note in rising.notes)


def test_fit_offsets():
    frame = synthetic("bon", 1.0, 0.3, offset=5.0)
    assert fit_overoptimization(frame, bootstrap=0).offset == 5.0
    no_start = frame[frame.kl > 0]
    with pytest.raises(DataError, match="offset="):
        fit_overoptimization(no_start)
    given = fit_overoptimization(no_start, offset=5.0, bootstrap=0)
    assert given.alpha == pytest.approx(1.0) and given.peak_gold == pytest.approx(5.0 + 1.0 / (4 * 0.3))


def test_fit_errors():
    frame = synthetic("bon", 1.0, 0.3)
    with pytest.raises(ArgumentError, match="Did you mean 'bon'"):
        fit_overoptimization(frame, "bno")
    with pytest.raises(DataError, match="at least 2 points"):
        fit_overoptimization(frame.iloc[:2])  # KL = 0 (the offset) and one point
    with pytest.raises(DataError, match="Did you mean 'gold'"):
        fit_overoptimization(frame, y="gld")
    with pytest.raises(DataError, match="NaN"):
        fit_overoptimization(frame.assign(gold=frame.gold.where(frame.index != 3)))
    with pytest.raises(DataError, match="negative KL"):
        fit_overoptimization(frame.assign(kl=frame.kl - 0.01))
    with pytest.raises(DataError, match="fit one at a time"):
        fit_overoptimization(pd.concat([frame.assign(proxy_name="a"), frame.assign(proxy_name="b")]))
    with pytest.raises(ArgumentError, match="bootstrap"):
        fit_overoptimization(frame, bootstrap=-1)


# --------------------------------------------------------------------------------------------------
# fit intervals: prompts are the sampling unit
# --------------------------------------------------------------------------------------------------
WORLD_NS = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32]


def hump_world(prompts, seed, pool=32):
    """Best-of-n pools with a known population curve. Per prompt p: a shift a_p ~ N(0, 1) and a scale
    c_p ~ U(0, 2); per sample: proxy u ~ U(0, 1), gold = a_p + c_p (4u - 3u^2) + N(0, 1) noise."""
    rng = np.random.default_rng(seed)
    u = rng.uniform(size=(prompts, pool))
    shift, scale = rng.normal(size=(prompts, 1)), rng.uniform(0, 2, size=(prompts, 1))
    gold = shift + scale * (4 * u - 3 * u**2) + rng.normal(0, 1, size=(prompts, pool))
    names = np.repeat([f"prompt {k:04d}" for k in range(prompts)], pool)
    return pd.DataFrame({"prompt": names, "completion": "c", "proxy": u.ravel(), "gold": gold.ravel()})


def hump_world_parameters():
    """alpha, beta of the least-squares fit to the population curve: the best of n uniforms is
    Beta(n, 1), so E[4M - 3M^2] = 4n/(n+1) - 3n/(n+2) (times E[c_p] = 1, plus E[a_p] = 0)."""
    n = np.asarray(WORLD_NS, dtype=float)
    curve = 4 * n / (n + 1) - 3 * n / (n + 2)
    d = np.sqrt(np.log(n) - (n - 1) / n)
    (a, minus_b), *_ = np.linalg.lstsq(np.stack([d, d * d], axis=1)[1:], curve[1:] - curve[0], rcond=None)
    return a, -minus_b


def test_prompt_bootstrap_covers_the_population_parameters():
    """90% intervals from 40 prompts x 32 samples, over 200 independent worlds, contain the
    population's alpha and beta about 90% of the time (measured: 0.875 and 0.89). Resampling the
    curve's 9 points instead covered them 0.39 of the time: those intervals measure how far the
    points lie from the form, not how the curve varies from one pool to another."""
    alpha, beta = hump_world_parameters()
    hits = {"prompts": [], "points": []}
    for seed in range(200):
        curve = best_of_n(hump_world(40, seed), proxy="proxy", gold="gold", n_values=WORLD_NS, progress=False)
        for resample in hits:
            fit = fit_overoptimization(curve, bootstrap=200, level=0.9, seed=seed, resample=resample)
            hits[resample].append((fit.alpha_ci[0] < alpha < fit.alpha_ci[1], fit.beta_ci[0] < beta < fit.beta_ci[1]))
    prompts, points = np.mean(hits["prompts"], axis=0), np.mean(hits["points"], axis=0)
    assert np.all((0.8 <= prompts) & (prompts <= 0.97)), prompts
    assert np.all(points < 0.5), points


def test_prompt_bootstrap_intervals_shrink_with_the_number_of_prompts():
    """16 times the prompts: intervals about 4 times narrower, as 1 / sqrt(prompts) (measured 3.9).
    The points' spread around the form does not shrink with the pool, and neither do intervals that
    resample the points (measured 0.72: wider with more prompts)."""
    widths = {}
    for prompts in (40, 640):
        for resample in ("prompts", "points"):
            runs = []
            for seed in range(12):
                curve = best_of_n(hump_world(prompts, 100 + seed), proxy="proxy", gold="gold", n_values=WORLD_NS,
                                  progress=False)
                fit = fit_overoptimization(curve, bootstrap=200, seed=seed, resample=resample)
                runs.append(fit.alpha_ci[1] - fit.alpha_ci[0])
            widths[prompts, resample] = np.median(runs)
    assert 3.0 < widths[40, "prompts"] / widths[640, "prompts"] < 5.5, widths
    assert widths[40, "points"] / widths[640, "points"] < 2.0, widths


def test_each_prompt_draw_is_best_of_n_on_the_resampled_pool():
    """The documented draw (default_rng(seed).integers(0, prompts, (draws, prompts))), done by hand:
    the drawn prompts' pools stacked into one samples frame (a prompt drawn twice counts twice),
    best_of_n on it, the offset its n = 1 gold, a fit without bootstrap."""
    pool = hump_world(12, seed=5, pool=16)
    ns = [1, 2, 4, 8, 16]
    curve = best_of_n(pool, proxy="proxy", gold="gold", n_values=ns)
    fit = fit_overoptimization(curve, bootstrap=5, seed=3)
    assert fit.resampled == "prompts" and fit.prompts == 12
    names = sorted(pool.prompt.unique())
    draws = np.random.default_rng(3).integers(0, 12, size=(5, 12))
    for k, draw in enumerate(draws):
        resampled = pd.concat(
            [pool[pool.prompt == names[p]].assign(prompt=f"draw {j}") for j, p in enumerate(draw)], ignore_index=True
        )
        again = best_of_n(resampled, proxy="proxy", gold="gold", n_values=ns)
        refit = fit_overoptimization(again[["n", "kl", "gold"]], bootstrap=0)
        assert fit.boot_alpha[k] == pytest.approx(refit.alpha, rel=1e-9)
        assert fit.boot_beta[k] == pytest.approx(refit.beta, rel=1e-9)
        assert fit.boot_offset[k] == pytest.approx(again.gold.iloc[0], rel=1e-12)
    # a curve without its per-prompt values can only resample its points, and says what that means
    typed = fit_overoptimization(curve[["n", "kl", "gold"]], bootstrap=50)
    assert typed.resampled == "points" and any("lack of fit" in note for note in typed.notes)
    assert "resamples of 12 prompts" in repr(fit) and "resamples of the points" in repr(typed)


def test_prompt_bootstrap_errors():
    curve = best_of_n(hump_world(6, seed=1, pool=8), proxy="proxy", gold="gold", n_values=[1, 2, 4, 8])
    with pytest.raises(ArgumentError, match="Did you mean 'prompts'"):
        fit_overoptimization(curve, resample="prompt")
    with pytest.raises(DataError, match="needs the per-prompt values of 'gold'"):
        fit_overoptimization(curve.drop(columns="gold_by_prompt"), resample="prompts")
    with pytest.raises(DataError, match="belong to another curve"):
        fit_overoptimization(curve.assign(gold=curve.gold + 1.0))
    shorter = curve.assign(gold_by_prompt=[v[:5] if k == 2 else v for k, v in enumerate(curve.gold_by_prompt)])
    with pytest.raises(DataError, match="different pools"):
        fit_overoptimization(shorter)
    with pytest.raises(DataError, match="parquet"):
        fit_overoptimization(curve.assign(gold_by_prompt=curve.gold_by_prompt.map(str)))
    single = best_of_n(hump_world(1, seed=1, pool=8), proxy="proxy", gold="gold", n_values=[1, 2, 4, 8])
    alone = fit_overoptimization(single, bootstrap=20)
    assert np.isnan(alone.alpha_ci).all() and any("one prompt" in note for note in alone.notes)


# --------------------------------------------------------------------------------------------------
# the toy world's shipped best-of-n pool
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def toy_pool():
    path = default_dir() / "bon_pool.parquet"
    if not path.exists():
        pytest.fail("the shipped toy world data/toy/bon_pool.parquet is missing")
    return pd.read_parquet(path)


NS = [1, 2, 4, 8, 16, 32, 64, 128, 256]


def readme_bon_table() -> dict[str, list[str]]:
    """The README's best-of-n table as printed: row name -> the cells (strings, to keep their precision)."""
    lines = (Path(__file__).resolve().parents[1] / "README.md").read_text().splitlines()
    head = next(k for k, line in enumerate(lines) if line.startswith("| n | 1 | 2 | 4 |"))
    rows = {}
    for line in [lines[head]] + lines[head + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def test_toy_world_curve_is_the_readme_table(toy_pool):
    curve = best_of_n(toy_pool, proxy="proxy", gold="gold", n_values=NS, values=["words"])
    # each README value is the computed one at its printed precision: within half a unit of its last digit
    table = readme_bon_table()
    assert [int(n) for n in table["n"]] == NS
    for column in ("proxy", "gold", "words"):
        printed = table[column]
        assert len(printed) == len(NS), column
        for n, cell, value in zip(NS, printed, curve[column]):
            half_unit = 0.5 * 10.0 ** -len(cell.partition(".")[2])
            assert abs(value - float(cell)) <= half_unit + 1e-12, f"README {column} at n = {n}: {cell}, computed {value:.6f}"
    assert np.all(np.diff(curve.proxy) > 0)
    assert curve.n[curve.gold.idxmax()] in (4, 8)
    # the manifest's curve (written by the build through the same estimator) is reproduced to float64
    # rounding: the order of the floating-point sums, and so the last bits, may differ between machines
    manifest = json.loads((default_dir() / "manifest.json").read_text())["metrics"]["best_of_n"]
    pd.testing.assert_frame_equal(curve[["n", "kl", "proxy", "gold", "words"]], pd.DataFrame(manifest),
                                  check_exact=False, rtol=1e-12, atol=1e-12)
    # gold recomputed from the texts by the world's gold reward, as a callable: the same curve
    again = best_of_n(toy_pool, proxy="proxy", gold=language.gold_reward, n_values=NS)
    np.testing.assert_array_equal(again.gold, curve.gold)
    assert (curve.gold_se > 0).all() and curve.gold_se.iloc[-1] > curve.gold_se.iloc[0]


def test_toy_world_fit(toy_pool):
    curve = best_of_n(toy_pool, proxy="proxy", gold="gold", n_values=NS)
    fit = fit_overoptimization(curve, "bon", bootstrap=1000, seed=0)
    assert fit.r2 > 0.95
    assert fit.offset == pytest.approx(curve.gold.iloc[0])
    # the fitted peak lies between n = 2 and n = 16, like the measured one
    assert curve.kl.iloc[1] < fit.peak_kl < curve.kl.iloc[4]
    assert 2.9 < fit.peak_gold < 3.4 and fit.peak_kl_ci[0] < fit.peak_kl < fit.peak_kl_ci[1]
    assert 0 < fit.beta_ci[0] and fit.alpha_ci[0] > 0
