"""rmlab.attribute_reward: captum attributions of reward-model scores and implicit DPO rewards.

Every number is checked against something computed independently here: scores from
``rmlab.reward_scores``, implicit rewards from ``rmlab.implicit_rewards``, baseline values and
ablations from plain model forwards on the baseline ids.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import rmlab
from rmlab.errors import ArgumentError, DataError
from rmlab.rewards.attribution import attribute_reward, list_methods
from rmlab.toy import tiny_causal_lm, tiny_reward_model, tiny_tokenizer
from tests.conftest import make_pairs

COLUMNS = [
    "pair", "side", "position", "token_id", "token", "in_response", "attribution",
    "target_value", "baseline_value", "delta", "baseline_id",
]


@pytest.fixture(scope="module")
def enc_tok():
    return tiny_tokenizer(encoder=True)


@pytest.fixture(scope="module")
def rm():
    return tiny_reward_model("gpt2", seed=3)


def per_sequence(frame: pd.DataFrame, key: str = "pair") -> pd.DataFrame:
    return frame.groupby([key, "side"], observed=True).agg(
        total=("attribution", "sum"),
        value=("target_value", "first"),
        base=("baseline_value", "first"),
        delta=("delta", "first"),
        ids=("token_id", list),
        base_ids=("baseline_id", list),
        responses=("in_response", "sum"),
    )


@torch.no_grad()
def plain_score(model, ids) -> float:
    """The reward model's own forward on one unpadded id list."""
    return float(model(input_ids=torch.tensor([list(ids)])).logits[0, 0])


@torch.no_grad()
def plain_implicit(policy, reference, inputs, labels, n_response: int, beta: float) -> float:
    """beta * (log pi - log pi_ref) of the response ``labels`` given the ids ``inputs`` (full logits)."""
    def logp(model):
        logits = model(input_ids=torch.tensor([list(inputs)])).logits[0].float()
        picked = torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(list(labels[1:]))[:, None])[:, 0]
        return float(picked[len(labels) - 1 - n_response :].sum())

    return beta * (logp(policy) - logp(reference))


# --------------------------------------------------------------------------------------------------
# integrated gradients on explicit reward models of three architectures
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert"])
def test_integrated_gradients_completeness(arch, tok, enc_tok):
    tokenizer = enc_tok if arch == "bert" else tok
    model = tiny_reward_model(arch, seed=3)
    pairs = make_pairs(2, seed=5)
    frame = attribute_reward(model, pairs, tokenizer=tokenizer, progress=False)
    assert list(frame.columns) == COLUMNS
    assert frame.attrs["method"] == "integrated_gradients" and frame.attrs["n_steps"] == 50
    scores = rmlab.reward_scores(model, pairs, tokenizer=tokenizer, progress=False)
    seqs = per_sequence(frame)
    for (pair, side), row in seqs.iterrows():
        # the reward explained is the reward model's score, computed independently
        assert row.value == pytest.approx(scores.loc[pair, f"score_{side}"], abs=1e-4)
        assert row.responses == scores.loc[pair, f"tokens_{side}"]
        # the baseline value is the plain forward of the baseline ids
        assert row.base == pytest.approx(plain_score(model, row.base_ids), abs=1e-4)
        # completeness: attributions sum to f(input) - f(baseline), up to the convergence delta
        assert abs(row.total - (row.value - row.base)) <= abs(row.delta) + 1e-5
        assert abs(row.delta) < 1e-4
    # special tokens keep their id in the baseline and get exactly zero attribution
    special = set(tokenizer.all_special_ids)
    kept = frame["token_id"].isin(special)
    assert kept.any()
    assert (frame.loc[kept, "baseline_id"] == frame.loc[kept, "token_id"]).all()
    assert (frame.loc[kept, "attribution"] == 0).all()
    assert (frame.loc[~kept, "baseline_id"] == frame.attrs["baseline_token_id"]).all()
    assert frame.loc[~kept, "attribution"].abs().max() > 0
    # one row per input token, positions 0..n-1 in order
    for (_, _), group in frame.groupby(["pair", "side"], observed=True):
        assert group["position"].tolist() == list(range(len(group)))


