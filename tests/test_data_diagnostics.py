"""Preference strength and ranking accuracy: against numpy, brute force, hand-worked cases, the toy world."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

import rmlab
from rmlab.diagnostics import preference_strength, ranking_accuracy, ranking_summary
from rmlab.errors import ArgumentError, DataError, ModelError
from rmlab.io.pairs import load_pairs
from rmlab.io.tokenize import encode_pairs
from rmlab.toy import tiny_causal_lm, tiny_reward_model
from tests.conftest import make_pairs


@pytest.fixture(scope="module")
def ensemble():
    return [tiny_reward_model(seed=s) for s in (0, 1, 2)]


@pytest.fixture
def no_scoring(monkeypatch):
    """Fail the test if preference_strength / ranking_accuracy reach a model run."""

    def forbidden(*args, **kwargs):
        raise AssertionError("a model ran before the input error was raised")

    monkeypatch.setattr("rmlab.diagnostics.data.reward_scores", forbidden)
    monkeypatch.setattr("rmlab.diagnostics.data.implicit_rewards", forbidden)


# --------------------------------------------------------------------------------------------------
# preference strength
# --------------------------------------------------------------------------------------------------
def test_strength_equals_numpy_over_individual_scores(ensemble, tok):
    pairs = make_pairs(20, seed=2)
    strength = preference_strength(
        ensemble, pairs, tokenizer=tok, mislabel_threshold=0.5, ambiguous_threshold=0.3, progress=False
    )
    margins = np.stack(
        [
            (lambda f: f["score_chosen"].to_numpy() - f["score_rejected"].to_numpy())(
                rmlab.reward_scores(m, pairs, tokenizer=tok, progress=False)
            )
            for m in ensemble
        ],
        axis=1,
    )
    for k in range(3):
        np.testing.assert_allclose(strength[f"margin_{k}"], margins[:, k], rtol=1e-12)
    mean, std = margins.mean(axis=1), margins.std(axis=1)  # numpy's default std is the population std
    np.testing.assert_allclose(strength["strength_mean"], mean, rtol=1e-12)
    np.testing.assert_allclose(strength["strength_std"], std, rtol=1e-12)
    # the documented flag rules, written out again
    spread = np.sqrt(np.mean((mean - mean.mean()) ** 2))
    ambiguous = np.abs(mean) < 0.3 * spread
    mislabelled = (mean < 0) & (np.abs(mean) > 0.5 * std) & ~ambiguous
    assert (strength["ambiguous"].to_numpy() == ambiguous).all() and ambiguous.any()
    assert (strength["likely_mislabelled"].to_numpy() == mislabelled).all() and mislabelled.any()
    assert not (strength["ambiguous"] & strength["likely_mislabelled"]).any()
    assert strength.attrs["strength_spread"] == pytest.approx(spread)
    assert list(strength.columns[:9]) == [
        "pair", "strength_mean", "strength_std", "margin_0", "margin_1", "margin_2",
        "likely_mislabelled", "ambiguous", "truncated",
    ]
    assert list(strength["chosen"]) == [p["chosen"] for p in pairs]
    # thresholds of 0 turn the rules off / reduce to the sign of the mean
    plain = preference_strength(
        ensemble, pairs, tokenizer=tok, mislabel_threshold=0, ambiguous_threshold=0, progress=False
    )
    assert not plain["ambiguous"].any()
    assert (plain["likely_mislabelled"].to_numpy() == (mean < 0)).all()


def test_strength_finds_flipped_labels_in_the_toy_world(world):
    """The shipped proxies flag the pairs whose Bradley-Terry label went against the gold reward."""
    heldout = world.heldout
    strength = preference_strength(world.reward_models, heldout, tokenizer=world.tokenizer, progress=False)
    flipped = strength["flipped"].to_numpy(bool)
    flagged = strength["likely_mislabelled"].to_numpy(bool)
    base = flipped.mean()
    precision, recall = flipped[flagged].mean(), flagged[flipped].mean()
    k = int(flipped.sum())
    bottom = strength.sort_values("strength_mean").head(k)["flipped"].mean()
    near_half = (np.abs(strength["true_prob"] - 0.5) < 0.15).to_numpy()
    ambiguous = strength["ambiguous"].to_numpy(bool)
    print(
        f"\nheld-out pairs {len(strength)}, flipped {k} (base rate {base:.3f}); likely_mislabelled "
        f"{flagged.sum()}: precision {precision:.3f}, recall {recall:.3f}; bottom-{k} by strength_mean "
        f"precision {bottom:.3f}; ambiguous {ambiguous.sum()}: {near_half[ambiguous].mean():.3f} have "
        f"|true_prob - 0.5| < 0.15 (base {near_half.mean():.3f})"
    )
    assert precision >= 2 * base
    assert recall >= 0.5  # flagging at random with the same count would recall flagged.mean() ~ 0.16
    assert bottom >= 2 * base
    assert near_half[ambiguous].mean() >= 2 * near_half.mean()


def test_strength_errors(ensemble, tok, no_scoring):
    pairs = make_pairs(4)
    with pytest.raises(ArgumentError, match="has 1 model.*at least 2"):
        preference_strength(ensemble[:1], pairs, tokenizer=tok)
    with pytest.raises(ArgumentError, match="has 0 model"):
        preference_strength([], pairs, tokenizer=tok)
    with pytest.raises(ArgumentError, match="must be a list of reward models"):
        preference_strength(ensemble[0], pairs, tokenizer=tok)
    with pytest.raises(ArgumentError, match="mislabel_threshold=-1"):
        preference_strength(ensemble, pairs, tokenizer=tok, mislabel_threshold=-1)
    with pytest.raises(ArgumentError, match="Did you mean 'batch_tokens'"):
        preference_strength(ensemble, pairs, tokenizer=tok, batch_token=64)
    with pytest.raises(ArgumentError, match="tokenizer is a list of 2"):
        preference_strength(ensemble, pairs, tokenizer=[tok, tok])
    with pytest.raises(DataError, match="chosen"):
        preference_strength(ensemble, [{"prompt": "a", "rejected": " b"}], tokenizer=tok)
    # the third model is a causal LM: refused before the first two are scored
    with pytest.raises(ModelError, match="reward model 2 is a .*not a sequence classifier"):
        preference_strength([*ensemble[:2], tiny_causal_lm("gpt2")], pairs, tokenizer=tok)
    two_outputs = tiny_reward_model(seed=4, num_labels=2)
    with pytest.raises(ModelError, match="2 outputs.*label="):
        preference_strength([ensemble[0], two_outputs], pairs, tokenizer=tok)


def test_strength_with_a_multi_output_head(ensemble, tok):
    pairs = make_pairs(4, seed=6)
    two_outputs = [tiny_reward_model(seed=s, num_labels=2) for s in (4, 5)]
    strength = preference_strength(two_outputs, pairs, tokenizer=tok, label=1, progress=False)
    one = rmlab.reward_scores(two_outputs[1], pairs, tokenizer=tok, label=1, progress=False)
    np.testing.assert_allclose(strength["margin_1"], one["margin"])


def test_strength_non_reward_model_error_from_reward_scores(tok):
    """Without the up-front check the same ModelError comes from reward_scores' loader."""
    with pytest.raises(ModelError):
        rmlab.reward_scores(tiny_causal_lm("gpt2"), make_pairs(2), tokenizer=tok, progress=False)


