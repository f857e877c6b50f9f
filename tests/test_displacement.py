"""Likelihood displacement: CHES against hand computations, track_dpo against independent DPO steps."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import rmlab
from rmlab.diagnostics.displacement import ches, ches_from_sums, track_dpo
from rmlab.stats import spearman as _spearman
from rmlab.engine.hidden import response_hidden_states
from rmlab.engine.logprobs import Scored
from rmlab.errors import ArgumentError, DataError
from rmlab.toy import tiny_causal_lm, tiny_tokenizer
from tests.conftest import make_pairs

ARCHS = [("gpt2", False), ("llama", True), ("gpt_neox", False)]


def hand_encode(tok, pair):
    """prompt / prompt+response ids as TRL tokenises plain text (EOS appended), done by hand."""
    prompt = tok(pair["prompt"])["input_ids"]
    out = {}
    for side in ("chosen", "rejected"):
        full = tok(pair["prompt"] + pair[side] + tok.eos_token)["input_ids"]
        assert full[: len(prompt)] == prompt, "the test pairs keep the prompt's ids a prefix"
        out[side] = full
    return prompt, out


def last_hidden(model, ids):
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    hidden = out.hidden_states[-1][0]
    # hidden_states[-1] is the unembedding's input (after the final norm) for these architectures
    torch.testing.assert_close(model.get_output_embeddings()(hidden), out.logits[0], rtol=1e-5, atol=1e-5)
    return hidden.double()


# --------------------------------------------------------------------------------------------------
# CHES
# --------------------------------------------------------------------------------------------------
def test_ches_hand_worked_two_token_example():
    # chosen: two response tokens whose predicting hidden states are (1,0) and (0,1); rejected: (1,1), (2,0)
    h_w = np.array([[1.0, 0.0], [0.0, 1.0]])
    h_l = np.array([[1.0, 1.0], [2.0, 0.0]])
    scores, ln_scores = ches_from_sums(h_w.sum(0)[None], h_l.sum(0)[None], [2], [2])
    # H_w = (1,1), H_l = (3,1): <H_w,H_l> = 4, |H_w|^2 = 2
    assert scores[0] == pytest.approx(4 - 2)
    assert ln_scores[0] == pytest.approx(4 / (2 * 2) - 2 / 2**2)
    # a rejected response of one token: LN-CHES divides by |y_w||y_l| = 2
    scores, ln_scores = ches_from_sums(h_w.sum(0)[None], np.array([[3.0, 1.0]]), [2], [1])
    assert (scores[0], ln_scores[0]) == pytest.approx((2.0, 4 / 2 - 2 / 4))
    # identical responses are maximally similar relative to themselves: CHES = 0; empty responses: NaN
    same, _ = ches_from_sums(h_w.sum(0)[None], h_w.sum(0)[None], [2], [2])
    assert same[0] == 0.0
    assert np.isnan(ches_from_sums(h_w.sum(0)[None], h_l.sum(0)[None], [0], [2])[0][0])


@pytest.mark.parametrize("arch, bos", ARCHS)
def test_ches_equals_hand_computation_from_output_hidden_states(arch, bos):
    tok = tiny_tokenizer(add_bos=bos)
    model = tiny_causal_lm(arch, seed=3).eval()
    pairs = make_pairs(6, seed=5)
    frame = ches(model, pairs, tokenizer=tok, batch_tokens=96, progress=False)
    assert list(frame.columns[:7]) == ["pair", "ches", "ln_ches", "rank", "tokens_chosen", "tokens_rejected", "truncated"]
    assert list(frame["chosen"]) == [p["chosen"] for p in pairs]
    for i, pair in enumerate(pairs):
        prompt, full = hand_encode(tok, pair)
        start = len(prompt)
        sums, lengths = {}, {}
        for side in ("chosen", "rejected"):
            ids = full[side]
            hidden = last_hidden(model, ids)
            # the hidden states that predict each response token: last prompt token .. the one before EOS
            sums[side] = hidden[start - 1 : len(ids) - 1].sum(0)
            lengths[side] = len(ids) - start
        inner = float(sums["chosen"] @ sums["rejected"])
        square = float(sums["chosen"] @ sums["chosen"])
        expected = inner - square
        expected_ln = inner / (lengths["chosen"] * lengths["rejected"]) - square / lengths["chosen"] ** 2
        row = frame.iloc[i]
        assert row["tokens_chosen"] == lengths["chosen"] and row["tokens_rejected"] == lengths["rejected"]
        assert row["ches"] == pytest.approx(expected, rel=1e-4, abs=1e-3 * max(1.0, square) ** 0.5)
        assert row["ln_ches"] == pytest.approx(expected_ln, rel=1e-4, abs=1e-4)
    # rank 1 = highest LN-CHES
    assert frame.loc[frame["rank"] == 1, "ln_ches"].iloc[0] == frame["ln_ches"].max()
    assert sorted(frame["rank"].tolist()) == list(range(1, len(pairs) + 1))


def exact_ches(sum_w, sum_l, n_w, n_l):
    """CHES and LN-CHES of Definition 2 in exact rational arithmetic (the float64 sums are exact inputs)."""
    from fractions import Fraction

    w = [Fraction(float(v)) for v in sum_w]
    lo = [Fraction(float(v)) for v in sum_l]
    inner = sum(a * b for a, b in zip(w, lo))
    square = sum(a * a for a in w)
    return float(inner - square), float(inner / (n_w * n_l) - square / n_w**2)


@pytest.mark.parametrize("arch, norm", [("gpt2", "transformer.ln_f"), ("gpt_neox", "gpt_neox.final_layer_norm")])
def test_ches_keeps_its_digits_with_a_large_common_offset(arch, norm):
    """Long, nearly equal responses whose hidden states share a large offset (the final norm's bias):
    CHES is a small difference of two inner products of sums of ~250 hidden states of size ~100.
    Summed in float32, CHES was off by 5% to 230x and LN-CHES by up to 5x on these pairs; summed in
    float64 both match an exact (rational) computation from the model's own output_hidden_states."""
    tok = tiny_tokenizer()
    model = tiny_causal_lm(arch, seed=3).eval()
    final = model.get_submodule(norm)
    with torch.no_grad():
        final.weight.mul_(0.01)
        final.bias.copy_(100.0 + torch.randn(final.bias.shape, generator=torch.Generator().manual_seed(0)))
    phrases = ["the film was great", "the plot was slow", "a charming film", "the music was dull"]
    rng = np.random.default_rng(0)
    pairs = []
    for ending in ("!", "?", " and that is all.", " the end"):
        body = " " + " ".join(rng.choice(phrases, 40))
        pairs.append({"prompt": "Review:", "chosen": body + ".", "rejected": body + ending})
    frame = ches(model, pairs, tokenizer=tok, progress=False)
    for i, pair in enumerate(pairs):
        prompt, full = hand_encode(tok, pair)
        start = len(prompt)
        sums = {side: last_hidden(model, full[side])[start - 1 : len(full[side]) - 1].sum(0).numpy()
                for side in ("chosen", "rejected")}
        lengths = {side: len(full[side]) - start for side in ("chosen", "rejected")}
        assert lengths["chosen"] > 200
        expected, expected_ln = exact_ches(sums["chosen"], sums["rejected"], lengths["chosen"], lengths["rejected"])
        row = frame.iloc[i]
        assert row["ches"] == pytest.approx(expected, rel=1e-6, abs=1e-6)
        assert row["ln_ches"] == pytest.approx(expected_ln, rel=1e-6, abs=1e-10)


@pytest.mark.parametrize("arch, bos", ARCHS)
def test_batched_padded_hidden_sums_equal_unbatched(arch, bos):
    tok = tiny_tokenizer(add_bos=bos)
    model = tiny_causal_lm(arch, seed=4).eval()
    seqs = []
    for pair in make_pairs(7, seed=9):
        prompt, full = hand_encode(tok, pair)
        seqs += [Scored(tuple(full["chosen"]), len(prompt)), Scored(tuple(full["rejected"]), len(prompt))]
    groups = [[2 * i, 2 * i + 1] for i in range(len(seqs) // 2)]
    batched = response_hidden_states(model, seqs, groups=groups, batch_tokens=128, per_position=True, progress=False)
    for k, seq in enumerate(seqs):
        alone = response_hidden_states(model, [seq], per_position=True, progress=False)
        np.testing.assert_allclose(batched.sums[k], alone.sums[0], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(batched.positions[k], alone.positions[0], rtol=1e-4, atol=1e-5)
        assert batched.counts[k] == len(seq.ids) - seq.start
        hand = last_hidden(model, list(seq.ids))[seq.start - 1 : len(seq.ids) - 1]
        np.testing.assert_allclose(batched.positions[k], hand.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.filterwarnings("ignore::rmlab.errors.DataWarning")  # the data is bad on purpose here
def test_ches_truncated_to_nothing_is_nan_and_unranked():
    tok = tiny_tokenizer()
    pairs = make_pairs(3, seed=1) + [
        {"prompt": "Review: " + "the plot was slow " * 10, "chosen": " great", "rejected": " dull"}
    ]
    frame = ches(tiny_causal_lm("gpt2", seed=1), pairs, tokenizer=tok, max_length=12, progress=False)
    last = frame.iloc[-1]
    assert bool(last["truncated"]) and last["tokens_chosen"] == 0
    assert np.isnan(last["ches"]) and pd.isna(last["rank"])


# --------------------------------------------------------------------------------------------------
# track_dpo
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models():
    return tiny_causal_lm("gpt2", seed=1), tiny_causal_lm("gpt2", seed=0)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_step_zero_equals_implicit_rewards(models, tok, pairs):
    policy, reference = models
    beta = 0.3
    run = track_dpo(policy, reference, pairs, steps=1, lr=0.05, beta=beta, tokenizer=tok, progress=False)
    first = run.trajectories[run.trajectories["step"] == 0].reset_index(drop=True)
    expected = rmlab.implicit_rewards(policy, reference, pairs, tokenizer=tok, beta=beta, progress=False)
    for col in ["logps_chosen", "logps_rejected", "reward_chosen", "reward_rejected", "margin", "loss"]:
        np.testing.assert_allclose(first[col], expected[col], rtol=1e-4, atol=1e-4, err_msg=col)
    assert list(run.trajectories.columns) == [
        "step", "pair", "logps_chosen", "logps_rejected", "reward_chosen", "reward_rejected", "margin", "loss"
    ]
    assert "DisplacementRun: 12 pairs, steps 0..1" in repr(run)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_zero_learning_rate_changes_nothing(models, tok, pairs, optimizer):
    policy, reference = models
    run = track_dpo(policy, reference, pairs, steps=3, lr=0.0, optimizer=optimizer, tokenizer=tok, progress=False)
    t = run.trajectories
    first = t[t["step"] == 0].set_index("pair")
    for step in (1, 2, 3):
        pd.testing.assert_frame_equal(t[t["step"] == step].set_index("pair").drop(columns="step"), first.drop(columns="step"))
    assert (run.mass["gain"] == 0).all()
    assert not run.summary["displaced"].any()


def test_users_model_is_unchanged(tok, pairs):
    policy = tiny_causal_lm("gpt2", seed=1)  # also the reference, the usual SFT setup
    before = copy.deepcopy(policy.state_dict())
    run = track_dpo(policy, policy, pairs, steps=2, lr=0.5, optimizer="adam", tokenizer=tok, progress=False)
    for name, value in policy.state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0)
    assert run.model is not policy
    moved = max((a - b).abs().max().item() for a, b in zip(run.model.parameters(), policy.parameters()))
    assert moved > 1e-3, "the copy did train"


def manual_sequence_logps(model, ids, start):
    logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    logp = torch.log_softmax(logits[:-1], dim=-1).gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)
    return logp[start - 1 :].sum()


def test_one_sgd_step_equals_manual_dpo_gradient_step(models, tok):
    """An independent DPO step: hand tokenisation, full-logit log-softmax, autograd, p -= lr * grad."""
    policy, reference = models
    pairs = make_pairs(5, seed=11)
    beta, lr = 0.5, 0.3
    manual = copy.deepcopy(policy).eval()
    encoded = [hand_encode(tok, p) for p in pairs]
    terms = []
    for prompt, full in encoded:
        start = len(prompt)
        with torch.no_grad():
            ref_w = manual_sequence_logps(reference, full["chosen"], start)
            ref_l = manual_sequence_logps(reference, full["rejected"], start)
        lp_w = manual_sequence_logps(manual, full["chosen"], start)
        lp_l = manual_sequence_logps(manual, full["rejected"], start)
        terms.append(-F.logsigmoid(beta * ((lp_w - ref_w) - (lp_l - ref_l))))
    loss = torch.stack(terms).mean()
    grads = torch.autograd.grad(loss, list(manual.parameters()))
    with torch.no_grad():
        for p, g in zip(manual.parameters(), grads):
            p -= lr * g
    run = track_dpo(policy, reference, pairs, steps=1, lr=lr, beta=beta, optimizer="sgd", tokenizer=tok,
                    batch_tokens=64, progress=False)  # a small budget: the gradient is accumulated over micro-batches
    for (name, a), b in zip(run.model.named_parameters(), manual.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    after = run.trajectories[run.trajectories["step"] == 1].reset_index(drop=True)
    with torch.no_grad():
        expected = [float(manual_sequence_logps(manual, full["chosen"], len(prompt))) for prompt, full in encoded]
    np.testing.assert_allclose(after["logps_chosen"], expected, rtol=1e-5, atol=1e-4)


def run_config(**extra):
    return dict(steps=4, lr=0.05, beta=0.2, optimizer="adam", batch_size=5, seed=3, top_k=3, progress=False) | extra


class Stop(Exception):
    pass


def stop_at(step):
    def on_step(done, rows):
        assert list(rows["step"].unique()) == [done]
        if done == step:
            raise Stop
    return on_step


def assert_same_run(a, b):
    pd.testing.assert_frame_equal(a.trajectories, b.trajectories)
    pd.testing.assert_frame_equal(a.mass, b.mass)
    for x, y in zip(a.model.parameters(), b.model.parameters()):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_resume_after_interrupt_equals_uninterrupted(models, tok, pairs, tmp_path):
    policy, reference = models
    whole = track_dpo(policy, reference, pairs, tokenizer=tok, **run_config())
    # interrupted by an exception after step 2 (its rows and checkpoint are saved first), then resumed
    with pytest.raises(Stop):
        track_dpo(policy, reference, pairs, tokenizer=tok, save_dir=tmp_path / "a", on_step=stop_at(2), **run_config())
    assert sorted(p.name for p in (tmp_path / "a" / "trajectories").iterdir()) == [
        "step-000000.parquet", "step-000001.parquet", "step-000002.parquet"
    ]
    saved = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    assert saved["step"] == 2 and saved["optimizer"]["state"], "adam's moments are saved"
    calls = []
    resumed = track_dpo(policy, reference, pairs, tokenizer=tok, save_dir=tmp_path / "a",
                        on_step=lambda s, r: calls.append(s), **run_config())
    assert calls == [3, 4], "only the missing steps ran"
    assert_same_run(whole, resumed)
    # steps=2 then steps=4 (the last step is always checkpointed)
    track_dpo(policy, reference, pairs, tokenizer=tok, save_dir=tmp_path / "b", **run_config(steps=2, checkpoint_every=3))
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["step"] == 2
    grown = track_dpo(policy, reference, pairs, tokenizer=tok, save_dir=tmp_path / "b", **run_config(checkpoint_every=3))
    assert_same_run(whole, grown)
    # with a checkpoint only every 3 steps, an interrupt at step 2 resumes from step 0's and replays
    with pytest.raises(Stop):
        track_dpo(policy, reference, pairs, tokenizer=tok, save_dir=tmp_path / "c", on_step=stop_at(2),
                  **run_config(checkpoint_every=3))
    calls.clear()
    replayed = track_dpo(policy, reference, pairs, tokenizer=tok, save_dir=tmp_path / "c",
                         on_step=lambda s, r: calls.append(s), **run_config(checkpoint_every=3))
    assert calls == [1, 2, 3, 4]
    assert_same_run(whole, replayed)
    # a finished run is returned as saved
    again = track_dpo(policy, reference, pairs, tokenizer=tok, save_dir=tmp_path / "b", on_step=stop_at(1), **run_config())
    assert_same_run(whole, again)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "b" / "trajectories"), whole.trajectories,
                                  check_dtype=False, check_categorical=False)


def test_keyboard_interrupt_keeps_saved_steps(models, tok, pairs, tmp_path):
    policy, reference = models

    def interrupt(done, rows):
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt, match="resume"):
        track_dpo(policy, reference, pairs, tokenizer=tok, save_dir=tmp_path, on_step=interrupt, **run_config())
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 2
    rows = pd.read_parquet(tmp_path / "trajectories")
    assert sorted(rows["step"].unique()) == [0, 1, 2]


def test_other_configuration_in_save_dir_is_an_error(models, tok, pairs, tmp_path):
    policy, reference = models
    track_dpo(policy, reference, pairs, tokenizer=tok, save_dir=tmp_path, **run_config(steps=1))
    with pytest.raises(ArgumentError, match=r"another configuration.*lr: saved 0\.05, now 0\.1"):
        track_dpo(policy, reference, pairs, tokenizer=tok, save_dir=tmp_path, **run_config(lr=0.1))
    with pytest.raises(ArgumentError, match="data: differs"):
        track_dpo(policy, reference, pairs[:-1], tokenizer=tok, save_dir=tmp_path, **run_config())
    with pytest.raises(ArgumentError, match="policy: differs"):
        track_dpo(reference, reference, pairs, tokenizer=tok, save_dir=tmp_path, **run_config())
    with pytest.raises(ArgumentError, match="already holds 4 steps"):
        track_dpo(policy, reference, pairs, tokenizer=tok, save_dir=tmp_path / "c", **run_config())
        track_dpo(policy, reference, pairs, tokenizer=tok, save_dir=tmp_path / "c", **run_config(steps=2))


def test_mass_frame(models, tok, pairs):
    policy, reference = models
    run = track_dpo(policy, reference, pairs, steps=3, lr=0.5, tokenizer=tok, top_k=4, progress=False)
    m = run.mass
    assert list(m.columns) == ["pair", "position", "token_id", "token", "role", "gain_rank", "prob_before",
                               "prob_after", "gain", "logp_before", "logp_after", "alignment"]
    assert set(m["pair"]) <= set(range(len(pairs))) and len(set(m["pair"])) >= len(pairs) - 1
    for _, group in m.groupby("pair"):
        assert (group["role"] == "chosen").sum() == 1 and (group["role"] == "rejected").sum() == 1
        assert set(range(1, 5)) <= set(group["gain_rank"])  # the top_k, plus the two responses' tokens
        assert group["gain"].is_monotonic_decreasing
    np.testing.assert_allclose(m["gain"], m["prob_after"] - m["prob_before"], atol=1e-7)
    np.testing.assert_allclose(np.exp(m["logp_before"]), m["prob_before"], rtol=1e-6)
    # alignment <W_z, W_{y_w} - W_{y_l}> with the initial unembedding, and the position where the responses differ
    row = m.iloc[0]
    pair = pairs[int(row["pair"])]
    prompt, full = hand_encode(tok, pair)
    d = next(k for k, (a, b) in enumerate(zip(full["chosen"], full["rejected"])) if a != b)
    assert row["position"] == d - len(prompt)
    w = policy.get_output_embeddings().weight.detach().double()
    expected = float(w[int(row["token_id"])] @ (w[full["chosen"][d]] - w[full["rejected"][d]]))
    assert row["alignment"] == pytest.approx(expected, rel=1e-5, abs=1e-6)
    # the distribution before is the policy's own, at that shared context
    with torch.no_grad():
        logits = policy(input_ids=torch.tensor([full["chosen"][:d]])).logits[0, -1]
    assert row["logp_before"] == pytest.approx(float(torch.log_softmax(logits, -1)[int(row["token_id"])]), abs=1e-5)


def test_probe_pairs_are_tracked(models, tok, pairs):
    policy, reference = models
    probe = make_pairs(4, seed=21)
    run = track_dpo(policy, reference, pairs, probe=probe, steps=1, lr=0.1, tokenizer=tok, progress=False)
    assert sorted(run.trajectories["pair"].unique()) == [0, 1, 2, 3]
    assert list(run.pairs["chosen"]) == [p["chosen"] for p in probe]
    first = run.trajectories[run.trajectories["step"] == 0].reset_index(drop=True)
    expected = rmlab.implicit_rewards(policy, reference, probe, tokenizer=tok, progress=False)
    np.testing.assert_allclose(first["margin"], expected["margin"], atol=1e-6)


@pytest.mark.parametrize(
    "change, error, message",
    [
        (dict(reference=None), ArgumentError, "reference=None"),
        (dict(optimizer="adamm"), ArgumentError, "Did you mean 'adam'"),
        (dict(optimizer="rmsprop"), ArgumentError, r"choose one of \['sgd', 'adam'\]"),
        (dict(steps=0), ArgumentError, "steps=0 must be an integer >= 1"),
        (dict(steps=2.5), ArgumentError, "steps=2.5"),
        (dict(lr=-0.1), ArgumentError, "lr=-0.1 must be a finite learning rate >= 0"),
        (dict(lr=float("nan")), ArgumentError, "lr=nan"),
        (dict(beta=0), ArgumentError, "beta=0"),
        (dict(batch_size=0), ArgumentError, "batch_size=0"),
        (dict(batch_size=99), ArgumentError, "larger than the 12 pairs"),
        (dict(top_k=-1), ArgumentError, "top_k=-1"),
        (dict(max_grad_norm=0), ArgumentError, "max_grad_norm=0"),
        (dict(temperature=1.0), ArgumentError, "unexpected keyword argument 'temperature'"),
    ],
)
def test_errors(models, tok, pairs, change, error, message):
    policy, reference = models
    kwargs = dict(steps=1, lr=0.1, tokenizer=tok, progress=False) | change
    ref = kwargs.pop("reference", reference)
    with pytest.raises(error, match=message):
        track_dpo(policy, ref, pairs, **kwargs)


def test_data_too_long_is_reported_before_training(models, tok):
    policy, reference = models
    long = [{"prompt": "Review:", "chosen": " the plot was slow" * 200, "rejected": " dull"}]
    with pytest.raises(DataError, match=r"Row 0, chosen: prompt\+response is \d+ tokens but the policy model accepts at most 512"):
        track_dpo(policy, reference, long, steps=1, lr=0.1, tokenizer=tok, progress=False)
    with pytest.raises(DataError, match="accepts at most 512"):
        ches(policy, long, tokenizer=tok, progress=False)


def test_save_dir_that_is_a_file(models, tok, pairs, tmp_path):
    policy, reference = models
    path = tmp_path / "file.txt"
    path.write_text("x")
    with pytest.raises(ArgumentError, match="is a file"):
        track_dpo(policy, reference, pairs, steps=1, lr=0.1, tokenizer=tok, save_dir=path, progress=False)


# --------------------------------------------------------------------------------------------------
# the toy world
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world():
    from rmlab.toy import load

    try:
        return load()
    except rmlab.DataFileError as err:  # pragma: no cover - a checkout without data/toy
        pytest.skip(str(err))


def test_toy_world_ln_ches_predicts_single_pair_displacement(world):
    """Razin et al.'s per-pair claim: a pair with a higher (LN-)CHES lowers its own chosen log-prob more
    when DPO trains on it. One sgd step per pair, each from the SFT model (its own reference).

    Measured on held-out pairs 0-99: Spearman(LN-CHES, -delta chosen) = 0.29 (pairs 100-199: 0.34,
    200-299: 0.24); CHES 0.18; the chosen log-prob fell for 12 of the 100 pairs.
    """
    pairs = world.heldout.head(100)
    scores = ches(world.sft, pairs, tokenizer=world.tokenizer, progress=False)
    deltas = []
    for i in range(len(pairs)):
        run = track_dpo(world.sft, world.sft, pairs.iloc[[i]], steps=1, lr=0.5, tokenizer=world.tokenizer,
                        top_k=0, progress=False)
        deltas.append(run.summary["delta_chosen"].iloc[0])
    deltas = np.asarray(deltas)
    assert _spearman(scores["ln_ches"].to_numpy(), -deltas) > 0.12
    assert 0.02 <= (deltas < 0).mean() <= 0.3


def test_toy_world_joint_dpo_displaces_most_chosen_responses(world):
    """Full-batch DPO on 100 held-out pairs: the margin grows while most chosen log-probs fall.

    Measured (5 sgd steps, lr 0.5, beta 0.1): 81% of pairs displaced (pairs 100-199: 83%, 200-299: 79%),
    mean margin 0 -> ~0.2. Per-pair CHES does not rank pairs in the joint run (Spearman of LN-CHES with
    the fall -0.18 / -0.09 / +0.11): there each pair moves with the whole batch's gradient.
    """
    pairs = world.heldout.head(100)
    run = track_dpo(world.sft, world.sft, pairs, steps=5, lr=0.5, tokenizer=world.tokenizer, progress=False)
    summary = run.summary
    assert summary["displaced"].mean() > 0.6
    t = run.trajectories.groupby("step")[["logps_chosen", "margin", "loss"]].mean()
    assert t["margin"].iloc[-1] > t["margin"].iloc[0] + 0.05
    assert t["logps_chosen"].iloc[-1] < t["logps_chosen"].iloc[0]
    assert t["loss"].is_monotonic_decreasing


def test_options_object_or_flat_keywords(models, tok, pairs):
    policy, reference = models
    options = rmlab.Options(tokenizer=tok, max_length=40, batch_tokens=64, progress=False)
    flat = ches(policy, pairs, tokenizer=tok, max_length=40, batch_tokens=64, progress=False)
    pd.testing.assert_frame_equal(ches(policy, pairs, options=options), flat)
    run = track_dpo(policy, reference, pairs, steps=1, lr=0.1, options=options)
    again = track_dpo(policy, reference, pairs, steps=1, lr=0.1, tokenizer=tok, max_length=40, batch_tokens=64,
                      progress=False)
    pd.testing.assert_frame_equal(run.trajectories, again.trajectories)
    assert run.config["max_length"] == 40 and run.config["batch_tokens"] == 64
    with pytest.raises(ArgumentError, match=r"unexpected keyword argument 'batch_token'.*'batch_tokens'"):
        ches(policy, pairs, tokenizer=tok, batch_token=64)
    with pytest.raises(ArgumentError, match="unexpected keyword argument 'cache_dir'"):
        track_dpo(policy, reference, pairs, steps=1, lr=0.1, tokenizer=tok, cache_dir="x")  # save_dir resumes


def test_save_dir_of_an_older_format_is_refused(models, tok, pairs, tmp_path):
    import json

    policy, reference = models
    track_dpo(policy, reference, pairs, tokenizer=tok, save_dir=tmp_path, **run_config(steps=1))
    meta = tmp_path / "fingerprint.json"
    assert not [p.name for p in tmp_path.rglob("*.tmp")]  # every file written whole, no temporary left
    saved = json.loads(meta.read_text())
    meta.write_text(json.dumps(saved | {"format": 1}))
    with pytest.raises(ArgumentError, match="format: saved 1, now 2"):
        track_dpo(policy, reference, pairs, tokenizer=tok, save_dir=tmp_path, **run_config(steps=1))


def test_model_pair_brings_its_reference(models, tok, pairs):
    policy, reference = models
    pair = rmlab.ModelPair(policy, reference, tokenizer=tok, progress=False)
    run = track_dpo(pair, None, pairs, steps=1, lr=0.1, progress=False)
    plain = track_dpo(policy, reference, pairs, steps=1, lr=0.1, tokenizer=tok, progress=False)
    pd.testing.assert_frame_equal(run.trajectories, plain.trajectories)
    pd.testing.assert_frame_equal(ches(pair, pairs, progress=False), ches(policy, pairs, tokenizer=tok, progress=False))