def test_tokens_and_response_flags(rm, tok):
    pairs = make_pairs(2, seed=1)
    frame = attribute_reward(rm, pairs, tokenizer=tok, n_steps=4, progress=False)
    first = frame[(frame["pair"] == 0) & (frame["side"] == "chosen")]
    text = tok.decode(first["token_id"].tolist())
    assert text == pairs[0]["prompt"] + pairs[0]["chosen"] + tok.eos_token
    assert "".join(first["token"]) == text
    response = tok.decode(first.loc[first["in_response"], "token_id"].tolist())
    assert response == pairs[0]["chosen"] + tok.eos_token
    assert frame["side"].cat.categories.tolist() == ["chosen", "rejected"]


# --------------------------------------------------------------------------------------------------
# Shapley sampling and feature ablation
# --------------------------------------------------------------------------------------------------
def test_shapley_efficiency_and_seed(rm, tok):
    pairs = make_pairs(2, seed=2)
    state = torch.get_rng_state()
    frame = attribute_reward(rm, pairs, tokenizer=tok, method="shapley", n_samples=4, progress=False)
    assert torch.equal(state, torch.get_rng_state())  # the seed does not touch the global RNG
    scores = rmlab.reward_scores(rm, pairs, tokenizer=tok, progress=False)
    for (pair, side), row in per_sequence(frame).iterrows():
        value, base = scores.loc[pair, f"score_{side}"], plain_score(rm, row.base_ids)
        assert row.total == pytest.approx(value - base, abs=1e-4)  # each permutation telescopes
        assert np.isnan(row.delta)
    again = attribute_reward(rm, pairs, tokenizer=tok, method="shapley", n_samples=4, progress=False)
    np.testing.assert_allclose(again["attribution"], frame["attribution"], atol=1e-6)
    other = attribute_reward(rm, pairs, tokenizer=tok, method="shapley", n_samples=4, seed=1, progress=False)
    assert not np.allclose(other["attribution"], frame["attribution"], atol=1e-7)


def test_feature_ablation_matches_brute_force(tok):
    model = tiny_reward_model("llama", seed=4)
    texts = ["The film was great and the cast was wonderful."]
    frame = attribute_reward(model, texts, tokenizer=tok, method="feature_ablation", progress=False)
    assert frame["side"].unique().tolist() == ["response"] and (frame["row"] == 0).all()
    ids = frame["token_id"].tolist()
    full = plain_score(model, ids)
    assert frame["target_value"].iloc[0] == pytest.approx(full, abs=1e-5)
    expected = []
    for t, base in enumerate(frame["baseline_id"]):
        changed = list(ids)
        changed[t] = int(base)
        expected.append(full - plain_score(model, changed))
    np.testing.assert_allclose(frame["attribution"], expected, atol=1e-5)
    assert np.abs(expected).max() > 1e-4


def test_custom_baseline_token(rm, tok):
    pairs = make_pairs(1, seed=3)
    bos = tok.convert_tokens_to_ids("<s>")
    by_id = attribute_reward(rm, pairs, tokenizer=tok, method="feature_ablation", baseline=bos, progress=False)
    by_name = attribute_reward(rm, pairs, tokenizer=tok, method="feature_ablation", baseline="<s>", progress=False)
    pd.testing.assert_frame_equal(by_id, by_name)
    assert by_id.attrs["baseline_token_id"] == bos
    every = attribute_reward(
        rm, pairs, tokenizer=tok, method="feature_ablation", baseline=bos, keep_special=False, progress=False
    )
    assert (every["baseline_id"] == bos).all()
    eos = every["token_id"] == tok.eos_token_id
    assert (every.loc[eos, "attribution"].abs() > 0).all()  # EOS is ablated too now


# --------------------------------------------------------------------------------------------------
# margin target
# --------------------------------------------------------------------------------------------------
def test_margin_attributions_sum_to_margin(rm, tok):
    pairs = make_pairs(2, seed=6)
    frame = attribute_reward(rm, pairs, tokenizer=tok, target="margin", progress=False)
    scores = rmlab.reward_scores(rm, pairs, tokenizer=tok, progress=False)
    seqs = per_sequence(frame)
    for pair in range(len(pairs)):
        chosen, rejected = seqs.loc[(pair, "chosen")], seqs.loc[(pair, "rejected")]
        assert chosen.value == pytest.approx(scores.loc[pair, "score_chosen"], abs=1e-4)
        assert rejected.value == pytest.approx(-scores.loc[pair, "score_rejected"], abs=1e-4)
        margin = scores.loc[pair, "margin"]
        base_margin = plain_score(rm, chosen.base_ids) - plain_score(rm, rejected.base_ids)
        total = frame.loc[frame["pair"] == pair, "attribution"].sum()
        assert abs(total - (margin - base_margin)) <= abs(chosen.delta) + abs(rejected.delta) + 1e-5
        assert chosen.value + rejected.value == pytest.approx(margin, abs=1e-4)
    # the rejected side carries the negated attributions of its score
    score = attribute_reward(rm, pairs, tokenizer=tok, target="score", progress=False)
    rej = frame["side"] == "rejected"
    np.testing.assert_allclose(frame.loc[rej, "attribution"], -score.loc[rej, "attribution"], atol=1e-6)
    np.testing.assert_allclose(frame.loc[~rej, "attribution"], score.loc[~rej, "attribution"], atol=1e-6)