def test_strength_accepts_one_tokenizer_per_model(ensemble, tok):
    pairs = make_pairs(5, seed=9)
    one = preference_strength(ensemble[:2], pairs, tokenizer=tok, progress=False)
    each = preference_strength(ensemble[:2], pairs, tokenizer=[tok, tok], progress=False)
    pd.testing.assert_frame_equal(one, each)


def test_strength_takes_options_as_one_object(ensemble, tok):
    pairs = make_pairs(5, seed=9)
    flat = preference_strength(ensemble[:2], pairs, tokenizer=tok, max_length=40, progress=False)
    given = preference_strength(ensemble[:2], pairs, options=rmlab.Options(tokenizer=tok, max_length=40,
                                                                          add_eos=None, progress=False))
    pd.testing.assert_frame_equal(flat, given)
    assert flat["truncated"].any()


# --------------------------------------------------------------------------------------------------
# ranking accuracy
# --------------------------------------------------------------------------------------------------
def brute_logps(model, seq) -> float:
    """sum_t log pi(ids[t] | ids[:t]) over response tokens: the sequence alone, full log_softmax."""
    if seq.start >= len(seq.ids):
        return float("nan")
    ids = torch.tensor([list(seq.ids)])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    return float(sum(logp[t - 1, seq.ids[t]].item() for t in range(seq.start, len(seq.ids))))


