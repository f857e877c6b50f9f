"""Numerics: low-precision results agree with fp32 within the tolerances of docs/numerics.md,
extreme log-probs stay finite and exact, and one seed gives bit-identical frames on a CPU.

The tolerances below are the documented ones (docs/numerics.md, "Tolerances"); the measured
differences they were set from are in the same document. Change both together.
"""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

import rmlab
import rmlab.toy
from rmlab.engine.logprobs import Scored, selective_log_softmax, token_logprobs
from rmlab.toy import tiny_causal_lm, tiny_tokenizer
from tests.conftest import make_pairs

BETA = 0.1

#: Documented tolerances against fp32 (docs/numerics.md). ``tok``: one token's log-prob; ``seq``:
#: coefficient of sqrt(n) for a log-prob summed over n response tokens; ``score``: one reward-model
#: score (pooled or at one prefix).
TOL = {
    torch.bfloat16: {"tok": 0.15, "seq": 0.10, "score": 0.05},
    torch.float16: {"tok": 0.02, "seq": 0.012, "score": 0.005},
}


def _fp16_unsupported() -> str | None:
    """Why float16 cannot run on this CPU (None when it can)."""
    try:
        model = tiny_causal_lm("gpt2", vocab_size=32, n_embd=8, n_layer=1, n_head=1).to(torch.float16)
        with torch.inference_mode():
            out = model(input_ids=torch.tensor([[1, 2, 3]])).logits
        if not torch.isfinite(out).all():
            return "float16 forward gives non-finite logits on this CPU"
    except (RuntimeError, NotImplementedError) as err:  # "... not implemented for 'Half'"
        return f"float16 kernels missing on this CPU: {err}"
    return None


_FP16_SKIP = _fp16_unsupported()
LOW = [
    torch.bfloat16,
    pytest.param(torch.float16, marks=pytest.mark.skipif(_FP16_SKIP is not None, reason=str(_FP16_SKIP))),
]


def cast(model, dtype):
    """A copy of ``model`` in ``dtype`` (the original stays fp32)."""
    return copy.deepcopy(model).to(dtype)


@pytest.fixture(scope="module")
def heldout(world):
    return world.heldout.iloc[:24].reset_index(drop=True)


@pytest.fixture(scope="module")
def fp32_frames(world, heldout):
    kw = dict(tokenizer=world.tokenizer, progress=False)
    return {
        "implicit": rmlab.implicit_rewards(world.dpo[0.1], world.sft, heldout, beta=BETA, **kw),
        "tokens": rmlab.token_rewards(world.dpo[0.1], world.sft, heldout, beta=BETA, **kw),
        "scores": rmlab.reward_scores(world.reward_models[0], heldout, **kw),
        "dense": rmlab.dense_rewards(world.reward_models[0], heldout, **kw),
    }


def _assert_within(got, expected, tol, what):
    got, expected, tol = np.broadcast_arrays(*(np.atleast_1d(np.asarray(v, dtype=np.float64)) for v in (got, expected, tol)))
    assert np.isfinite(got).all(), f"{what}: non-finite values"
    excess = np.abs(got - expected) - tol
    worst = int(np.argmax(excess))
    assert excess[worst] <= 0, (
        f"{what}: |diff| {abs(got - expected)[worst]:.4g} > tolerance {tol[worst]:.4g}"
    )


# --------------------------------------------------------------------------------------------------
# fp32 against bf16 / fp16 on the toy world (trained models, realistic log-prob ranges)


@pytest.mark.parametrize("dtype", LOW)
def test_implicit_rewards_agree_with_fp32(world, heldout, fp32_frames, dtype):
    tol = TOL[dtype]
    ref32 = fp32_frames["implicit"]
    low = rmlab.implicit_rewards(
        cast(world.dpo[0.1], dtype), cast(world.sft, dtype), heldout, tokenizer=world.tokenizer, beta=BETA,
        progress=False,
    )
    seq = {side: tol["seq"] * np.sqrt(ref32[f"tokens_{side}"]) for side in ("chosen", "rejected")}
    for side in ("chosen", "rejected"):
        for col in (f"logps_{side}", f"ref_logps_{side}"):
            _assert_within(low[col], ref32[col], seq[side], col)
        _assert_within(low[f"reward_{side}"], ref32[f"reward_{side}"], BETA * 2 * seq[side], f"reward_{side}")
    margin_tol = BETA * 2 * (seq["chosen"] + seq["rejected"])
    _assert_within(low["margin"], ref32["margin"], margin_tol, "margin")
    _assert_within(low["loss"], ref32["loss"], margin_tol, "loss")  # |dloss/dmargin| <= 1
    clear = ref32["margin"].abs() > margin_tol  # the sign of a margin within tolerance of 0 may flip
    assert (low["correct"][clear] == ref32["correct"][clear]).all()
    assert (low["tokens_chosen"] == ref32["tokens_chosen"]).all()