# --------------------------------------------------------------------------------------------------
# DPO policies: the implicit reward
# --------------------------------------------------------------------------------------------------
def test_dpo_toy_world_integrated_gradients():
    from rmlab.toy import load

    world = load()
    pairs = world.heldout.head(2)
    policy, reference = world.dpo[0.1], world.sft
    frame = attribute_reward(policy, pairs, reference=reference, tokenizer=world.tokenizer, beta=0.1, progress=False)
    assert list(frame.columns) == COLUMNS
    assert frame.attrs["model_kind"] == "dpo" and frame.attrs["beta"] == 0.1
    rewards = rmlab.implicit_rewards(policy, reference, pairs, tokenizer=world.tokenizer, beta=0.1, progress=False)
    for (pair, side), row in per_sequence(frame).iterrows():
        assert row.value == pytest.approx(rewards.loc[pair, f"reward_{side}"], abs=1e-4)
        assert row.responses == rewards.loc[pair, f"tokens_{side}"]
        # baseline: the baseline ids as inputs, the real response tokens as labels (plain forwards)
        base = plain_implicit(policy, reference, row.base_ids, row.ids, int(row.responses), 0.1)
        assert row.base == pytest.approx(base, abs=1e-4)
        assert abs(row.total - (row.value - row.base)) <= abs(row.delta) + 1e-4
        assert abs(row.delta) < 0.1 * abs(row.value - row.base) + 1e-3
    # the last token is only a label: its embedding feeds no scored prediction
    last = frame.groupby(["pair", "side"], observed=True).tail(1)
    assert (last["attribution"].abs() < 1e-7).all()


def test_dpo_shapley_margin_and_reference_free(tok):
    policy, reference = tiny_causal_lm("gpt2", seed=1), tiny_causal_lm("gpt2", seed=0)
    pairs = make_pairs(2, seed=7)
    frame = attribute_reward(
        policy, pairs, reference=reference, tokenizer=tok, beta=0.5, method="shapley", n_samples=3,
        target="margin", progress=False,
    )
    rewards = rmlab.implicit_rewards(policy, reference, pairs, tokenizer=tok, beta=0.5, progress=False)
    seqs = per_sequence(frame)
    for pair in range(len(pairs)):
        chosen, rejected = seqs.loc[(pair, "chosen")], seqs.loc[(pair, "rejected")]
        base_margin = (
            plain_implicit(policy, reference, chosen.base_ids, chosen.ids, int(chosen.responses), 0.5)
            - plain_implicit(policy, reference, rejected.base_ids, rejected.ids, int(rejected.responses), 0.5)
        )
        total = frame.loc[frame["pair"] == pair, "attribution"].sum()
        assert total == pytest.approx(rewards.loc[pair, "margin"] - base_margin, abs=1e-4)
    free = attribute_reward(policy, pairs, reference_free=True, tokenizer=tok, n_steps=8, progress=False)
    expected = rmlab.implicit_rewards(policy, None, pairs, reference_free=True, tokenizer=tok, progress=False)
    values = per_sequence(free)["value"]
    assert values.loc[(1, "rejected")] == pytest.approx(expected.loc[1, "reward_rejected"], abs=1e-4)
    assert free.attrs["model_kind"] == "dpo_reference_free"
    same = attribute_reward(policy, pairs[:1], reference=policy, tokenizer=tok, n_steps=4, progress=False)
    assert (same["attribution"] == 0).all() and (same["target_value"] == 0).all()


