"""rmlab.sample: shape, exact log-probs, reproducibility, EOS handling, chat prompts, resuming, errors."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import torch

import rmlab
import rmlab.engine.sampling as sampling
from rmlab.engine.sampling import SamplingInterrupted, completion_logprobs, sample
from rmlab.engine.vllm_backend import vllm_available
from rmlab.toy import tiny_causal_lm, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models run fastest on one thread

PROMPTS = ["The movie was", "Write a short review of the movie.", "A"]


def plain_logp(model, prompt_ids, tokens) -> float:
    """Independent check: one unpadded forward and a full log-softmax, one sequence at a time."""
    ids = torch.tensor([list(prompt_ids) + list(tokens)])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    start = len(prompt_ids)
    return float(sum(logp[start + t - 1, tok] for t, tok in enumerate(tokens)))


def sharpened(seed: int, scale: float = 10.0):
    """A tiny GPT-2 whose next-token distributions are far from uniform (scaled output layer)."""
    model = tiny_causal_lm("gpt2", seed=seed, tie_word_embeddings=False)
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    return model


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gpt_neox"])
def test_rows_columns_and_logp_equal_a_plain_forward(arch, tok):
    model = tiny_causal_lm(arch, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the sampler's own log-probs must agree with the engine
        frame = sample(model, PROMPTS, n=3, max_new_tokens=7, tokenizer=tok, progress=False)
    assert list(frame.columns) == list(sampling.SAMPLE_COLUMNS)
    assert len(frame) == 9
    assert frame.groupby("prompt_index")["sample"].apply(list).tolist() == [[0, 1, 2]] * 3
    assert frame["prompt"].tolist() == [p for p in PROMPTS for _ in range(3)]
    assert (frame["n_tokens"] == frame["tokens"].map(len)).all()
    for row in frame.itertuples():
        expected = plain_logp(model, tok(row.prompt)["input_ids"], row.tokens)
        assert row.logp == pytest.approx(expected, abs=1e-4)
    # the public helper scores the same ids under any model
    np.testing.assert_allclose(completion_logprobs(model, frame, tokenizer=tok, progress=False), frame["logp"], atol=1e-5)


def test_logp_is_what_implicit_rewards_computes(world):
    """The logp column is the engine's reference-free log-prob of prompt + completion (+ EOS)."""
    tok = world.tokenizer
    frame = sample(world.sft, world.prompts[:3], n=4, max_new_tokens=64, tokenizer=tok, seed=1, progress=False)
    fin = frame[frame["finished"]].reset_index(drop=True)
    assert len(fin) >= 8
    # rows whose text re-tokenises to the sampled ids (almost always; BPE can sample non-canonical ids)
    canonical = [
        tok(r.prompt + r.completion + tok.eos_token)["input_ids"] == tok(r.prompt)["input_ids"] + list(r.tokens)
        for r in fin.itertuples()
    ]
    rows = fin[canonical].reset_index(drop=True)
    assert len(rows) >= 0.8 * len(fin)
    pairs = pd.DataFrame({"prompt": rows["prompt"], "chosen": rows["completion"], "rejected": rows["completion"][::-1].to_numpy()})
    pairs = pairs[pairs["chosen"] != pairs["rejected"]]
    implicit = rmlab.implicit_rewards(world.sft, None, pairs, tokenizer=tok, reference_free=True, beta=1.0, progress=False)
    np.testing.assert_allclose(implicit["logps_chosen"], rows.loc[pairs.index, "logp"], atol=1e-4)


def test_reproducible_and_independent_of_batching(tok):
    model = sharpened(1, scale=3.0)
    run = lambda **kw: sample(model, PROMPTS, max_new_tokens=6, tokenizer=tok, progress=False, **kw)  # noqa: E731
    base = run(n=4, seed=7)
    again = run(n=4, seed=7)
    pd.testing.assert_frame_equal(base, again)
    other = run(n=4, seed=8)
    assert base["tokens"].tolist() != other["tokens"].tolist()
    # randomness is drawn per (prompt, sample, step): batch shapes do not change the samples ...
    for kw in (dict(batch_size=1), dict(batch_size=5), dict(batch_tokens=40)):
        assert run(n=4, seed=7, **kw)["tokens"].tolist() == base["tokens"].tolist(), kw
    # ... and sample k of n=2 is sample k of n=4
    small = run(n=2, seed=7)
    assert small["tokens"].tolist() == base[base["sample"] < 2]["tokens"].tolist()
    # samples of one prompt differ from each other
    assert base[base["prompt_index"] == 0]["tokens"].map(tuple).nunique() > 1