@pytest.mark.parametrize("dtype", LOW)
def test_token_rewards_agree_with_fp32(world, heldout, fp32_frames, dtype):
    tol = TOL[dtype]
    ref32 = fp32_frames["tokens"]
    low = rmlab.token_rewards(
        cast(world.dpo[0.1], dtype), cast(world.sft, dtype), heldout, tokenizer=world.tokenizer, beta=BETA,
        progress=False,
    )
    assert (low["token_id"] == ref32["token_id"]).all()
    _assert_within(low["logp"], ref32["logp"], tol["tok"], "logp")
    _assert_within(low["ref_logp"], ref32["ref_logp"], tol["tok"], "ref_logp")
    _assert_within(low["reward"], ref32["reward"], BETA * 2 * tol["tok"], "reward")
    cum_tol = BETA * 2 * tol["seq"] * np.sqrt(ref32["position"] + 1)
    _assert_within(low["cum_reward"], ref32["cum_reward"], cum_tol, "cum_reward")


@pytest.mark.parametrize("dtype", LOW)
def test_reward_scores_agree_with_fp32(world, heldout, fp32_frames, dtype):
    tol = TOL[dtype]["score"]
    ref32 = fp32_frames["scores"]
    low = rmlab.reward_scores(cast(world.reward_models[0], dtype), heldout, tokenizer=world.tokenizer, progress=False)
    for col in ("score_chosen", "score_rejected"):
        _assert_within(low[col], ref32[col], tol, col)
    _assert_within(low["margin"], ref32["margin"], 2 * tol, "margin")
    _assert_within(low["prob_chosen"], ref32["prob_chosen"], 2 * tol / 4, "prob_chosen")  # sigmoid' <= 1/4
    clear = ref32["margin"].abs() > 2 * tol
    assert (low["correct"][clear] == ref32["correct"][clear]).all()


@pytest.mark.parametrize("dtype", LOW)
def test_dense_rewards_agree_with_fp32(world, heldout, fp32_frames, dtype):
    tol = TOL[dtype]["score"]
    ref32 = fp32_frames["dense"]
    low = rmlab.dense_rewards(cast(world.reward_models[0], dtype), heldout, tokenizer=world.tokenizer, progress=False)
    assert low.attrs["method"] == ref32.attrs["method"] == "one_pass"
    assert (low["token_id"] == ref32["token_id"]).all()
    _assert_within(low["prefix_score"], ref32["prefix_score"], tol, "prefix_score")
    _assert_within(low["reward"], ref32["reward"], 2 * tol, "reward")  # s_t - s_{t-1}
    _assert_within(low["cum_reward"], ref32["cum_reward"], 2 * tol, "cum_reward")  # s_t - s_prompt


def test_loading_in_bf16_from_a_path_equals_casting(world, heldout):
    """dtype='bfloat16' with a local path loads bf16 weights: the same numbers as a cast model."""
    pairs = heldout.iloc[:6]
    kw = dict(tokenizer=world.tokenizer, beta=BETA, progress=False, device="cpu")
    loaded = rmlab.implicit_rewards(world.dpo_paths[0.1], world.sft_path, pairs, dtype="bfloat16", **kw)
    casted = rmlab.implicit_rewards(cast(world.dpo[0.1], torch.bfloat16), cast(world.sft, torch.bfloat16), pairs, **kw)
    pd.testing.assert_frame_equal(loaded, casted)


# --------------------------------------------------------------------------------------------------
# extreme log-probs


def _brute_force64(model, seq) -> np.ndarray:
    """float64 model, whole sequence, plain log_softmax: the reference for the engine."""
    model64 = cast(model, torch.float64)
    with torch.no_grad():
        logits = model64(input_ids=torch.tensor([list(seq.ids)])).logits[0]
    logp = torch.log_softmax(logits, dim=-1)
    return np.array([logp[t - 1, seq.ids[t]].item() for t in range(seq.start, len(seq.ids))])