@pytest.mark.filterwarnings("ignore::rmlab.errors.DataWarning")  # the data is bad on purpose here
@pytest.mark.parametrize("length_normalize", [False, True])
def test_ranking_accuracy_equals_brute_force(policy, reference, tok, length_normalize):
    pairs = make_pairs(10, seed=5)
    rng = np.random.default_rng(0)
    for row in pairs:
        row["true_prob"] = float(rng.uniform(0.05, 0.95))
    beta = 0.3
    frame = ranking_accuracy(
        policy, reference, pairs, tokenizer=tok, beta=beta, length_normalize=length_normalize,
        max_length=14, progress=False,
    )
    encoded = encode_pairs(load_pairs(pairs), tok, max_length=14)
    expect = {"policy": [], "reference": [], "ideal": []}
    for pair, row in zip(encoded, pairs):
        lp = {(name, side): brute_logps(model, getattr(pair, side))
              for name, model in (("policy", policy), ("reference", reference)) for side in ("chosen", "rejected")}
        sizes = {side: getattr(pair, side).n_response for side in ("chosen", "rejected")}
        for name in ("policy", "reference"):
            c, r = lp[(name, "chosen")], lp[(name, "rejected")]
            if length_normalize:
                c, r = c / max(sizes["chosen"], 1), r / max(sizes["rejected"], 1)
            expect[name].append(None if math.isnan(c - r) else c > r)
        d = lp[("reference", "chosen")] - lp[("reference", "rejected")]
        p = row["true_prob"]
        expect["ideal"].append(None if math.isnan(d) else d + math.log(p / (1 - p)) / beta > 0)
        np.testing.assert_allclose(
            frame.loc[len(expect["ideal"]) - 1, ["logps_chosen", "logps_rejected", "ref_logps_chosen",
                                                 "ref_logps_rejected"]].to_numpy(float),
            [lp[("policy", "chosen")], lp[("policy", "rejected")], lp[("reference", "chosen")],
             lp[("reference", "rejected")]],
            atol=1e-4,
        )
    for column, name in (("policy_correct", "policy"), ("reference_correct", "reference"),
                         ("idealised_correct", "ideal")):
        got = [None if pd.isna(v) else bool(v) for v in frame[column]]
        assert got == expect[name], column
    assert None in expect["policy"] and True in expect["policy"], "the case must mix NA and scored pairs"
    summary = frame.attrs["summary"]
    scored = [v for v in expect["policy"] if v is not None]
    assert summary["ranking_accuracy"] == pytest.approx(np.mean(scored))
    assert summary["pairs"] == 10
    pd.testing.assert_series_equal(summary, ranking_summary(frame))


def fake_implicit(ref_chosen, ref_rejected, logps_chosen, logps_rejected):
    """What rmlab.implicit_rewards returns, reduced to the columns ranking_accuracy reads."""

    def run(policy, reference, data, **kwargs):
        n = len(ref_chosen)
        return pd.DataFrame(
            {
                "pair": np.arange(n), "logps_chosen": logps_chosen, "logps_rejected": logps_rejected,
                "ref_logps_chosen": ref_chosen, "ref_logps_rejected": ref_rejected,
                "tokens_chosen": np.full(n, 4), "tokens_rejected": [2, 4, 4, 4, 8], "truncated": False,
            }
        )

    return run


def test_idealised_ranking_by_hand(monkeypatch):
    # reference log-prob differences d = -2, +1, -3, +3, +0.5; true probabilities p
    p = [0.9, 0.2, 1.0, 0.0, 0.5]
    monkeypatch.setattr(
        "rmlab.diagnostics.data.implicit_rewards",
        fake_implicit(
            ref_chosen=[-10.0, -5.0, -9.0, -4.0, -6.0], ref_rejected=[-8.0, -6.0, -6.0, -7.0, -6.5],
            logps_chosen=[-7.0, -6.0, -6.0, -3.0, -7.0], logps_rejected=[-8.0, -5.0, -7.0, -9.0, -8.0],
        ),
    )
    pairs = [{"prompt": "q", "chosen": f" a{i}", "rejected": f" b{i}", "true_prob": p[i]} for i in range(5)]
    # beta = 0.1: -2 + ln(9)/0.1 = 19.97 > 0; 1 + ln(0.25)/0.1 = -12.86 < 0; +inf; -inf; 0.5 + 0
    small = ranking_accuracy("policy", "reference", pairs, beta=0.1)
    np.testing.assert_allclose(small["idealised_log_ratio"].iloc[:2], [-2 + 10 * math.log(9), 1 + 10 * math.log(0.25)])
    assert small["idealised_log_ratio"].iloc[2] == math.inf and small["idealised_log_ratio"].iloc[3] == -math.inf
    assert list(small["idealised_correct"]) == [True, False, True, False, True]
    # beta = 10 barely moves the reference: -2 + ln(9)/10 = -1.78 < 0; 1 + ln(0.25)/10 = 0.86 > 0
    large = ranking_accuracy("policy", "reference", pairs, beta=10.0)
    assert list(large["idealised_correct"]) == [False, True, True, False, True]
    assert list(large["reference_correct"]) == [False, True, False, True, True]
    assert list(large["policy_correct"]) == [True, False, True, True, True]
    summary = large.attrs["summary"]
    assert summary["ranking_accuracy"] == pytest.approx(4 / 5)
    assert summary["reference_ranking_accuracy"] == pytest.approx(3 / 5)
    assert summary["idealised_ranking_accuracy"] == pytest.approx(3 / 5)
    assert summary["alignment_gap"] == pytest.approx(-1 / 5)
    assert small.attrs["summary"]["idealised_ranking_accuracy"] == pytest.approx(3 / 5)
    # length-normalised: per-token means (tokens 4 vs 2, 4, 4, 4, 8); the idealised ratio stays on sums
    norm = ranking_accuracy("policy", "reference", pairs, beta=10.0, length_normalize=True)
    # policy: -7/4 vs -8/2 -> True; -1.5 vs -1.25 -> False; -1.5 vs -1.75 -> True; True; -1.75 vs -1 -> False
    assert list(norm["policy_correct"]) == [True, False, True, True, False]
    # reference: -2.5 vs -4 -> True; -1.25 vs -1.5 -> True; False; True; -1.5 vs -0.8125 -> False
    assert list(norm["reference_correct"]) == [True, True, False, True, False]
    assert list(norm["idealised_correct"]) == list(large["idealised_correct"])