def test_eos_handling(world):
    tok = world.tokenizer
    eos = tok.eos_token_id
    frame = sample(world.sft, world.prompts[:4], n=4, max_new_tokens=64, tokenizer=tok, seed=2, progress=False)
    assert frame["finished"].mean() > 0.8  # the SFT policy learned to stop
    for row in frame.itertuples():
        assert "<|endoftext|>" not in row.completion and "<|pad|>" not in row.completion
        if row.finished:
            assert row.tokens[-1] == eos and eos not in row.tokens[:-1]
            assert row.completion == tok.decode(row.tokens[:-1])
        else:
            assert eos not in row.tokens and row.n_tokens == 64
    short = sample(world.sft, world.prompts[:4], n=4, max_new_tokens=3, tokenizer=tok, seed=2, progress=False)
    assert (~short["finished"]).all() and (short["n_tokens"] == 3).all()
    # a cut completion is the beginning of the uncut one (same random numbers)
    for a, b in zip(short["tokens"], frame["tokens"]):
        assert list(a) == list(b[:3])
    # explicit stop ids: stopping at the full stop instead of EOS
    stop = tok.convert_tokens_to_ids(".")
    dot = sample(world.sft, world.prompts[:2], n=3, max_new_tokens=64, tokenizer=tok, seed=2, eos_token_id=stop, progress=False)
    for row in dot[dot["finished"]].itertuples():
        assert row.tokens[-1] == stop and "." not in row.completion


def test_chat_prompts_apply_the_template(tok):
    model = tiny_causal_lm("gpt2", seed=4)
    chats = [[{"role": "user", "content": "Review the movie."}], [{"role": "user", "content": "Hi"}]]
    frame = sample(model, chats, n=2, max_new_tokens=5, tokenizer=tok, progress=False)
    assert frame.attrs["format"] == "chat" and frame["prompt"].iloc[0] == chats[0]
    for row in frame.itertuples():
        ids = tok.apply_chat_template(row.prompt, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        assert list(ids[-3:]) == tok("<|im_start|>assistant\n")["input_ids"][-3:]
        assert row.logp == pytest.approx(plain_logp(model, ids, row.tokens), abs=1e-4)
    bare = tiny_tokenizer()
    bare.chat_template = None
    with pytest.raises(rmlab.TokenizerError, match="chat_template"):
        sample(model, chats, n=1, max_new_tokens=2, tokenizer=bare, progress=False)


def test_temperature_and_top_p_sample_their_distribution_and_logp_stays_the_policys(tok):
    model = sharpened(5, scale=25.0)
    ids = tok("The movie was")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1].double()
    policy_lp = torch.log_softmax(logits, -1).numpy()
    for temperature, top_p in [(1.0, 1.0), (0.7, 1.0), (1.3, 0.8)]:
        probs = torch.softmax(logits / temperature, -1).numpy()
        if top_p < 1:
            order = np.argsort(-probs, kind="stable")
            before = np.cumsum(probs[order]) - probs[order]
            keep = np.zeros_like(probs, dtype=bool)
            keep[order[before < top_p]] = True
            probs = np.where(keep, probs, 0.0) / probs[keep].sum()
        frame = sample(model, ["The movie was"], n=3000, max_new_tokens=1, tokenizer=tok, seed=11,
                       temperature=temperature, top_p=top_p, progress=False)
        first = np.array([t[0] for t in frame["tokens"]])
        freq = np.bincount(first, minlength=len(probs)) / len(first)
        # total variation against its expected size under exact multinomial sampling
        expected_tv = 0.5 * np.sqrt(2 * probs * (1 - probs) / (np.pi * len(first))).sum()
        assert 0.5 * np.abs(freq - probs).sum() < 1.5 * expected_tv + 0.01, (temperature, top_p)
        if top_p < 1:
            assert probs[first].min() > 0, "a token outside the nucleus was sampled"
        np.testing.assert_allclose(frame["logp"], policy_lp[first], atol=1e-5)


