"""Implicit DPO rewards against TRL's DPOTrainer and against hand computations."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import rmlab
from rmlab.toy import tiny_causal_lm, tiny_tokenizer
from tests.conftest import make_pairs

TRL_METRICS = [
    "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
    "logps/chosen", "logps/rejected",
]


def trl_eval_metrics(policy, reference, tok, pairs, beta, tmp_path, **config):
    """What TRL's DPOTrainer logs when evaluating these pairs in one batch (fp32: bf16=False)."""
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    args = trl.DPOConfig(
        output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False, beta=beta,
        per_device_eval_batch_size=len(pairs), dataset_num_proc=None, **config,
    )
    data = datasets.Dataset.from_list(pairs)
    trainer = trl.DPOTrainer(
        model=policy, ref_model=reference, args=args, processing_class=tok,
        train_dataset=data, eval_dataset=data,
    )
    metrics = trainer.evaluate()
    return {k: metrics[f"eval_{k}"] for k in TRL_METRICS} | {"loss": metrics["eval_loss"]}


@pytest.mark.parametrize(
    "arch, chat, bos",
    [("gpt2", False, False), ("llama", False, True), ("gpt_neox", True, False)],
)
def test_metrics_equal_trl(arch, chat, bos, tmp_path):
    tok = tiny_tokenizer(add_bos=bos)
    policy, reference = tiny_causal_lm(arch, seed=11), tiny_causal_lm(arch, seed=12)
    pairs = make_pairs(10, seed=7, chat=chat)
    beta = 0.25
    expected = trl_eval_metrics(policy, reference, tok, pairs, beta, tmp_path)
    frame = rmlab.implicit_rewards(policy, reference, pairs, tokenizer=tok, beta=beta, progress=False)
    got = rmlab.dpo_metrics(frame)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=2e-5, rel=1e-5), key
    assert 0 < got["rewards/accuracies"] < 1, "a degenerate accuracy would not test the comparison"


@pytest.mark.filterwarnings("ignore::rmlab.errors.DataWarning")  # the data is bad on purpose here
def test_metrics_equal_trl_with_truncation(tmp_path, tok, policy, reference):
    pairs = make_pairs(8, seed=3)
    expected = trl_eval_metrics(policy, reference, tok, pairs, 0.1, tmp_path, max_length=14)
    frame = rmlab.implicit_rewards(policy, reference, pairs, tokenizer=tok, max_length=14, progress=False)
    assert frame["truncated"].any()
    got = rmlab.dpo_metrics(frame)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=2e-5, rel=1e-5), key


def test_columns_and_hand_computation(policy, reference, tok, pairs):
    beta = 0.3
    f = rmlab.implicit_rewards(policy, reference, pairs, tokenizer=tok, beta=beta, progress=False)
    for col in [
        "logps_chosen", "logps_rejected", "ref_logps_chosen", "ref_logps_rejected", "reward_chosen",
        "reward_rejected", "margin", "correct", "tokens_chosen", "tokens_rejected", "truncated",
    ]:
        assert col in f.columns
    assert len(f) == len(pairs) and list(f["pair"]) == list(range(len(pairs)))
    np.testing.assert_allclose(f["reward_chosen"], beta * (f["logps_chosen"] - f["ref_logps_chosen"]))
    np.testing.assert_allclose(f["margin"], f["reward_chosen"] - f["reward_rejected"])
    assert (f["correct"] == (f["margin"] > 0)).all()
    loss = -F.logsigmoid(torch.tensor(f["margin"].to_numpy())).numpy()
    np.testing.assert_allclose(f["loss"], loss, rtol=1e-10)
    # text of the input is carried along, in order
    assert list(f["chosen"]) == [p["chosen"] for p in pairs]


def test_reference_free_and_length_normalised(policy, tok, pairs):
    beta = 2.0
    plain = rmlab.implicit_rewards(policy, None, pairs, tokenizer=tok, beta=beta, reference_free=True, progress=False)
    simpo = rmlab.implicit_rewards(
        policy, None, pairs, tokenizer=tok, beta=beta, reference_free=True, length_normalize=True, progress=False
    )
    assert plain["ref_logps_chosen"].isna().all()
    np.testing.assert_allclose(plain["reward_chosen"], beta * plain["logps_chosen"])
    np.testing.assert_allclose(simpo["reward_rejected"], beta * plain["logps_rejected"] / plain["tokens_rejected"])


