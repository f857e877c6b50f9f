"""rmlab.ModelPair: models loaded once, per-token log-probs computed once per data set, and the same
frames as the function forms with models."""

from __future__ import annotations

import pandas as pd
import pytest

import rmlab
import rmlab.engine.logprobs as logprob_engine
from rmlab.errors import ArgumentError
from rmlab.toy import tiny_causal_lm, tiny_tokenizer
from tests.conftest import make_pairs

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture()
def engine_calls(monkeypatch):
    calls = []
    real = logprob_engine.token_logprobs

    def counting(model, sequences, **kwargs):
        calls.append(len(sequences))
        return real(model, sequences, **kwargs)

    monkeypatch.setattr(logprob_engine, "token_logprobs", counting)
    return calls


def test_one_pair_scores_each_data_set_once_and_gives_the_function_frames(engine_calls):
    tok = tiny_tokenizer()
    policy, reference = tiny_causal_lm("gpt2", seed=1), tiny_causal_lm("gpt2", seed=2)
    pairs = make_pairs(6, seed=3)
    pair = rmlab.ModelPair(policy, reference, tokenizer=tok, progress=False)
    got = {
        "implicit": rmlab.implicit_rewards(pair, pairs, beta=0.2),
        "tokens": rmlab.token_rewards(pair, pairs, beta=0.3),
        "steps": rmlab.step_rewards(pair, pairs, beta=0.3, delimiter=" "),
    }
    assert engine_calls == [12, 12], "the policy and the reference ran once for the three analyses"
    engine_calls.clear()
    expected = {
        "implicit": rmlab.implicit_rewards(policy, reference, pairs, beta=0.2, tokenizer=tok, progress=False),
        "tokens": rmlab.token_rewards(policy, reference, pairs, beta=0.3, tokenizer=tok, progress=False),
        "steps": rmlab.step_rewards(policy, reference, pairs, beta=0.3, delimiter=" ", tokenizer=tok, progress=False),
    }
    assert len(engine_calls) == 6, "the function forms run their models every time"
    for name in got:
        pd.testing.assert_frame_equal(got[name], expected[name], check_exact=True)


def test_a_call_option_that_changes_the_tokens_computes_afresh(engine_calls):
    tok = tiny_tokenizer()
    pair = rmlab.ModelPair(tiny_causal_lm("gpt2", seed=1), tiny_causal_lm("gpt2", seed=2), tokenizer=tok, progress=False)
    pairs = make_pairs(4, seed=4)
    full = rmlab.implicit_rewards(pair, pairs)
    short = rmlab.implicit_rewards(pair, pairs, max_length=24, truncation_mode="keep_end")
    assert len(engine_calls) == 4
    assert short["truncated"].any() and not full["truncated"].any()
    assert pair.options.max_length is None, "a call's options do not change the pair's"


def test_other_analyses_take_a_pair_where_they_take_a_policy():
    tok = tiny_tokenizer()
    policy, reference = tiny_causal_lm("gpt2", seed=1), tiny_causal_lm("gpt2", seed=2)
    pairs = make_pairs(3, seed=5)
    pair = rmlab.ModelPair(policy, reference, tokenizer=tok, progress=False)
    pd.testing.assert_frame_equal(
        rmlab.ches(pair, pairs), rmlab.ches(policy, pairs, tokenizer=tok, progress=False), check_exact=True
    )


def test_a_pair_brings_its_own_reference():
    tok = tiny_tokenizer()
    policy, reference = tiny_causal_lm("gpt2", seed=1), tiny_causal_lm("gpt2", seed=2)
    pair = rmlab.ModelPair(policy, reference, tokenizer=tok, progress=False)
    with pytest.raises(ArgumentError, match="brings its own reference"):
        rmlab.implicit_rewards(pair, tiny_causal_lm("gpt2", seed=3), make_pairs(2))
    alone = rmlab.ModelPair(policy, tokenizer=tok, progress=False)
    with pytest.raises(ArgumentError, match="reference=None"):
        rmlab.implicit_rewards(alone, make_pairs(2))
    assert rmlab.implicit_rewards(alone, make_pairs(2), reference_free=True)["ref_logps_chosen"].isna().all()
    with pytest.raises(ArgumentError, match="Did you mean 'max_length'"):
        rmlab.ModelPair(policy, reference, max_lenght=3)


def test_gradient_entanglement_takes_the_pairs_reference():
    tok = tiny_tokenizer()
    policy, reference = tiny_causal_lm("gpt2", seed=1), tiny_causal_lm("gpt2", seed=2)
    pairs = make_pairs(3, seed=6)
    pair = rmlab.ModelPair(policy, reference, tokenizer=tok, progress=False)
    pd.testing.assert_frame_equal(
        rmlab.gradient_entanglement(pair, pairs, params="last:1"),
        rmlab.gradient_entanglement(policy, pairs, reference=reference, params="last:1", tokenizer=tok, progress=False),
        check_exact=True,
    )