def test_resume_after_an_interrupt_equals_an_uninterrupted_run(tok, tmp_path):
    model = sharpened(6, scale=3.0)
    kwargs = dict(n=4, max_new_tokens=6, tokenizer=tok, seed=3, batch_size=3, progress=False)
    full = sample(model, PROMPTS, **kwargs)
    chunks = []

    def stop_after_two(chunk):
        chunks.append(chunk)
        if len(chunks) == 2:
            raise KeyboardInterrupt

    with pytest.raises(SamplingInterrupted, match="resume") as info:
        sample(model, PROMPTS, cache_dir=tmp_path, on_chunk=stop_after_two, **kwargs)
    partial = info.value.partial
    assert len(partial) == 6 and isinstance(info.value, KeyboardInterrupt)
    rest = []
    resumed = sample(model, PROMPTS, cache_dir=tmp_path, on_chunk=rest.append, **kwargs)
    assert sum(len(c) for c in rest) == len(full) - 6, "the resumed call must only sample what was missing"
    pd.testing.assert_frame_equal(resumed, full)
    # a finished cache is read back without sampling
    again = []
    pd.testing.assert_frame_equal(sample(model, PROMPTS, cache_dir=tmp_path, on_chunk=again.append, **kwargs), full)
    assert again == []
    # overwrite_cache samples everything afresh, with the same result
    fresh = []
    redone = sample(model, PROMPTS, cache_dir=tmp_path, overwrite_cache=True, on_chunk=fresh.append, **kwargs)
    assert sum(len(c) for c in fresh) == len(full)
    pd.testing.assert_frame_equal(redone, full)
    # asking for more samples only draws the new ones, and the old ones stay as they were
    more = []
    bigger = sample(model, PROMPTS, cache_dir=tmp_path, on_chunk=more.append, **{**kwargs, "n": 6})
    assert sum(len(c) for c in more) == 2 * len(PROMPTS)
    pd.testing.assert_frame_equal(bigger[bigger["sample"] < 4].reset_index(drop=True), full, check_like=True)
    # other weights are another cache entry
    other = sharpened(7, scale=3.0)
    assert sample(other, PROMPTS, cache_dir=tmp_path, **kwargs)["tokens"].tolist() != full["tokens"].tolist()
    # without a cache the finished rows still come back with the interrupt
    chunks.clear()
    with pytest.raises(SamplingInterrupted, match="cache_dir") as info:
        sample(model, PROMPTS, on_chunk=stop_after_two, **kwargs)
    kept = info.value.partial
    merged = kept.merge(full, on=["prompt_index", "sample"], suffixes=("", "_full"))
    assert len(merged) == 6 and (merged["tokens"].map(list) == merged["tokens_full"].map(list)).all()


