"""Explicit reward-model scores: batched equals one-at-a-time, TRL's RewardTrainer tokenisation,
pairs and single texts in every accepted form, and clear errors for the wrong kind of model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import rmlab
from rmlab.errors import DataError, ModelError
from rmlab.io.models import load_reward_model
from rmlab.toy import tiny_causal_lm, tiny_reward_model, tiny_tokenizer
from tests.conftest import make_pairs

pytestmark = pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")


def brute_score(model, ids, label=0) -> float:
    """The model's own score of one unpadded sequence."""
    with torch.no_grad():
        return float(model(input_ids=torch.tensor([list(ids)])).logits[0, label])


def expected_ids(tok, prompt: str, response: str, add_eos: bool = True) -> list[int]:
    return tok(prompt + response + (tok.eos_token if add_eos else ""))["input_ids"]


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gpt_neox"])
def test_pair_scores_equal_unbatched_scores(arch, tok):
    rm = tiny_reward_model(arch, seed=3)
    rows = make_pairs(10, seed=5)
    frame = rmlab.reward_scores(rm, rows, tokenizer=tok, batch_tokens=96, progress=False)
    for i, row in enumerate(rows):
        c = brute_score(rm, expected_ids(tok, row["prompt"], row["chosen"]))
        r = brute_score(rm, expected_ids(tok, row["prompt"], row["rejected"]))
        assert frame.at[i, "score_chosen"] == pytest.approx(c, abs=1e-5)
        assert frame.at[i, "score_rejected"] == pytest.approx(r, abs=1e-5)
        assert frame.at[i, "margin"] == pytest.approx(c - r, abs=1e-5)
        assert frame.at[i, "correct"] == (c > r)
        assert frame.at[i, "prob_chosen"] == pytest.approx(1 / (1 + np.exp(r - c)), abs=1e-6)
    assert list(frame["prompt"]) == [r["prompt"] for r in rows]


def test_encoder_reward_model_uses_the_tokenizers_own_closing_token():
    tok = tiny_tokenizer(encoder=True)
    rm = tiny_reward_model("bert", seed=1)
    rows = make_pairs(4, seed=6)
    frame = rmlab.reward_scores(rm, rows, tokenizer=tok, progress=False)
    for i, row in enumerate(rows):
        ids = tok(row["prompt"] + row["chosen"])["input_ids"]  # <s> ... <|endoftext|>, no extra EOS
        assert ids[-1] == tok.eos_token_id and ids[-2] != tok.eos_token_id
        assert frame.at[i, "score_chosen"] == pytest.approx(brute_score(rm, ids), abs=1e-5)


def test_texts_in_every_form_score_like_the_sides_of_a_pair(tok):
    rm = tiny_reward_model("gpt2", seed=2)
    rows = make_pairs(5, seed=7)
    pairs = rmlab.reward_scores(rm, rows, tokenizer=tok, progress=False)
    completions = rmlab.reward_scores(
        rm, [{"prompt": r["prompt"], "completion": r["chosen"], "id": k} for k, r in enumerate(rows)],
        tokenizer=tok, progress=False,
    )
    np.testing.assert_allclose(completions["score"], pairs["score_chosen"], atol=1e-6)
    assert list(completions["id"]) == list(range(5))
    assert list(completions["tokens"]) == list(pairs["tokens_chosen"])
    texts = rmlab.reward_scores(rm, [r["prompt"] + r["rejected"] for r in rows], tokenizer=tok, progress=False)
    np.testing.assert_allclose(texts["score"], pairs["score_rejected"], atol=1e-6)
    as_text_column = rmlab.reward_scores(
        rm, {"text": [r["prompt"] + r["rejected"] for r in rows]}, tokenizer=tok, progress=False
    )
    np.testing.assert_allclose(as_text_column["score"], texts["score"], atol=1e-9)


def test_conversations_apply_the_chat_template(tok):
    rm = tiny_reward_model("llama", seed=4)
    rows = make_pairs(4, seed=8, chat=True)
    pairs = rmlab.reward_scores(rm, rows, tokenizer=tok, progress=False)
    for i, row in enumerate(rows):
        ids = tok.apply_chat_template(row["prompt"] + row["chosen"], tokenize=True, return_dict=True)["input_ids"]
        assert pairs.at[i, "score_chosen"] == pytest.approx(brute_score(rm, ids), abs=1e-5)
    messages = [r["prompt"] + r["rejected"] for r in rows]
    single = rmlab.reward_scores(rm, messages, tokenizer=tok, progress=False)
    np.testing.assert_allclose(single["score"], pairs["score_rejected"], atol=1e-6)
    assert single.attrs["format"] == "chat"


