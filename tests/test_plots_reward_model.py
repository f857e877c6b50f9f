"""Reward-model figures: built from frames alone, with the numbers they are meant to show."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import rmlab
from rmlab import plots
from rmlab.errors import DataError


def scores_frame(n=40, seed=0):
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(
        {
            "pair": np.arange(n),
            "score_chosen": rng.normal(1, 1, n),
            "score_rejected": rng.normal(0, 1, n),
            "tokens_chosen": rng.integers(3, 30, n),
            "tokens_rejected": rng.integers(3, 30, n),
            "true_prob": rng.uniform(0.5, 1, n),
        }
    )
    frame["margin"] = frame["score_chosen"] - frame["score_rejected"]
    frame["correct"] = frame["margin"] > 0
    return frame


def test_calibration_diagram_draws_every_non_empty_bin_with_its_interval():
    report = rmlab.reward_model_report(scores_frame(), bins=5)
    fig = plots.calibration_diagram(report.calibration)
    points = fig.data[1]
    filled = report.calibration[report.calibration["count"] > 0]
    np.testing.assert_allclose(points.x, filled["mean_confidence"])
    np.testing.assert_allclose(points.y, filled["observed_accuracy"])
    np.testing.assert_allclose(np.asarray(points.y) + np.asarray(points.error_y.array), filled["accuracy_upper"])
    assert fig.data[2].name.startswith("true P")
    # the title's numbers come from the bins alone and equal the report's summary
    summary = report.summary
    assert f"accuracy {summary['accuracy']:.3f}, ECE {summary['ece']:.3f}" in fig.layout.title.text


def test_length_bias_splits_pairs_by_correctness():
    frame = scores_frame()
    fig = plots.length_bias(frame)
    right, wrong = fig.data
    assert len(right.x) == int(frame["correct"].sum()) and len(wrong.x) == int((~frame["correct"]).sum())
    expected = np.corrcoef(frame["tokens_chosen"] - frame["tokens_rejected"], frame["margin"])[0, 1]
    assert f"{expected:.2f}" in fig.layout.title.text


def test_preference_strength_map_marks_known_flips():
    frame = pd.DataFrame(
        {
            "pair": range(5),
            "strength_mean": [-2.0, -0.01, 1.0, 2.0, -1.5],
            "strength_std": [0.1, 0.2, 0.3, 0.1, 0.2],
            "likely_mislabelled": [True, False, False, False, True],
            "ambiguous": [False, True, False, False, False],
            "flipped": [True, False, False, False, False],
        }
    )
    fig = plots.preference_strength_map(frame)
    names = [t.name for t in fig.data]
    assert names == ["clear (2)", "ambiguous (1)", "likely mislabelled (2)", "flipped (1)"]
    assert list(fig.data[2].x) == [-2.0, -1.5]


def test_token_text_shows_dense_rewards_of_single_texts_escaped():
    tokens = pd.DataFrame(
        {
            "row": [0, 0, 0],
            "side": ["response"] * 3,
            "position": [0, 1, 2],
            "token": ["<b>", " bold", "&"],
            "prefix_score": [0.1, 0.3, 0.2],
            "reward": [0.1, 0.2, -0.1],
        }
    )
    fig = plots.token_reward_text(tokens, 0)
    shown = [t for t in np.asarray(fig.data[0].text).ravel() if t]
    assert shown == ["&lt;b&gt;", "·bold", "&amp;"]
    assert "row 0" in fig.layout.title.text
    with pytest.raises(DataError, match="row=3 is not in the frame"):
        plots.token_reward_text(tokens, 3)


def test_figures_name_the_frame_they_need():
    with pytest.raises(DataError, match="rmlab.reward_scores"):
        plots.length_bias(pd.DataFrame({"margin": [1.0]}))
    with pytest.raises(DataError, match="rmlab.preference_strength"):
        plots.preference_strength_map(pd.DataFrame({"strength_mean": [1.0]}))