def test_errors_come_before_any_sampling(tok, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("sampling started before the input was checked")

    monkeypatch.setattr("rmlab.engine.decoding.decode_batch", never)  # what the local runner decodes with
    model = tiny_causal_lm("gpt2", seed=0)
    ok = dict(n=2, max_new_tokens=4, tokenizer=tok, progress=False)
    missing = "/no/such/model"  # settings are checked before a model is even loaded
    cases = [
        (dict(prompts=[]), rmlab.DataError, "empty"),
        (dict(prompts="The movie was"), rmlab.DataError, "one string"),
        (dict(prompts=["a", [{"role": "user", "content": "b"}]]), rmlab.DataError, "one format"),
        (dict(n=0), rmlab.ArgumentError, "n=0"),
        (dict(max_new_tokens=0), rmlab.ArgumentError, "max_new_tokens=0"),
        (dict(temperature=0.0), rmlab.ArgumentError, "temperature"),
        (dict(temperature=float("nan")), rmlab.ArgumentError, "temperature"),
        (dict(top_p=0.0), rmlab.ArgumentError, "top_p"),
        (dict(top_p=1.5), rmlab.ArgumentError, "top_p"),
        (dict(backend="vlm"), rmlab.ArgumentError, "Did you mean 'vllm'"),
        (dict(batch_size=0), rmlab.ArgumentError, "batch_size"),
    ]
    for change, error, message in cases:
        args = {"prompts": PROMPTS, **ok, **change}
        with pytest.raises(error, match=message):
            sample(missing, **args)
    if not vllm_available()[0]:
        with pytest.raises(rmlab.ArgumentError, match="vllm"):
            sample(missing, PROMPTS, backend="vllm", **ok)
    short = tiny_causal_lm("gpt2", seed=0, n_positions=32)
    long_prompt = "the movie was great and the acting was wonderful"
    n_ids = len(tok(long_prompt)["input_ids"])
    assert n_ids < 28
    with pytest.raises(rmlab.DataError, match=f"Prompt 1 is {n_ids} tokens.*max_new_tokens={32 - n_ids} or less"):
        sample(short, ["a", long_prompt], n=1, max_new_tokens=28, tokenizer=tok, progress=False)
    with pytest.raises(rmlab.DataError, match="no room for a completion"):
        sample(short, [long_prompt * 3], n=1, max_new_tokens=1, tokenizer=tok, progress=False)
    with pytest.raises(rmlab.ModelError, match="not a causal language model"):
        sample(rmlab.toy.tiny_reward_model("gpt2"), PROMPTS, **ok)
    with pytest.raises(rmlab.ArgumentError, match="eos_token_id"):
        sample(model, PROMPTS, eos_token_id="x", **ok)


def test_options_object_equals_flat_keywords_and_the_runner_does_the_work(tok, monkeypatch):
    """sample takes rmlab.Options (flat keywords on top) and decodes and scores through the runner
    the options name, never around it."""
    import rmlab.options as options_module
    from rmlab.engine.runner import LocalRunner, register_runner

    model = sharpened(8, scale=3.0)
    flat = sample(model, PROMPTS, n=2, max_new_tokens=5, tokenizer=tok, seed=4, batch_tokens=64, progress=False)
    opts = rmlab.Options(tokenizer=tok, batch_tokens=64, progress=False)
    pd.testing.assert_frame_equal(sample(model, PROMPTS, n=2, max_new_tokens=5, seed=4, options=opts), flat)
    calls = []

    class Counting(LocalRunner):
        def decode(self, *args, **kwargs):
            calls.append("decode")
            return super().decode(*args, **kwargs)

        def logprobs(self, *args, **kwargs):
            calls.append("logprobs")
            return super().logprobs(*args, **kwargs)

    monkeypatch.setattr(options_module, "RUNNERS", options_module.RUNNERS)  # restored after the test
    register_runner("counting", Counting)
    counted = sample(model, PROMPTS, n=2, max_new_tokens=5, seed=4, options=opts.replace(runner="counting"))
    pd.testing.assert_frame_equal(counted, flat)
    assert "decode" in calls and "logprobs" in calls
    calls.clear()
    completion_logprobs(model, flat, options=opts.replace(runner="counting"))
    assert calls == ["logprobs"]
    with pytest.raises(rmlab.ArgumentError, match="Did you mean 'batch_size'"):
        sample(model, PROMPTS, n=1, max_new_tokens=2, tokenizer=tok, bach_size=2)


def test_cache_key_is_built_from_the_cache_digests(tok, tmp_path):
    """The samples entry is keyed like every other cache: weights, tokenizer and token-id digests of
    rmlab.cache, the compute dtype, and the sampler version."""
    import json

    from rmlab.cache import sequences_digest, tokenizer_digest, weights_digest
    from rmlab.engine.sampling_inputs import encode_prompts

    model = sharpened(9, scale=3.0)
    sample(model, PROMPTS, n=1, max_new_tokens=3, tokenizer=tok, cache_dir=tmp_path, progress=False)
    (entry,) = list(tmp_path.glob("samples-*"))
    meta = json.loads((entry / "meta.json").read_text())
    assert meta["version"] == sampling.SAMPLER_VERSION == 2
    assert meta["model"] == weights_digest(model) and meta["tokenizer"] == tokenizer_digest(tok)
    assert meta["prompts"] == sequences_digest(encode_prompts(PROMPTS, "text", tok)) and meta["count"] == 3
    assert meta["compute_dtype"] == "torch.float32" and meta["device"] == "cpu"