def test_tokenisation_matches_trls_reward_trainer(tok, tmp_path):
    rm = tiny_reward_model("gpt2", seed=0)
    rows = make_pairs(6, seed=9)
    rows[1]["chosen"] += tok.eos_token  # already closed: no second EOS, in TRL and here
    trl, datasets = pytest.importorskip("trl"), pytest.importorskip("datasets")
    args = trl.RewardConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False)
    trainer = trl.RewardTrainer(
        model=rm, args=args, processing_class=tok, train_dataset=datasets.Dataset.from_list(rows)
    )
    ours = rmlab.reward_scores(rm, rows, tokenizer=tok, progress=False)
    for i, example in enumerate(trainer.train_dataset):
        for side in ("chosen", "rejected"):
            assert ours.at[i, f"score_{side}"] == pytest.approx(brute_score(rm, example[f"{side}_ids"]), abs=1e-5)


def test_multi_output_heads_need_a_label(tok):
    rm = tiny_reward_model("gpt2", seed=0, num_labels=2, id2label={0: "helpful", 1: "harmless"})
    rows = make_pairs(3)
    with pytest.raises(ModelError, match="2 outputs.*label="):
        rmlab.reward_scores(rm, rows, tokenizer=tok, progress=False)
    by_name = rmlab.reward_scores(rm, rows, tokenizer=tok, label="harmless", progress=False)
    by_index = rmlab.reward_scores(rm, rows, tokenizer=tok, label=1, progress=False)
    np.testing.assert_allclose(by_name["margin"], by_index["margin"])
    ids = expected_ids(tok, rows[0]["prompt"], rows[0]["chosen"])
    assert by_name.at[0, "score_chosen"] == pytest.approx(brute_score(rm, ids, label=1), abs=1e-5)
    with pytest.raises(ModelError, match="harmles.*Did you mean 'harmless'"):
        rmlab.reward_scores(rm, rows, tokenizer=tok, label="harmles", progress=False)


def test_wrong_kinds_of_model_are_refused_before_any_work(tok):
    with pytest.raises(ModelError, match="causal LM.*implicit_rewards"):
        rmlab.reward_scores(tiny_causal_lm("gpt2"), make_pairs(2), tokenizer=tok, progress=False)
    with pytest.raises(ModelError, match="not a causal language model"):
        rmlab.implicit_rewards(tiny_reward_model("gpt2"), tiny_causal_lm("gpt2"), make_pairs(2), tokenizer=tok)
    with pytest.raises(ModelError, match="not a sequence classifier"):
        load_reward_model(torch.nn.Linear(2, 1))


def test_bad_text_rows_name_the_row(tok):
    rm = tiny_reward_model("gpt2")
    with pytest.raises(DataError, match="Row 1, column 'completion' is an empty response"):
        rmlab.reward_scores(rm, [{"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": " "}], tokenizer=tok)
    with pytest.raises(DataError, match="none of.*Rename 'responses' to 'response'"):
        rmlab.reward_scores(rm, [{"prompt": "a", "responses": "b"}], tokenizer=tok)
    with pytest.raises(DataError, match="last message has role 'user'"):
        rmlab.reward_scores(rm, [{"messages": [{"role": "user", "content": "hi"}]}], tokenizer=tok)


def test_local_path_loading_round_trip(tok, tmp_path):
    rm = tiny_reward_model("gpt2", seed=5)
    rm.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    rows = make_pairs(3)
    from_path = rmlab.reward_scores(str(tmp_path / "rm"), rows, progress=False)
    in_memory = rmlab.reward_scores(rm, rows, tokenizer=tok, progress=False)
    np.testing.assert_allclose(from_path["margin"], in_memory["margin"], atol=1e-6)


def test_a_failing_forward_leaves_no_inference_mode_or_pad_token_behind():
    """An exception inside a scoring batch ends the batch loop's contexts at once, even while the
    traceback (which holds the loop's frame) is still alive, as pytest.raises and notebooks keep it."""
    rm, tok = tiny_reward_model("gpt2"), tiny_tokenizer()
    rm.config.pad_token_id = None
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("boom in the forward")

    rm.forward = failing
    with pytest.raises(RuntimeError, match="boom") as info:
        rmlab.reward_scores(rm, [{"prompt": "a", "chosen": " b", "rejected": " c"}], tokenizer=tok, progress=False)
    assert calls and info.value is not None  # the traceback is still referenced here
    assert not torch.is_inference_mode_enabled()
    assert torch.is_grad_enabled()
    assert rm.config.pad_token_id is None