def test_probability_column_checked_before_any_model(no_scoring):
    base = [{"prompt": "q", "chosen": " a", "rejected": " b"} for _ in range(3)]

    def with_probs(values, column="true_prob"):
        return [dict(row, **{column: v}) for row, v in zip(base, values)]

    with pytest.raises(DataError, match=r"Row 1, column 'true_prob': 1\.2 is not a probability"):
        ranking_accuracy("p", "r", with_probs([0.5, 1.2, 0.3]))
    with pytest.raises(DataError, match="Row 2, column 'true_prob'"):
        ranking_accuracy("p", "r", with_probs([0.5, 0.2, float("nan")]))
    with pytest.raises(DataError, match="Row 0, column 'true_prob': 'high'"):
        ranking_accuracy("p", "r", with_probs(["high", 0.2, 0.3]))
    with pytest.raises(DataError, match="prob_column='prob' is not a column.*Did you mean 'probs'"):
        ranking_accuracy("p", "r", with_probs([0.5, 0.2, 0.3], column="probs"), prob_column="prob")
    with pytest.raises(ArgumentError, match="reference=None"):
        ranking_accuracy("p", None, base)
    with pytest.raises(ArgumentError, match="beta=0"):
        ranking_accuracy("p", "r", base, beta=0)
    with pytest.raises(ArgumentError, match="unexpected keyword argument 'reference_free'"):
        ranking_accuracy("p", "r", base, reference_free=True)
    with pytest.raises(ArgumentError, match="Did you mean 'max_length'"):
        ranking_accuracy("p", "r", base, max_lenght=10)


def test_ranking_accuracy_takes_options_as_one_object(policy, reference, tok):
    pairs = make_pairs(5, seed=9)
    flat = ranking_accuracy(policy, reference, pairs, tokenizer=tok, max_length=40, progress=False)
    given = ranking_accuracy(policy, reference, pairs, options=rmlab.Options(tokenizer=tok, max_length=40, progress=False))
    pd.testing.assert_frame_equal(flat, given, check_like=False)
    assert flat["truncated"].any()


def test_without_probabilities_the_idealised_columns_are_na(policy, reference, tok):
    pairs = make_pairs(4, seed=1)
    frame = ranking_accuracy(policy, reference, pairs, tokenizer=tok, progress=False)
    assert frame["idealised_correct"].isna().all() and frame["idealised_log_ratio"].isna().all()
    assert "true_prob" in frame.attrs["note"]
    assert math.isnan(frame.attrs["summary"]["idealised_ranking_accuracy"])
    assert not math.isnan(frame.attrs["summary"]["ranking_accuracy"])
    skipped = ranking_accuracy(policy, reference, pairs, tokenizer=tok, prob_column=None, progress=False)
    assert skipped["idealised_correct"].isna().all()


def test_ranking_accuracy_in_the_toy_world(world):
    heldout = world.heldout
    frame = ranking_accuracy(world.dpo[0.1], world.sft, heldout, tokenizer=world.tokenizer, beta=0.1, progress=False)
    summary = frame.attrs["summary"]
    print(
        f"\nDPO beta=0.1 vs SFT, {len(frame)} held-out pairs: ranking accuracy "
        f"{summary['ranking_accuracy']:.3f}, reference {summary['reference_ranking_accuracy']:.3f}, "
        f"idealised {summary['idealised_ranking_accuracy']:.3f}, gap {summary['alignment_gap']:.3f}"
    )
    # the toy world's chosen reviews are longer, so the SFT reference ranks most pairs the wrong way;
    # DPO fixes many of them but stays below the idealised optimum (Chen et al.'s alignment gap)
    assert summary["reference_ranking_accuracy"] < 0.5 < summary["ranking_accuracy"]
    assert summary["idealised_ranking_accuracy"] > summary["ranking_accuracy"]
    assert summary["pairs"] == len(heldout)
