"""Overoptimization figures: asserted on the data behind the traces."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from rmlab import plots
from rmlab.diagnostics.overoptimization import best_of_n, ensemble
from rmlab.diagnostics.scaling_laws import fit_overoptimization
from rmlab.errors import ArgumentError, DataError
from rmlab.toy.world import default_dir


@pytest.fixture(scope="module")
def pool():
    rng = np.random.default_rng(0)
    rows = []
    for p in range(6):
        a, b = rng.normal(size=64), rng.normal(size=64)
        gold = a - 0.3 * a**2 + 0.5 * rng.normal(size=64)
        rows.append(pd.DataFrame({"prompt": f"p{p}", "completion": "x", "rm0": a + 0.2 * b, "rm1": a - 0.2 * b,
                                  "gold": gold}))
    return pd.concat(rows, ignore_index=True)


def test_manifest_curve_as_the_cli_draws_it():
    curve = pd.DataFrame(json.loads((default_dir() / "manifest.json").read_text())["metrics"]["best_of_n"])
    fig = plots.overoptimization_curve(curve)
    assert [t.name for t in fig.data] == ["proxy", "gold"]
    np.testing.assert_allclose(fig.data[1].x, np.sqrt(curve.kl))
    np.testing.assert_allclose(fig.data[1].y, curve.gold)
    assert fig.data[1].hovertext[0] == "n = 1"
    assert "upper bound" in fig.layout.xaxis.title.text
    assert any("Beirami" in a.text for a in fig.layout.annotations)


def test_error_bars_from_standard_errors(pool):
    curve = best_of_n(pool, proxy="rm0", gold="gold", n_values=[1, 2, 4, 8, 16])
    fig = plots.overoptimization_curve(curve)
    proxy, gold = fig.data
    np.testing.assert_allclose(gold.error_y.array, curve.gold_se)
    np.testing.assert_allclose(proxy.error_y.array, curve.proxy_se)
    only_gold = plots.overoptimization_curve(curve, show_proxy=False)
    assert [t.name for t in only_gold.data] == ["gold"]


def test_several_proxies_are_separate_toggleable_traces(pool):
    curve = best_of_n(pool, proxy={"rm0": "rm0", "rm1": "rm1", "mean": ensemble(["rm0", "rm1"])}, gold="gold",
                      n_values=[1, 4, 16])
    fig = plots.overoptimization_curve(curve)
    assert len(fig.data) == 6
    names = [t.name for t in fig.data]
    assert names == ["proxy (rm0)", "gold (rm0)", "proxy (rm1)", "gold (rm1)", "proxy (mean)", "gold (mean)"]
    for k, name in enumerate(["rm0", "rm1", "mean"]):
        proxy, gold = fig.data[2 * k], fig.data[2 * k + 1]
        assert proxy.legendgroup == gold.legendgroup == name
        assert proxy.line.color == gold.line.color and proxy.line.dash == "dash"
        np.testing.assert_allclose(gold.y, curve[curve.proxy_name == name].gold)
    assert len({fig.data[2 * k].line.color for k in range(3)}) == 3


def test_fit_curve_band_and_peak(pool):
    curve = best_of_n(pool, proxy="rm0", gold="gold", n_values=[1, 2, 4, 8, 16, 32, 64])
    fit = fit_overoptimization(curve, "bon", bootstrap=200)
    fig = plots.overoptimization_curve(curve, fit=fit, points=50)
    upper, lower, line = fig.data[2], fig.data[3], fig.data[4]
    kl = np.linspace(0, curve.kl.max(), 50)
    np.testing.assert_allclose(line.x, np.sqrt(kl))
    np.testing.assert_allclose(line.y, fit.predict(kl))
    lo, hi = fit.band(kl)
    np.testing.assert_allclose(lower.y, lo)
    np.testing.assert_allclose(upper.y, hi)
    assert lower.fill == "tonexty"
    assert "bon fit" in line.name and "alpha=" in line.name
    if np.isfinite(fit.peak_kl) and fit.peak_kl <= 1.5 * curve.kl.max():
        peak = fig.data[5]
        assert peak.x[0] == pytest.approx(np.sqrt(fit.peak_kl)) and peak.y[0] == pytest.approx(fit.peak_gold)
    # several fits, one per proxy, take their proxy's colour and legend group
    both = best_of_n(pool, proxy=["rm0", "rm1"], gold="gold", n_values=[1, 2, 4, 8, 16, 32, 64])
    fits = [fit_overoptimization(both[both.proxy_name == p], bootstrap=0) for p in ["rm0", "rm1"]]
    fig = plots.overoptimization_curve(both, fit=fits)
    lines = [t for t in fig.data if t.name and t.name.startswith("bon fit")]
    assert len(lines) == 2 and lines[1].legendgroup == "rm1"
    assert lines[1].line.color == [t for t in fig.data if t.name == "gold (rm1)"][0].line.color


def test_bad_inputs():
    with pytest.raises(DataError, match="lacks the columns"):
        plots.overoptimization_curve(pd.DataFrame({"kl": [0.0], "gold": [1.0]}))
    frame = pd.DataFrame({"kl": [0.0, 1.0], "proxy": [0.0, 1.0], "gold": [0.0, 0.5]})
    with pytest.raises(ArgumentError, match="fit_overoptimization"):
        plots.overoptimization_curve(frame, fit="not a fit")


def test_checkpoint_curves_one_gold_and_one_proxy_line_per_beta():
    frame = pd.DataFrame(
        {
            "checkpoint": ["a", "b", "c", "d"],
            "beta": [0.1, 0.1, 0.5, 0.5],
            "step": [100, 50, 50, 100],
            "kl": [4.0, 1.0, 0.25, 0.0],
            "gold": [1.0, 2.0, 3.0, 4.0],
            "gold_se": [0.1] * 4,
            "proxy": [5.0, 6.0, 7.0, 8.0],
        }
    )
    fig = plots.checkpoint_curves(frame)
    assert [t.name for t in fig.data] == ["gold, beta=0.1", "proxy, beta=0.1", "gold, beta=0.5", "proxy, beta=0.5"]
    gold_01 = fig.data[0]
    assert list(gold_01.x) == [1.0, 2.0] and list(gold_01.y) == [2.0, 1.0]  # sorted by step: 50 then 100
    assert list(gold_01.text) == ["50", "100"] and list(gold_01.error_y.array) == [0.1, 0.1]
    assert fig.data[1].error_y.array is None
    with pytest.raises(DataError, match="rmlab.checkpoint_curve"):
        plots.checkpoint_curves(frame.drop(columns="gold"))
