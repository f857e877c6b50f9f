"""Dense reward-model rewards: one pass equals scoring every prefix alone, and the rewards telescope."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import rmlab
from rmlab.errors import ArgumentError, ModelError
from rmlab.toy import tiny_reward_model, tiny_tokenizer
from tests.conftest import make_pairs


def brute_prefix_scores(model, ids, start) -> np.ndarray:
    """[s_prompt, s_0, ...]: every prefix scored alone by the model's forward, one at a time."""
    with torch.no_grad():
        return np.array(
            [float(model(input_ids=torch.tensor([list(ids[:end])])).logits[0, 0]) for end in range(start, len(ids) + 1)]
        )


def full_ids(tok, prompt, response):
    return tok(prompt + response + tok.eos_token)["input_ids"], len(tok(prompt)["input_ids"])


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gpt_neox"])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_one_pass_equals_prefix_scoring_and_brute_force(arch, padding_side):
    tok = tiny_tokenizer(padding_side=padding_side)
    rm = tiny_reward_model(arch, seed=7)
    rows = make_pairs(6, seed=11)
    one = rmlab.dense_rewards(rm, rows, tokenizer=tok, method="one_pass", batch_tokens=128, progress=False)
    pre = rmlab.dense_rewards(rm, rows, tokenizer=tok, method="prefix", batch_tokens=128, progress=False)
    assert one.attrs["method"] == "one_pass" and pre.attrs["method"] == "prefix"
    np.testing.assert_allclose(one["prefix_score"], pre["prefix_score"], atol=1e-4)
    np.testing.assert_allclose(one["reward"], pre["reward"], atol=1e-4)
    auto = rmlab.dense_rewards(rm, rows, tokenizer=tok, progress=False)
    assert auto.attrs["method"] == "one_pass"
    # independent: each prefix of pair 0's rejected response scored alone, unpadded
    ids, start = full_ids(tok, rows[0]["prompt"], rows[0]["rejected"])
    brute = brute_prefix_scores(rm, ids, start)
    got = one[(one["pair"] == 0) & (one["side"] == "rejected")]
    np.testing.assert_allclose(got["prefix_score"], brute[1:], atol=1e-4)
    np.testing.assert_allclose(got["reward"], np.diff(brute), atol=1e-4)
    assert list(got["token_id"]) == ids[start:]


def test_rewards_telescope_to_final_minus_prompt_score(tok):
    rm = tiny_reward_model("gpt2", seed=8)
    rows = make_pairs(8, seed=12)
    dense = rmlab.dense_rewards(rm, rows, tokenizer=tok, progress=False)
    scores = rmlab.reward_scores(rm, rows, tokenizer=tok, progress=False)
    sums = dense.groupby(["pair", "side"], observed=True)["reward"].sum().unstack()
    last = dense.groupby(["pair", "side"], observed=True)["prefix_score"].last().unstack()
    np.testing.assert_allclose(last["chosen"], scores["score_chosen"], atol=1e-4)
    for i, row in enumerate(rows):
        prompt_ids = tok(row["prompt"])["input_ids"]
        with torch.no_grad():
            s_prompt = float(rm(input_ids=torch.tensor([prompt_ids])).logits[0, 0])
        assert sums.at[i, "chosen"] == pytest.approx(scores.at[i, "score_chosen"] - s_prompt, abs=1e-4)
        assert sums.at[i, "rejected"] == pytest.approx(scores.at[i, "score_rejected"] - s_prompt, abs=1e-4)
    cum = dense.groupby(["pair", "side"], observed=True)["reward"].cumsum()
    np.testing.assert_allclose(cum, dense["cum_reward"], atol=1e-9)


def test_padding_equal_to_eos_follows_the_models_pooling():
    """With pad == EOS (common for GPT-2 reward models) the model pools the token before the EOS,
    so the appended EOS earns exactly zero reward, in one pass and prefix by prefix."""
    tok = tiny_tokenizer()
    rm = tiny_reward_model("gpt2", seed=9, pad_token_id=0)  # 0 is <|endoftext|>
    rows = make_pairs(5, seed=13)
    one = rmlab.dense_rewards(rm, rows, tokenizer=tok, method="one_pass", progress=False)
    pre = rmlab.dense_rewards(rm, rows, tokenizer=tok, method="prefix", progress=False)
    np.testing.assert_allclose(one["prefix_score"], pre["prefix_score"], atol=1e-4)
    eos_rows = one[one["token_id"] == tok.eos_token_id]
    assert len(eos_rows) == 10 and np.allclose(eos_rows["reward"], 0.0, atol=1e-6)
    scores = rmlab.reward_scores(rm, rows, tokenizer=tok, progress=False)
    last = one.groupby(["pair", "side"], observed=True)["prefix_score"].last().unstack()
    np.testing.assert_allclose(last["chosen"], scores["score_chosen"], atol=1e-4)


