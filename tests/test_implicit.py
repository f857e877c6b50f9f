"""Implicit DPO rewards (per pair, per token, per step) against TRL's DPOTrainer and against brute-force
log-probs from the models' own forward passes."""

from __future__ import annotations

import functools

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import rmlab
from rmlab.toy import tiny_causal_lm, tiny_tokenizer
from tests.conftest import brute_force_logprobs, hand_tokenise, make_pairs
from tests.trl_reference import trl_tokenised

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


# --------------------------------------------------------------------------------------------------
# against brute force: each prompt+response alone through the model's own full forward, tokenised by
# hand (tests/conftest.py), log_softmax, summed over the response tokens
# --------------------------------------------------------------------------------------------------
MODELS = {  # arch -> (tokenizer with BOS?, policy seed, reference seed)
    "gpt2": (False, 1, 0),
    "llama": (True, 21, 22),
}


@functools.lru_cache(maxsize=None)
def brute_case(arch: str):
    """Tokenizer, models, pairs and the brute-force per-token log-probs of both models."""
    bos, policy_seed, reference_seed = MODELS[arch]
    tok = tiny_tokenizer(add_bos=bos)
    policy, reference = tiny_causal_lm(arch, seed=policy_seed), tiny_causal_lm(arch, seed=reference_seed)
    pairs = make_pairs(12, seed=4)
    pol, ref = brute_force_logprobs(policy, tok, pairs), brute_force_logprobs(reference, tok, pairs)
    return tok, policy, reference, pairs, pol, ref


