"""reward_model_report against hand-worked calibration bins, known correlations and brute-force ranks."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest

import rmlab
from rmlab.diagnostics import RewardModelReport, reward_model_report
from rmlab.stats import kendall_tau_b as _kendall_tau_b, spearman as _spearman
from rmlab.errors import ArgumentError, DataError
from rmlab.toy import tiny_reward_model, tiny_tokenizer
from tests.conftest import make_pairs


def logit(p):
    return math.log(p / (1 - p))


def scores_frame(margins, tokens_chosen=None, tokens_rejected=None, **extra):
    """A frame shaped like rmlab.reward_scores output, built by hand."""
    margins = np.asarray(margins, dtype=float)
    n = len(margins)
    frame = pd.DataFrame(
        {
            "pair": np.arange(n),
            "score_chosen": margins / 2,
            "score_rejected": -margins / 2,
            "margin": margins,
            "correct": margins > 0,
            "prob_chosen": 1 / (1 + np.exp(-margins)),
            "tokens_chosen": tokens_chosen if tokens_chosen is not None else np.full(n, 5),
            "tokens_rejected": tokens_rejected if tokens_rejected is not None else np.full(n, 5),
            "truncated": False,
        }
    )
    for key, value in extra.items():
        frame[key] = value
    return frame


# (confidence of the side the model prefers, whether it prefers the labelled chosen)
HAND = [
    (0.55, True), (0.55, False), (0.50, False),  # bin [0.5, 0.6): the margin-0 pair is a miss
    (0.65, True), (0.65, True),                  # bin [0.6, 0.7)
    (0.75, True), (0.75, False),                 # bin [0.7, 0.8)
    # bin [0.8, 0.9) stays empty
    (0.95, True), (0.95, True), (0.95, True), (0.99, True),  # bin [0.9, 1.0]
]


def hand_margins():
    return [0.0 if c == 0.5 else (logit(c) if hit else -logit(c)) for c, hit in HAND]


def test_calibration_and_ece_by_hand():
    report = reward_model_report(scores_frame(hand_margins()), bins=5)
    cal = report.calibration
    assert list(cal["bin_lower"]) == pytest.approx([0.5, 0.6, 0.7, 0.8, 0.9])
    assert list(cal["bin_upper"]) == pytest.approx([0.6, 0.7, 0.8, 0.9, 1.0])
    assert list(cal["count"]) == [3, 2, 2, 0, 4]
    np.testing.assert_allclose(cal["mean_confidence"].iloc[[0, 1, 2, 4]], [1.6 / 3, 0.65, 0.75, 0.96])
    np.testing.assert_allclose(cal["observed_accuracy"].iloc[[0, 1, 2, 4]], [1 / 3, 1.0, 0.5, 1.0])
    assert np.isnan(cal["mean_confidence"].iloc[3]) and np.isnan(cal["observed_accuracy"].iloc[3])
    # ECE = sum_b n_b/N |acc_b - conf_b| = (3*0.2 + 2*0.35 + 2*0.25 + 4*0.04) / 11
    assert report.summary["ece"] == pytest.approx(1.96 / 11, abs=1e-12)
    # 95% Wilson intervals: 1/3 -> [0.0615, 0.7923], 2/2 -> [0.3424, 1], 4/4 -> [0.5101, 1]
    assert cal["accuracy_lower"].iloc[0] == pytest.approx(0.0615, abs=1e-4)
    assert cal["accuracy_upper"].iloc[0] == pytest.approx(0.7923, abs=1e-4)
    assert cal["accuracy_lower"].iloc[1] == pytest.approx(0.3424, abs=1e-4)
    assert cal["accuracy_upper"].iloc[1] == pytest.approx(1.0)
    assert cal["accuracy_lower"].iloc[4] == pytest.approx(0.5101, abs=1e-4)
    # accuracy counts the tie as wrong; Brier on the folded confidence equals (1 - p_chosen)^2
    assert report.summary["accuracy"] == pytest.approx(8 / 11)
    brier = np.mean([(c - hit) ** 2 for c, hit in HAND])
    assert report.summary["brier"] == pytest.approx(brier)
    assert report.summary["pairs"] == 11
    assert "true_prob_mae" not in report.summary.index
    assert "mean_true_prob_of_preferred" not in cal.columns


def test_true_probability_columns_by_hand():
    margins = [logit(0.8), -logit(0.7), 0.0, logit(0.9)]
    true_prob = [0.6, 0.2, 0.3, 1.0]
    report = reward_model_report(scores_frame(margins, true_prob=true_prob), bins=2)
    cal = report.calibration  # bins [0.5, 0.75) and [0.75, 1]
    assert list(cal["count"]) == [2, 2]
    # bin 0: the 0.7 pair prefers rejected (true prob 1 - 0.2 = 0.8), the tie counts as rejected (0.7)
    # bin 1: 0.8 and 0.9 both prefer chosen (0.6 and 1.0)
    np.testing.assert_allclose(cal["mean_true_prob_of_preferred"], [(0.8 + 0.7) / 2, (0.6 + 1.0) / 2])
    gap = np.mean(np.abs(np.array([0.8, 0.3, 0.5, 0.9]) - np.array(true_prob)))
    assert report.summary["true_prob_mae"] == pytest.approx(gap)


def test_bad_true_probability_names_the_row():
    with pytest.raises(DataError, match="Row 1, column 'true_prob'"):
        reward_model_report(scores_frame([1.0, 2.0], true_prob=[0.5, 1.5]))


def test_length_bias_by_hand():
    # (tokens_chosen, tokens_rejected, margin)
    rows = [
        (10, 5, 1.0), (8, 4, 2.0), (6, 3, -1.0),  # chosen longer: 2/3 right, 2/3 prefer longer
        (4, 9, -1.0), (5, 7, 0.5),                # rejected longer: 1/2 right, 1/2 prefer longer
        (5, 5, 1.0), (6, 6, 0.0),                 # same length: 1/2 right (a tie is wrong)
    ]
    tc, tr, m = (np.array(c, dtype=float) for c in zip(*rows))
    frame = scores_frame(m, tc, tr)
    frame["score_chosen"] = [3.0, 1.0, 0.5, 0.0, 2.0, 1.5, -1.0]
    frame["score_rejected"] = frame["score_chosen"] - m
    lb = reward_model_report(frame).length_bias.set_index("slice")
    assert list(lb.index) == ["all", "chosen longer", "rejected longer", "same length"]
    assert list(lb["pairs"]) == [7, 3, 2, 2]
    np.testing.assert_allclose(lb["accuracy"], [4 / 7, 2 / 3, 1 / 2, 1 / 2])
    np.testing.assert_allclose(lb["prefers_longer"].iloc[:3], [3 / 5, 2 / 3, 1 / 2])
    assert np.isnan(lb.loc["same length", "prefers_longer"])
    pooled_scores = np.r_[frame["score_chosen"], frame["score_rejected"]]
    pooled_lengths = np.r_[tc, tr]
    assert lb.loc["all", "pearson_score_length"] == pytest.approx(np.corrcoef(pooled_scores, pooled_lengths)[0, 1])
    assert lb.loc["all", "pearson_margin_length_diff"] == pytest.approx(np.corrcoef(m, tc - tr)[0, 1])
    assert np.isnan(lb.loc["same length", "pearson_margin_length_diff"])  # constant length difference


def test_known_correlations():
    # x = 1..5, y = [2, 1, 4, 3, 5]: Pearson = Spearman = 8/10; Kendall = (8 - 2)/10 (two swapped pairs)
    x, y = np.arange(1.0, 6.0), np.array([2.0, 1.0, 4.0, 3.0, 5.0])
    frame = scores_frame(y, tokens_chosen=x + 10, tokens_rejected=np.full(5, 10.0))
    lb = reward_model_report(frame).length_bias.set_index("slice")
    assert lb.loc["all", "pearson_margin_length_diff"] == pytest.approx(0.8)
    assert lb.loc["all", "spearman_margin_length_diff"] == pytest.approx(0.8)
    implicit = scores_frame(x)
    agreement = reward_model_report(frame, implicit=implicit).agreement
    assert agreement["spearman"] == pytest.approx(0.8)
    assert agreement["kendall_tau_b"] == pytest.approx(0.6)


def test_length_in_words_and_chars():
    frame = scores_frame([1.0, -1.0, -2.0])
    frame["chosen"] = [" a b c", " a", " a b"]    # words 3, 1, 2; characters 6, 2, 4
    frame["rejected"] = [" a", " a b c d", " xyz"]  # words 1, 4, 1; characters 2, 8, 4
    words = reward_model_report(frame, length="words").length_bias.set_index("slice")
    assert list(words["pairs"]) == [3, 2, 1, 0]
    # pair 0 prefers the longer chosen, pair 1 the longer rejected, pair 2 the shorter rejected
    assert words.loc["all", "prefers_longer"] == pytest.approx(2 / 3)
    assert words.loc["all", "mean_length_diff"] == pytest.approx((2 - 3 + 1) / 3)
    chars = reward_model_report(frame, length="chars").length_bias.set_index("slice")
    assert list(chars["pairs"]) == [3, 1, 1, 1]
    assert chars.loc["all", "prefers_longer"] == pytest.approx(1.0)
    chat = frame.copy()
    chat["chosen"] = [[{"role": "assistant", "content": t}] for t in frame["chosen"]]
    chat["rejected"] = [[{"role": "assistant", "content": t}] for t in frame["rejected"]]
    same = reward_model_report(chat, length="words").length_bias
    pd.testing.assert_frame_equal(same, words.reset_index())


def brute_kendall_tau_b(x, y):
    concordant = discordant = tied_x = tied_y = 0
    for i, j in itertools.combinations(range(len(x)), 2):
        dx, dy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
        if dx == 0 and dy == 0:
            continue
        if dx == 0:
            tied_x += 1
        elif dy == 0:
            tied_y += 1
        elif dx == dy:
            concordant += 1
        else:
            discordant += 1
    return (concordant - discordant) / math.sqrt((concordant + discordant + tied_x) * (concordant + discordant + tied_y))


def brute_spearman(x, y):
    def ranks(v):  # average rank of each value: 1 + #smaller + (#equal - 1)/2
        return np.array([1 + np.sum(v < a) + (np.sum(v == a) - 1) / 2 for a in v])

    return np.corrcoef(ranks(x), ranks(y))[0, 1]


@pytest.mark.parametrize("n, decimals", [(7, 0), (60, 1), (250, 3)])
def test_agreement_against_brute_force_and_scipy(n, decimals):
    rng = np.random.default_rng(n)
    explicit = np.round(rng.normal(size=n), decimals)  # rounding makes ties
    implicit = np.round(0.6 * explicit + rng.normal(size=n), decimals)
    report = reward_model_report(scores_frame(explicit), implicit=scores_frame(implicit))
    agreement = report.agreement
    assert agreement["kendall_tau_b"] == pytest.approx(brute_kendall_tau_b(explicit, implicit), abs=1e-12)
    assert agreement["spearman"] == pytest.approx(brute_spearman(explicit, implicit), abs=1e-12)
    same_side = np.mean([(a > 0) == (b > 0) for a, b in zip(explicit, implicit)])
    assert agreement["sign_agreement"] == pytest.approx(same_side)
    assert agreement["accuracy_reward_model"] == pytest.approx(np.mean(explicit > 0))
    assert agreement["accuracy_implicit"] == pytest.approx(np.mean(implicit > 0))
    stats = pytest.importorskip("scipy.stats")
    assert agreement["kendall_tau_b"] == pytest.approx(stats.kendalltau(explicit, implicit).statistic, abs=1e-12)
    assert agreement["spearman"] == pytest.approx(stats.spearmanr(explicit, implicit).statistic, abs=1e-12)


def test_rank_correlations_on_large_inputs_with_ties():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 50, size=5000).astype(float)
    y = x + rng.integers(-30, 30, size=5000)
    assert _kendall_tau_b(x, y) == pytest.approx(stats.kendalltau(x, y).statistic, abs=1e-12)
    assert _spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    assert math.isnan(_kendall_tau_b(np.ones(5), np.arange(5.0)))


def test_agreement_needs_the_same_pairs():
    a = scores_frame([1.0, 2.0, 3.0], chosen=["x", "y", "z"])
    with pytest.raises(DataError, match="3 pairs but implicit has 2"):
        reward_model_report(a, implicit=scores_frame([1.0, 2.0]))
    with pytest.raises(DataError, match="Row 2, column 'chosen'"):
        reward_model_report(a, implicit=scores_frame([1.0, 2.0, 3.0], chosen=["x", "y", "w"]))
    with pytest.raises(DataError, match="implicit_rewards"):
        reward_model_report(a, implicit=pd.DataFrame({"x": [1, 2, 3]}))


def test_input_errors():
    with pytest.raises(DataError, match=r"lacks the column\(s\) \['margin'\].*reward_scores"):
        reward_model_report(pd.DataFrame({"score": [1.0]}))
    with pytest.raises(DataError, match="DataFrame"):
        reward_model_report([1.0, 2.0])
    with pytest.raises(DataError, match="no rows"):
        reward_model_report(scores_frame([]))
    with pytest.raises(ArgumentError, match="bins=0"):
        reward_model_report(scores_frame([1.0]), bins=0)
    with pytest.raises(ArgumentError, match="length='token'.*Did you mean 'tokens'"):
        reward_model_report(scores_frame([1.0]), length="token")
    with pytest.raises(DataError, match="length='words' needs"):
        reward_model_report(scores_frame([1.0]), length="words")
    no_sides = scores_frame([1.0]).drop(columns=["score_chosen", "score_rejected"])
    with pytest.raises(DataError, match="score_chosen"):
        reward_model_report(no_sides)


def test_on_real_reward_scores_and_implicit_rewards(policy, reference):
    tok = tiny_tokenizer()
    pairs = make_pairs(24, seed=4)
    scores = rmlab.reward_scores(tiny_reward_model(seed=3), pairs, tokenizer=tok, progress=False)
    implicit = rmlab.implicit_rewards(policy, reference, pairs, tokenizer=tok, progress=False)
    report = reward_model_report(scores, implicit=implicit, bins=4)
    assert isinstance(report, RewardModelReport)
    assert report.summary["pairs"] == 24 and report.calibration["count"].sum() == 24
    assert report.summary["accuracy"] == pytest.approx(scores["correct"].mean())
    assert report.agreement["accuracy_implicit"] == pytest.approx(implicit["correct"].mean())
    # an implicit_rewards frame is itself a Bradley-Terry scorer: it can be the report's subject
    own = reward_model_report(implicit)
    assert own.summary["accuracy"] == pytest.approx(implicit["correct"].mean())
    text, page = repr(report), report._repr_html_()
    for name in ("summary", "calibration", "length_bias", "agreement"):
        assert name in text and f"<h4>{name}</h4>" in page