def test_responses_that_fill_the_context_stay_finite_and_exact(world):
    """A response up to the last position of the toy policy's 128-token context, truncated there."""
    tok = world.tokenizer
    limit = world.sft.config.n_positions
    prompt = world.prompts[0]
    response = " " + " ".join(["the plot was dull and the acting was wonderful"] * 30)
    pairs = [{"prompt": prompt, "chosen": response, "rejected": response[: len(response) // 3]}]
    frames = {}
    for dtype in (torch.float32, torch.bfloat16):
        frames[dtype] = rmlab.token_rewards(
            cast(world.dpo[0.1], dtype), cast(world.sft, dtype), pairs, tokenizer=tok, beta=BETA,
            max_length=limit, progress=False,
        )
        assert np.isfinite(frames[dtype][["logp", "ref_logp", "reward"]].to_numpy()).all(), dtype
    chosen = frames[torch.float32].query("side == 'chosen'")
    n = len(chosen)
    prompt_ids = tok(prompt)["input_ids"]
    assert len(prompt_ids) + n == limit  # the chosen response runs to the end of the context
    seq = Scored(tuple(prompt_ids) + tuple(chosen["token_id"]), len(prompt_ids))
    np.testing.assert_allclose(chosen["logp"], _brute_force64(world.dpo[0.1], seq), atol=1e-4)
    low = frames[torch.bfloat16].query("side == 'chosen'")
    _assert_within(low["logp"], chosen["logp"], TOL[torch.bfloat16]["tok"], "logp")
    _assert_within(low["logp"].sum(), chosen["logp"].sum(), TOL[torch.bfloat16]["seq"] * math.sqrt(n), "lp(y)")
    frame = rmlab.implicit_rewards(world.dpo[0.1], world.sft, pairs, tokenizer=tok, max_length=limit, progress=False)
    assert frame["truncated"].iloc[0] and np.isfinite(frame[["margin", "loss"]].to_numpy()).all()


def test_five_hundred_token_responses_stay_finite_and_exact():
    """A random GPT-2 at its 512-token context: fp32 equals a float64 forward, bf16 within tolerance."""
    tok = tiny_tokenizer()
    model = tiny_causal_lm("gpt2", seed=11)
    rng = np.random.default_rng(0)
    ids = tuple(int(i) for i in rng.integers(5, len(tok), size=512))
    seq = Scored(ids, 12)
    expected = _brute_force64(model, seq)
    got = token_logprobs(model, [seq], progress=False)[0]
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert abs(got.sum(dtype=np.float64) - expected.sum()) < 1e-3
    low = token_logprobs(cast(model, torch.bfloat16), [seq], progress=False)[0]
    _assert_within(low, expected, TOL[torch.bfloat16]["tok"], "bf16 logp")
    _assert_within(low.sum(dtype=np.float64), expected.sum(), TOL[torch.bfloat16]["seq"] * math.sqrt(len(low)), "bf16 lp(y)")


def _sharp_llama(scale: float):
    """A Llama whose unembedding is scaled so that typical target tokens get probability ~1e-30."""
    model = tiny_causal_lm("llama", seed=5)
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    return model


def test_near_zero_probabilities_stay_finite_and_close_to_float64():
    tok = tiny_tokenizer()
    model = _sharp_llama(400.0)
    encoded = rmlab.io.tokenize.encode_pairs(rmlab.load_pairs(make_pairs(4, seed=3)), tok)
    seqs = [s for p in encoded for s in (p.chosen, p.rejected)]
    expected = [_brute_force64(model, s) for s in seqs]
    flat = np.concatenate(expected)
    assert np.median(flat) < -40 and flat.min() < -69  # probabilities well below 1e-30 occur
    got = token_logprobs(model, seqs, progress=False)
    for g, e in zip(got, expected):
        assert np.isfinite(g).all()
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-3)
    # bf16 weights: finite, and off by a bf16 rounding of the logits (relative, not absolute)
    low = token_logprobs(cast(model, torch.bfloat16), seqs, progress=False)
    for g, e in zip(low, expected):
        assert np.isfinite(g).all()
        _assert_within(g, e, 0.03 * np.abs(e) + TOL[torch.bfloat16]["tok"], "bf16 near-zero probabilities")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_selective_log_softmax_of_low_precision_logits_equals_float64(dtype):
    """Given logits in bf16/fp16, the result is the float64 log-softmax of those same values."""
    gen = torch.Generator().manual_seed(0)
    limit = 6e4 if dtype == torch.float16 else 1e4
    logits = (torch.randn(64, 5000, generator=gen) * 40).clamp(-limit, limit).to(dtype)
    labels = torch.randint(0, 5000, (64,), generator=gen)
    logits[0, labels[0]] = -limit  # probability exp(-1e4): zero in every float format
    logits[1, labels[1]] = limit  # probability 1
    logits[2] = 0  # uniform
    expected = torch.log_softmax(logits.double(), dim=-1).gather(1, labels[:, None]).squeeze(1)
    for chunk_rows in (None, 1, 7):
        got = selective_log_softmax(logits, labels, chunk_rows=chunk_rows)
        assert got.dtype == torch.float32 and torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), expected, rtol=2e-6, atol=1e-4)
    assert got[0].item() < -limit / 2 and abs(got[1].item()) < 1e-6
    assert abs(got[2].item() + math.log(5000)) < 1e-5
    if dtype == torch.bfloat16:
        # a log-softmax in bf16 itself (what a framework without the upcast would compute) is worse
        naive = torch.log_softmax(logits, dim=-1).gather(1, labels[:, None]).squeeze(1).double()
        assert (naive - expected).abs().max() > 10 * (got.double() - expected).abs().max()