def test_models_left_as_found(tok):
    model = tiny_reward_model("gpt2", seed=5)
    params = list(model.parameters())
    params[0].requires_grad_(False)
    flags = [p.requires_grad for p in params]
    config = model.config.to_dict()
    for method in list_methods():
        attribute_reward(model, make_pairs(1), tokenizer=tok, method=method, n_steps=4, n_samples=2, progress=False)
    assert [p.requires_grad for p in params] == flags
    assert all(p.grad is None for p in params)
    assert model.config.to_dict() == config
    assert not model._forward_pre_hooks and not model.get_input_embeddings()._forward_pre_hooks
    assert not model.get_input_embeddings()._forward_hooks


# --------------------------------------------------------------------------------------------------
# bad input, caught before any model loads or runs
# --------------------------------------------------------------------------------------------------
MISSING = "/nonexistent/reward-model"


def test_errors_before_loading(rm, tok):
    pairs = make_pairs(1)
    with pytest.raises(ArgumentError, match="Did you mean 'integrated_gradients'"):
        attribute_reward(MISSING, pairs, method="integrated_gradient")
    with pytest.raises(ArgumentError, match="target='scores'.*Did you mean 'score'"):
        attribute_reward(MISSING, pairs, target="scores")
    with pytest.raises(ArgumentError, match="needs preference pairs"):
        attribute_reward(MISSING, ["just one text"], target="margin")
    with pytest.raises(ArgumentError, match="n_steps=0"):
        attribute_reward(MISSING, pairs, n_steps=0)
    with pytest.raises(ArgumentError, match="n_samples=0"):
        attribute_reward(MISSING, pairs, method="shapley", n_samples=0)
    with pytest.raises(ArgumentError, match="Did you mean 'n_steps'"):
        attribute_reward(MISSING, pairs, n_step=10)
    with pytest.raises(ArgumentError, match="baseline"):
        attribute_reward(MISSING, pairs, baseline=-1)
    with pytest.raises(ArgumentError, match="reward model .*sequence classifier"):
        attribute_reward(rm, pairs, reference=MISSING, tokenizer=tok)
    policy = tiny_causal_lm("gpt2", seed=1)
    with pytest.raises(ArgumentError, match="reference"):
        attribute_reward(policy, pairs, tokenizer=tok)
    with pytest.raises(ArgumentError, match="beta"):
        attribute_reward(policy, pairs, reference=MISSING, beta=0, tokenizer=tok)
    with pytest.raises(ArgumentError, match="reference_free"):
        attribute_reward(policy, pairs, reference=MISSING, reference_free=True, tokenizer=tok)
    with pytest.raises(DataError):
        attribute_reward(policy, ["one text"], reference=MISSING, tokenizer=tok)


def test_errors_on_baseline_tokens(rm, tok):
    pairs = make_pairs(1)
    with pytest.raises(ArgumentError, match="not a token id of the model"):
        attribute_reward(rm, pairs, tokenizer=tok, baseline=10**6, progress=False)
    with pytest.raises(ArgumentError, match="not a token of the tokenizer"):
        attribute_reward(rm, pairs, tokenizer=tok, baseline="<no such token>", progress=False)


def test_options_flat_or_as_one_object(rm, tok):
    """The run options are the same flat or as one rmlab.Options; add_eos=None keeps each kind of
    model's own default (a reward model's: EOS unless the tokenizer closes texts; DPO: EOS)."""
    pairs = make_pairs(2, seed=4)
    flat = attribute_reward(rm, pairs, tokenizer=tok, method="feature_ablation", max_length=24, progress=False)
    given = attribute_reward(rm, pairs, method="feature_ablation",
                             options=rmlab.Options(tokenizer=tok, max_length=24, add_eos=None, progress=False))
    pd.testing.assert_frame_equal(flat, given)
    assert flat.groupby(["pair", "side"], observed=True)["position"].max().max() == 23  # truncated to 24 tokens
    policy, reference = tiny_causal_lm("gpt2", seed=1), tiny_causal_lm("gpt2", seed=0)
    dpo = attribute_reward(policy, pairs, reference=reference, tokenizer=tok, method="feature_ablation", progress=False)
    eos = attribute_reward(policy, pairs, reference=reference, method="feature_ablation",
                           options=rmlab.Options(tokenizer=tok, add_eos=True, progress=False))
    pd.testing.assert_frame_equal(dpo, eos)
    with pytest.raises(ArgumentError, match="unexpected keyword argument 'cache_dir'"):
        attribute_reward(rm, pairs, tokenizer=tok, cache_dir="nowhere")
