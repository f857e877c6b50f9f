"""Figures of implicit rewards, asserted on the data behind them (traces, values, escaped text)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import rmlab
from rmlab import plots


def _tokens(n_chosen: int, n_rejected: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for side, n in (("chosen", n_chosen), ("rejected", n_rejected)):
        for t in range(n):
            logp, ref = -rng.uniform(0, 5), -rng.uniform(0, 5)
            rows.append({"pair": 0, "side": side, "position": t, "token_id": t, "token": f"w{t}",
                         "logp": logp, "ref_logp": ref, "reward": 0.1 * (logp - ref)})
    frame = pd.DataFrame(rows)
    frame["cum_reward"] = frame.groupby("side")["reward"].cumsum()
    return frame


def test_token_reward_text_puts_each_reward_in_reading_order_side_by_side():
    tokens = _tokens(30, 17)
    fig = plots.token_reward_text(tokens, 0, width=12)
    assert [t.type for t in fig.data] == ["heatmap", "heatmap"]
    for trace, side in zip(fig.data, ("chosen", "rejected")):
        part = tokens[tokens.side == side]
        z = np.asarray(trace.z, dtype=float).ravel()
        np.testing.assert_allclose(z[: len(part)], part["reward"].to_numpy())
        assert np.isnan(z[len(part):]).all()  # the rest of the last line is empty
        text = np.asarray(trace.text, dtype=object).ravel()
        assert list(text[: len(part)]) == part["token"].tolist()
        # diverging colours centred at zero, symmetric
        assert trace.zmid == 0 and trace.zmin == -trace.zmax
    bound = tokens["reward"].abs().max()
    assert fig.data[0].zmax == pytest.approx(bound)
    hover = np.asarray(fig.data[0].customdata, dtype=object).ravel()[0]
    assert "logp = " in hover and "ref_logp = " in hover and "reward = " in hover
    total = tokens[tokens.side == "chosen"]["reward"].sum()
    assert f"chosen: {total:+.3f}" in fig.layout.title.text


def test_token_reward_text_escapes_markup_and_shows_whitespace():
    tokens = _tokens(3, 2)
    tokens.loc[0, "token"] = "<script>alert(1)</script>"
    tokens.loc[1, "token"] = " a&b\n"
    fig = plots.token_reward_text(tokens, 0)
    text = list(np.asarray(fig.data[0].text, dtype=object).ravel())
    assert text[0] == "&lt;script&gt;alert(1)&lt;/script&gt;"
    assert text[1] == "·a&amp;b⏎"
    assert "<script>" not in fig.to_json()


def test_long_responses_are_paged_not_drawn_whole():
    tokens = _tokens(5000, 40)
    fig = plots.token_reward_text(tokens, 0, max_tokens=600)
    drawn = np.isfinite(np.asarray(fig.data[0].z, dtype=float)).sum()
    assert drawn == 600 and "tokens 0-599 of 5000" in fig.layout.title.text
    page = plots.token_reward_text(tokens, 0, max_tokens=600, start=4800)
    z = np.asarray(page.data[0].z, dtype=float).ravel()
    chosen = tokens[tokens.side == "chosen"]["reward"].to_numpy()
    np.testing.assert_allclose(z[:200], chosen[4800:])
    assert "tokens 4800-4999 of 5000" in page.layout.title.text
    assert page.layout.height < 2000  # 200 tokens: a short figure
    with pytest.raises(rmlab.DataError, match="start=-1"):
        plots.token_reward_text(tokens, 0, start=-1)


def test_token_reward_text_names_a_missing_pair():
    with pytest.raises(rmlab.DataError, match="pair=7 is not in the frame"):
        plots.token_reward_text(_tokens(3, 3), 7)


def test_reward_margins_one_histogram_per_group_with_its_accuracy():
    frame = pd.DataFrame({"margin": [1.0, -0.5, 2.0, 0.3, -1.0, 0.0], "beta": [0.1, 0.1, 0.1, 0.5, 0.5, 0.5]})
    fig = plots.reward_margins(frame, by="beta")
    assert [t.type for t in fig.data] == ["histogram", "histogram"]
    np.testing.assert_allclose(fig.data[0].x, [1.0, -0.5, 2.0])
    assert "accuracy 67%" in fig.data[0].name and "accuracy 33%" in fig.data[1].name  # margin 0 is not correct


def test_predicted_changes_splits_pairs_by_the_sign_of_the_chosen_change():
    frame = pd.DataFrame({
        "pair": [0, 1, 2], "pred_delta_chosen": [0.2, -0.1, 0.05], "pred_delta_rejected": [-0.3, -0.4, -0.1],
        "chosen_falls": [False, True, False],
    })
    frame.attrs.update(lr=1e-3, beta=0.1)
    fig = plots.predicted_changes(frame)
    rises, falls = fig.data[0], fig.data[1]
    assert list(rises.customdata) == [0, 2] and list(falls.customdata) == [1]
    np.testing.assert_allclose(falls.y, [-0.1])
    assert "lr=0.001" in fig.layout.title.text and "33%" in fig.layout.title.text


def test_overoptimization_curve_axis_choice():
    frame = pd.DataFrame({"n": [1, 2, 4], "kl": [0.0, 0.19, 0.64], "proxy": [0.0, 0.5, 0.9], "gold": [0.0, 0.3, 0.2]})
    sqrt_fig = plots.overoptimization_curve(frame)
    kl_fig = plots.overoptimization_curve(frame, x_axis="kl")
    np.testing.assert_allclose(sqrt_fig.data[0].x, np.sqrt(frame["kl"]))
    np.testing.assert_allclose(kl_fig.data[0].x, frame["kl"])
    with pytest.raises(rmlab.ArgumentError, match="x_axis='log'"):
        plots.overoptimization_curve(frame, x_axis="log")