def test_encoders_use_prefix_scoring_with_their_closing_token():
    tok = tiny_tokenizer(encoder=True)
    rm = tiny_reward_model("bert", seed=2)
    rows = make_pairs(3, seed=14)
    with pytest.raises(ModelError, match="one_pass.*BertForSequenceClassification.*method='prefix'"):
        rmlab.dense_rewards(rm, rows, tokenizer=tok, method="one_pass", progress=False)
    dense = rmlab.dense_rewards(rm, rows, tokenizer=tok, progress=False)
    assert dense.attrs["method"] == "prefix"
    scores = rmlab.reward_scores(rm, rows, tokenizer=tok, progress=False)
    for i, row in enumerate(rows):
        got = dense[(dense["pair"] == i) & (dense["side"] == "chosen")]
        words = tok(row["prompt"] + row["chosen"], add_special_tokens=False)["input_ids"]
        prompt_len = len(tok(row["prompt"], add_special_tokens=False)["input_ids"])
        # every prefix is scored as the encoder sees a text of its own: <s> prefix <|endoftext|>
        expected = []
        for end in range(prompt_len, len(words) + 1):
            ids = [tok.bos_token_id] + words[:end] + [tok.eos_token_id]
            with torch.no_grad():
                expected.append(float(rm(input_ids=torch.tensor([ids])).logits[0, 0]))
        expected.append(expected[-1])  # the closing token itself adds nothing
        np.testing.assert_allclose(got["prefix_score"], expected[1:], atol=1e-5)
        assert got["prefix_score"].iloc[-1] == pytest.approx(scores.at[i, "score_chosen"], abs=1e-5)


def test_single_texts_and_chat(tok):
    rm = tiny_reward_model("llama", seed=3)
    texts = ["the film was great.", "the plot was dull and the cast was flat."]
    dense = rmlab.dense_rewards(rm, texts, tokenizer=tok, progress=False)
    assert set(dense["side"]) == {"response"} and list(dense["row"].unique()) == [0, 1]
    scores = rmlab.reward_scores(rm, texts, tokenizer=tok, progress=False)
    last = dense.groupby("row")["prefix_score"].last()
    np.testing.assert_allclose(last, scores["score"], atol=1e-4)
    chat = make_pairs(3, seed=15, chat=True)
    one = rmlab.dense_rewards(rm, chat, tokenizer=tok, method="one_pass", progress=False)
    pre = rmlab.dense_rewards(rm, chat, tokenizer=tok, method="prefix", progress=False)
    np.testing.assert_allclose(one["reward"], pre["reward"], atol=1e-4)


def test_bad_method_names_the_choices(tok):
    with pytest.raises(ArgumentError, match="Did you mean 'one_pass'"):
        rmlab.dense_rewards(tiny_reward_model("gpt2"), make_pairs(2), tokenizer=tok, method="onepass")


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gpt_neox"])
def test_shared_prompt_equals_whole_sequences(arch, tok):
    """The prompt run once and both responses continued from its KV cache give the same scores,
    also when pairs of very different prompt lengths share a batch and when some pairs cannot
    share (keep_end truncation cuts the two prompts differently)."""
    rm = tiny_reward_model(arch, seed=10)
    rows = make_pairs(12, seed=16)
    rows[3]["prompt"] = "Review: " + " ".join(["the film was great"] * 12)
    shared = rmlab.dense_rewards(rm, rows, tokenizer=tok, method="one_pass", batch_tokens=400, progress=False)
    whole = rmlab.dense_rewards(rm, rows, tokenizer=tok, method="one_pass", share_prompt=False, progress=False)
    assert shared.attrs["shared_prompt_pairs"] == 12 and whole.attrs["shared_prompt_pairs"] == 0
    np.testing.assert_allclose(shared["prefix_score"], whole["prefix_score"], atol=1e-4)
    np.testing.assert_allclose(shared["reward"], whole["reward"], atol=1e-4)
    cut = rmlab.dense_rewards(rm, rows, tokenizer=tok, max_length=14, truncation_mode="keep_end", progress=False)
    cut_prefix = rmlab.dense_rewards(
        rm, rows, tokenizer=tok, max_length=14, truncation_mode="keep_end", method="prefix", progress=False
    )
    assert cut.attrs["shared_prompt_pairs"] < 12
    np.testing.assert_allclose(cut["prefix_score"], cut_prefix["prefix_score"], atol=1e-4)


def test_options_flat_or_as_one_object(tok):
    rm = tiny_reward_model("gpt2", seed=8)
    rows = make_pairs(4, seed=17)
    flat = rmlab.dense_rewards(rm, rows, tokenizer=tok, max_length=30, batch_tokens=96, progress=False)
    given = rmlab.dense_rewards(
        rm, rows, options=rmlab.Options(tokenizer=tok, max_length=30, batch_tokens=96, add_eos=None, progress=False)
    )
    pd.testing.assert_frame_equal(flat, given)
    with pytest.raises(ArgumentError, match="Did you mean 'batch_tokens'"):
        rmlab.dense_rewards(rm, rows, tokenizer=tok, batch_token=96)