def test_token_rewards_sum_to_sequence_rewards(policy, reference, tok, pairs):
    beta = 0.5
    seq = rmlab.implicit_rewards(policy, reference, pairs, tokenizer=tok, beta=beta, progress=False)
    tokens = rmlab.token_rewards(policy, reference, pairs, tokenizer=tok, beta=beta, progress=False)
    assert list(tokens.columns) == [
        "pair", "side", "position", "token_id", "token", "logp", "ref_logp", "reward", "cum_reward"
    ]
    sums = tokens.groupby(["pair", "side"], observed=True)["reward"].sum().unstack()
    np.testing.assert_allclose(sums["chosen"], seq["reward_chosen"], atol=1e-6)
    np.testing.assert_allclose(sums["rejected"], seq["reward_rejected"], atol=1e-6)
    last = tokens.groupby(["pair", "side"], observed=True)["cum_reward"].last().unstack()
    np.testing.assert_allclose(last["chosen"], seq["reward_chosen"], atol=1e-6)
    counts = tokens.groupby(["pair", "side"], observed=True).size().unstack()
    assert (counts["chosen"].to_numpy() == seq["tokens_chosen"].to_numpy()).all()
    np.testing.assert_allclose(tokens["reward"], beta * (tokens["logp"] - tokens["ref_logp"]), rtol=1e-6)
    # decoded tokens re-assemble the response (the last token is the appended EOS)
    first = tokens[(tokens.pair == 0) & (tokens.side == "chosen")]
    assert "".join(first["token"]) == pairs[0]["chosen"] + tok.eos_token


def test_step_rewards(policy, reference, tok):
    steps = [["First the plot was slow.", "Then the cast was great.", "So I liked it."]]
    joined = [
        {"prompt": "Review:", "chosen": " " + "\n\n".join(steps[0]), "rejected": " It was dull.\n\nVery dull."}
    ]
    as_lists = [{"prompt": "Review:", "chosen": [" " + steps[0][0], *steps[0][1:]],
                 "rejected": [" It was dull.", "Very dull."]}]
    a = rmlab.step_rewards(policy, reference, joined, tokenizer=tok, progress=False)
    b = rmlab.step_rewards(policy, reference, as_lists, tokenizer=tok, progress=False)
    pd.testing.assert_frame_equal(a, b)
    chosen = a[a.side == "chosen"]
    assert list(chosen["step"]) == [0, 1, 2]
    assert chosen["text"].iloc[1].strip() == "Then the cast was great."
    seq = rmlab.implicit_rewards(policy, reference, joined, tokenizer=tok, progress=False)
    assert chosen["reward"].sum() == pytest.approx(seq["reward_chosen"].iloc[0], abs=1e-6)
    np.testing.assert_allclose(chosen["value"], np.cumsum(chosen["reward"]), atol=1e-9)
    assert chosen["min_step_reward"].iloc[0] == pytest.approx(chosen["reward"].min())
    assert (a[a.side == "rejected"]["step"] == [0, 1]).all()


@pytest.mark.filterwarnings("ignore::rmlab.errors.DataWarning")  # the data is bad on purpose here
def test_truncated_pairs_are_reported_not_dropped(policy, reference, tok, pairs):
    full = rmlab.implicit_rewards(policy, reference, pairs, tokenizer=tok, progress=False)
    limit = int(np.median(full["prompt_tokens"] + full[["tokens_chosen", "tokens_rejected"]].max(axis=1)))
    f = rmlab.implicit_rewards(policy, reference, pairs, tokenizer=tok, max_length=limit, progress=False)
    assert len(f) == len(pairs)
    assert f["truncated"].any() and not f["truncated"].all()
    long_prompt = [{"prompt": "Review: " + "the plot was slow " * 10, "chosen": " great", "rejected": " dull"}]
    f = rmlab.implicit_rewards(policy, reference, long_prompt, tokenizer=tok, max_length=12, progress=False)
    assert bool(f["truncated"].iloc[0]) and f["tokens_chosen"].iloc[0] == 0
    assert np.isnan(f["reward_chosen"].iloc[0]) and not bool(f["correct"].iloc[0])
    assert rmlab.dpo_metrics(f)["truncated"] == 1.0


def test_models_load_from_local_paths(tmp_path, policy, reference, tok, pairs):
    """The hub-name code path (from_pretrained) on local folders, tokenizer found beside the model."""
    for name, model in (("policy", policy), ("reference", reference)):
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    assert (tmp_path / "policy" / "model.safetensors").exists()
    from_paths = rmlab.implicit_rewards(str(tmp_path / "policy"), tmp_path / "reference", pairs, progress=False)
    from_objects = rmlab.implicit_rewards(policy, reference, pairs, tokenizer=tok, progress=False)
    np.testing.assert_allclose(from_paths["margin"], from_objects["margin"], atol=1e-6)