# name -> (beta, with a reference model, length_normalize)
VARIANTS = {
    "dpo": (0.3, True, False),
    "dpo_length_normalized": (0.3, True, True),
    "reference_free": (2.0, False, False),
    "simpo": (2.0, False, True),  # reference-free and length-normalised (SimPO)
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("arch", sorted(MODELS))
def test_rewards_margin_correct_loss_equal_brute_force(arch, variant):
    tok, policy, reference, pairs, pol, ref = brute_case(arch)
    beta, with_reference, normalise = VARIANTS[variant]
    frame = rmlab.implicit_rewards(
        policy, reference if with_reference else None, pairs, tokenizer=tok, beta=beta,
        reference_free=not with_reference, length_normalize=normalise, progress=False,
    )
    expected = {}
    for side in ("chosen", "rejected"):
        logps = np.array([p[side].sum() for p in pol])
        ref_logps = np.array([r[side].sum() for r in ref])
        tokens = np.array([len(p[side]) for p in pol])
        score = logps - ref_logps if with_reference else logps
        if normalise:
            score = score / tokens
        expected |= {
            f"logps_{side}": logps, f"ref_logps_{side}": ref_logps, f"tokens_{side}": tokens,
            f"reward_{side}": beta * score,
        }
    margin = expected["reward_chosen"] - expected["reward_rejected"]
    loss = -F.logsigmoid(torch.tensor(margin, dtype=torch.float64)).numpy()

    assert len(frame) == len(pairs) and list(frame["pair"]) == list(range(len(pairs)))
    for col in ("tokens_chosen", "tokens_rejected"):
        np.testing.assert_array_equal(frame[col], expected[col], err_msg=col)
    for col in ("logps_chosen", "logps_rejected"):
        np.testing.assert_allclose(frame[col], expected[col], rtol=0, atol=1e-4, err_msg=col)
    for col in ("ref_logps_chosen", "ref_logps_rejected"):
        if with_reference:
            np.testing.assert_allclose(frame[col], expected[col], rtol=0, atol=1e-4, err_msg=col)
        else:
            assert frame[col].isna().all(), col
    tol = beta * 2e-5  # summed float32 log-probs agree with float64 brute force to ~2e-6 here
    for col in ("reward_chosen", "reward_rejected"):
        np.testing.assert_allclose(frame[col], expected[col], rtol=0, atol=tol, err_msg=col)
    np.testing.assert_allclose(frame["margin"], margin, rtol=0, atol=2 * tol)
    np.testing.assert_allclose(frame["loss"], loss, rtol=0, atol=2 * tol)
    clear = np.abs(margin) > 5 * tol  # the sign of a margin within rounding of 0 decides nothing
    assert clear.sum() >= len(pairs) - 1
    np.testing.assert_array_equal(frame["correct"][clear], margin[clear] > 0)
    assert 0 < (margin[clear] > 0).sum() < clear.sum(), "both outcomes, or the test of `correct` is weak"
    # TRL's logged aggregates are means over the pairs
    metrics = rmlab.dpo_metrics(frame)
    for key, value in {
        "rewards/chosen": expected["reward_chosen"].mean(),
        "rewards/rejected": expected["reward_rejected"].mean(),
        "rewards/margins": margin.mean(),
        "rewards/accuracies": (margin > 0).mean(),
        "logps/chosen": expected["logps_chosen"].mean(),
        "logps/rejected": expected["logps_rejected"].mean(),
        "loss": loss.mean(),
    }.items():
        assert metrics[key] == pytest.approx(value, abs=1e-4 if key.startswith("logps") else 2 * tol), key
    # text of the input is carried along, in order
    assert list(frame["chosen"]) == [p["chosen"] for p in pairs]


def test_token_rewards_equal_brute_force(policy, reference, tok, pairs):
    beta = 0.5
    pol = brute_force_logprobs(policy, tok, pairs)
    ref = brute_force_logprobs(reference, tok, pairs)
    tokens = rmlab.token_rewards(policy, reference, pairs, tokenizer=tok, beta=beta, progress=False)
    assert list(tokens.columns) == [
        "pair", "side", "position", "token_id", "token", "logp", "ref_logp", "reward", "cum_reward"
    ]
    assert len(tokens) == sum(len(p[side]) for p in pol for side in ("chosen", "rejected"))
    for i in range(len(pairs)):
        for side in ("chosen", "rejected"):
            rows = tokens[(tokens.pair == i) & (tokens.side == side)]
            ids, logp, ref_logp = pol[i]["ids"][side], pol[i][side], ref[i][side]
            assert list(rows["token_id"]) == ids and list(rows["position"]) == list(range(len(ids)))
            assert list(rows["token"]) == [tok.decode([t]) for t in ids]
            np.testing.assert_allclose(rows["logp"], logp, rtol=0, atol=1e-5)
            np.testing.assert_allclose(rows["ref_logp"], ref_logp, rtol=0, atol=1e-5)
            np.testing.assert_allclose(rows["reward"], beta * (logp - ref_logp), rtol=0, atol=1e-5)
            np.testing.assert_allclose(rows["cum_reward"], np.cumsum(beta * (logp - ref_logp)), rtol=0, atol=1e-4)
    # decoded tokens re-assemble the response (the last token is the appended EOS)
    first = tokens[(tokens.pair == 0) & (tokens.side == "chosen")]
    assert "".join(first["token"]) == pairs[0]["chosen"] + tok.eos_token


def test_step_rewards_of_joined_text_equal_step_lists(policy, reference, tok):
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
    assert (a[a.side == "rejected"]["step"] == [0, 1]).all()


NEWLINE_STEPS = [
    {
        "prompt": "Review:",
        "chosen": " First the plot was slow.\nThen the cast was great.\nSo I liked it.",
        "rejected": " It was dull.\nVery dull.",
    },
    {
        "prompt": "Write a short review of the movie.",
        "chosen": " The story was charming.\nThe music was wonderful.\nThe ending was weak.\nStill, a clever film.",
        "rejected": " The plot was flat!",  # a single step
    },
]


@pytest.mark.parametrize("reference_free", [False, True])
def test_step_rewards_equal_brute_force(policy, reference, tok, reference_free):
    """Steps by hand: the per-token rewards from brute-force log-probs, cut after each delimiter token.
    The delimiter "\\n" is a token of its own in these texts (checked), so where a step ends is
    unambiguous: the step it closes holds it, the next step starts with the next word."""
    beta = 0.4
    (newline,) = tok.convert_tokens_to_ids(tok.tokenize("\n"))
    pol = brute_force_logprobs(policy, tok, NEWLINE_STEPS)
    ref = brute_force_logprobs(reference, tok, NEWLINE_STEPS)
    frame = rmlab.step_rewards(
        policy, None if reference_free else reference, NEWLINE_STEPS, tokenizer=tok, beta=beta,
        delimiter="\n", reference_free=reference_free, progress=False,
    )
    assert list(frame.columns[:8]) == ["pair", "side", "step", "text", "tokens", "reward", "value", "min_step_reward"]
    assert len(frame) == sum(row[side].count("\n") + 1 for row in NEWLINE_STEPS for side in ("chosen", "rejected"))
    for i, row in enumerate(NEWLINE_STEPS):
        for side in ("chosen", "rejected"):
            ids = pol[i]["ids"][side]
            assert ids.count(newline) == row[side].count("\n")  # every delimiter is a token of its own
            per_token = beta * (pol[i][side] if reference_free else pol[i][side] - ref[i][side])
            ends = [k for k, t in enumerate(ids) if t == newline] + [len(ids) - 1]
            begins = [0] + [e + 1 for e in ends[:-1]]
            rewards = np.array([per_token[b : e + 1].sum() for b, e in zip(begins, ends)])
            values = np.cumsum(rewards)
            assert values[-1] == pytest.approx(per_token.sum())  # the sequence reward
            texts = row[side].split("\n")
            got = frame[(frame.pair == i) & (frame.side == side)]
            assert list(got["step"]) == list(range(len(ends))), (i, side)
            assert list(got["tokens"]) == [e + 1 - b for b, e in zip(begins, ends)]
            assert list(got["text"]) == [t + "\n" for t in texts[:-1]] + [texts[-1] + tok.eos_token]
            np.testing.assert_allclose(got["reward"], rewards, rtol=0, atol=1e-5)
            np.testing.assert_allclose(got["value"], values, rtol=0, atol=1e-5)
            np.testing.assert_allclose(got["min_step_reward"], rewards.min(), rtol=0, atol=1e-5)
            if len(rewards) > 2:  # the minimum is informative: neither the first nor the last step alone
                assert np.ptp(rewards) > 1e-3


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
    assert np.isnan(f["reward_chosen"].iloc[0]) and f["correct"].iloc[0] is pd.NA
    assert rmlab.dpo_metrics(f)["truncated"] == 1.0


# --------------------------------------------------------------------------------------------------
# pairs whose responses are truncated to nothing (keep_start, a prompt that fills max_length)
# --------------------------------------------------------------------------------------------------
LONG_PROMPT = {"prompt": "Review: " + "the plot was slow and " * 6, "chosen": " great", "rejected": " dull and long"}


def emptied_case(tok):
    """Pairs none of which max_length cuts, and a last one whose prompt alone fills it."""
    pairs = make_pairs(6, seed=5) + [dict(LONG_PROMPT)]
    max_length = max(len(ids) for row in pairs[:-1] for ids, _ in hand_tokenise(tok, row).values())
    assert len(tok(LONG_PROMPT["prompt"])["input_ids"]) >= max_length
    return pairs, max_length


@pytest.mark.filterwarnings("ignore::rmlab.errors.DataWarning")  # the data is bad on purpose here
def test_pair_without_response_has_no_result_and_metrics_equal_trl(tmp_path, tok, policy, reference):
    """No scored token: NaN rewards, margin and loss, and ``correct`` NA (not False). TRL 1.16 drops
    the pair before evaluating, and dpo_metrics leaves it out the same way."""
    pairs, max_length = emptied_case(tok)
    frame = rmlab.implicit_rewards(policy, reference, pairs, tokenizer=tok, max_length=max_length, progress=False)
    last = frame.iloc[-1]
    assert last["tokens_chosen"] == last["tokens_rejected"] == 0 and bool(last["truncated"])
    assert np.isnan(last["margin"]) and np.isnan(last["loss"]) and np.isnan(last["reward_chosen"])
    assert frame["correct"].iloc[-1] is pd.NA and frame["correct"].iloc[:-1].notna().all()
    assert not frame["truncated"].iloc[:-1].any()
    expected = trl_eval_metrics(policy, reference, tok, pairs, 0.1, tmp_path, max_length=max_length)
    got = rmlab.dpo_metrics(frame)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=2e-5, rel=1e-5), key
    assert got["pairs"] == len(pairs) and got["pairs_scored"] == len(pairs) - 1