def test_non_finite_logits_are_reported_not_silent():
    """An fp16 model whose logits overflow (> 65504) gives NaN log-probs, with a warning saying why."""
    if _FP16_SKIP:
        pytest.skip(_FP16_SKIP)
    tok = tiny_tokenizer()
    model = _sharp_llama(1e6).to(torch.float16)
    encoded = rmlab.io.tokenize.encode_pairs(rmlab.load_pairs(make_pairs(2, seed=1)), tok)
    seqs = [s for p in encoded for s in (p.chosen, p.rejected)]
    with pytest.warns(RuntimeWarning, match="non-finite log-probs.*float16"):
        got = token_logprobs(model, seqs, progress=False)
    assert not all(np.isfinite(g).all() for g in got)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # finite results never warn
        token_logprobs(tiny_causal_lm("llama", seed=5), seqs, progress=False)


# --------------------------------------------------------------------------------------------------
# determinism: one seed, bit-identical frames


def test_implicit_rewards_are_bit_identical_across_runs(tok, pairs):
    run = lambda: rmlab.implicit_rewards(  # noqa: E731
        tiny_causal_lm("llama", seed=1), tiny_causal_lm("llama", seed=0), pairs, tokenizer=tok, progress=False
    )
    first = run()  # fresh models: the first call also runs the once-per-model checks
    pd.testing.assert_frame_equal(first, run(), check_exact=True)
    policy, reference = tiny_causal_lm("gpt2", seed=1), tiny_causal_lm("gpt2", seed=0)
    a = rmlab.implicit_rewards(policy, reference, pairs, tokenizer=tok, progress=False)
    b = rmlab.implicit_rewards(policy, reference, pairs, tokenizer=tok, progress=False)  # checks cached
    pd.testing.assert_frame_equal(a, b, check_exact=True)


def test_sample_is_bit_identical_for_one_seed(tok):
    model = tiny_causal_lm("gpt2", seed=2)
    run = lambda seed: rmlab.sample(  # noqa: E731
        model, ["Review:", "Describe the film."], n=3, max_new_tokens=8, seed=seed, tokenizer=tok,
        temperature=1.3, top_p=0.9, progress=False,
    )
    first = run(4)
    pd.testing.assert_frame_equal(first, run(4), check_exact=True)
    assert first["tokens"].tolist() != run(5)["tokens"].tolist()


def test_gradient_entanglement_is_bit_identical_across_runs(tok):
    pairs = make_pairs(4, seed=8)
    run = lambda: rmlab.gradient_entanglement(  # noqa: E731
        tiny_causal_lm("gpt2", seed=1), pairs, reference=tiny_causal_lm("gpt2", seed=0), tokenizer=tok,
        projection_dim=64, seed=3, realised=True, progress=False,
    )
    pd.testing.assert_frame_equal(run(), run(), check_exact=True)