@pytest.mark.filterwarnings("ignore::rmlab.errors.DataWarning")  # the data is bad on purpose here
def test_empty_responses_zero_equals_trl_loss_on_the_pair(tmp_path, tok, policy, reference):
    """``empty_responses="zero"``: what TRL's loss computes when the pair reaches it (its keep_start
    filter bypassed: TRL's own tokenize_fn, collator and compute_loss on all pairs in one batch), and
    by hand: the empty pair adds reward 0, margin 0, accuracy 0 and loss log 2 to the means of the
    brute-force values of the other pairs."""
    trl, datasets = pytest.importorskip("trl"), pytest.importorskip("datasets")
    beta = 0.1
    pairs, max_length = emptied_case(tok)
    frame = rmlab.implicit_rewards(policy, reference, pairs, tokenizer=tok, beta=beta, max_length=max_length,
                                   progress=False)
    got = rmlab.dpo_metrics(frame, empty_responses="zero")
    assert got["pairs_scored"] == len(pairs)

    examples = trl_tokenised(tok, pairs, tmp_path)  # max_length only in the collator: nothing dropped
    assert len(examples) == len(pairs)
    # after trl_tokenised: a new TrainingArguments resets the accelerator state a trainer holds
    args = trl.DPOConfig(
        output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False, beta=beta, max_length=max_length,
        dataset_num_proc=None,
    )
    trainer = trl.DPOTrainer(model=policy, ref_model=reference, args=args, processing_class=tok,
                             train_dataset=datasets.Dataset.from_list(pairs))
    batch = trainer.data_collator(examples)
    assert batch["completion_mask"][[len(pairs) - 1, 2 * len(pairs) - 1]].sum() == 0
    trainer.model.eval()
    with torch.no_grad():
        loss = float(trainer.compute_loss(trainer.model, batch))
    logged = {key: values[-1] for key, values in trainer._metrics["eval"].items()}
    assert got["loss"] == pytest.approx(loss, abs=2e-5, rel=1e-5)
    for key in TRL_METRICS:
        assert got[key] == pytest.approx(logged[key], abs=2e-5, rel=1e-5), key

    pol, ref = brute_force_logprobs(policy, tok, pairs[:-1]), brute_force_logprobs(reference, tok, pairs[:-1])
    rewards = {s: beta * np.array([p[s].sum() - r[s].sum() for p, r in zip(pol, ref)]) for s in ("chosen", "rejected")}
    margin = rewards["chosen"] - rewards["rejected"]
    n = len(pairs)
    by_hand = {
        "rewards/chosen": rewards["chosen"].sum() / n,
        "rewards/margins": margin.sum() / n,
        "rewards/accuracies": (margin > 0).sum() / n,
        "logps/chosen": sum(p["chosen"].sum() for p in pol) / n,
        "loss": (-F.logsigmoid(torch.tensor(margin, dtype=torch.float64)).sum().item() + np.log(2)) / n,
    }
    for key, value in by_hand.items():
        assert got[key] == pytest.approx(value, abs=1e-4 if key.startswith("logps") else 1e-5), key


def test_empty_responses_is_checked(tok, policy, reference):
    frame = rmlab.implicit_rewards(policy, reference, make_pairs(2), tokenizer=tok, progress=False)
    with pytest.raises(rmlab.ArgumentError, match="empty_responses"):
        rmlab.dpo_metrics(frame, empty_responses="nan")


def test_models_load_from_local_paths(tmp_path, policy, reference, tok, pairs):
    """The hub-name code path (from_pretrained) on local folders, tokenizer found beside the model."""
    for name, model in (("policy", policy), ("reference", reference)):
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    assert (tmp_path / "policy" / "model.safetensors").exists()
    from_paths = rmlab.implicit_rewards(str(tmp_path / "policy"), tmp_path / "reference", pairs, progress=False)
    from_objects = rmlab.implicit_rewards(policy, reference, pairs, tokenizer=tok, progress=False)
    np.testing.assert_allclose(from_paths["margin"], from_objects["margin"], atol=1e-6)
