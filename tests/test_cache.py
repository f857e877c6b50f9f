"""Resumable scoring caches: killed and interrupted runs resume exactly, stale entries are never read."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import rmlab
import rmlab.cache
import rmlab.engine.reward_model as reward_engine
import rmlab.rewards.dense as dense_module
import rmlab.engine.logprobs as logprob_engine
from rmlab.toy import tiny_causal_lm, tiny_reward_model, tiny_tokenizer
from tests.conftest import make_pairs

pytestmark = pytest.mark.usefixtures("one_thread")  # exact equality across processes needs the same reduction order

ROOT = Path(__file__).resolve().parents[1]
N = 12


@pytest.fixture()
def counted(monkeypatch):
    """Count the pairs each cached log-prob call sends to the engine (one entry per engine call)."""
    calls: list[int] = []
    real = logprob_engine.token_logprobs

    def counting(model, sequences, *, groups, **kwargs):
        calls.append(len(groups))
        return real(model, sequences, groups=groups, **kwargs)

    monkeypatch.setattr(logprob_engine, "token_logprobs", counting)
    return calls


def entries(cache_dir: Path, kind: str = "logprobs") -> list[Path]:
    return sorted(p for p in Path(cache_dir).glob(f"{kind}-*") if p.is_dir())


def cached_items(cache_dir: Path, kind: str = "logprobs") -> int:
    return sum(len(pd.read_parquet(f)) for e in entries(cache_dir, kind) for f in e.glob("rows-*.parquet"))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A policy, a reference and their tokenizer saved as a trainer would save them."""
    root = tmp_path_factory.mktemp("models")
    tok = tiny_tokenizer()
    for name, seed in (("policy", 1), ("reference", 0)):
        tiny_causal_lm("gpt2", seed=seed).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    data = root / "pairs.json"
    data.write_text(json.dumps(make_pairs(N)))
    return root


SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    import torch
    torch.set_num_threads(1)
    import rmlab, rmlab.cache
    import rmlab.engine.logprobs as logprob_engine

    root, cache_dir = sys.argv[1], sys.argv[2]
    rmlab.cache.CHUNK_ITEMS = 1  # a chunk file per pair
    real = logprob_engine.token_logprobs

    def slow(*args, **kwargs):  # slow enough that the kill lands mid-run
        time.sleep(0.3)
        return real(*args, **kwargs)

    logprob_engine.token_logprobs = slow
    pairs = json.load(open(root + "/pairs.json"))
    rmlab.implicit_rewards(root + "/policy", root + "/reference", pairs, batch_tokens=1,
                           cache_dir=cache_dir, progress=False)
    print("finished")
    """
)


def test_a_killed_run_resumes_and_equals_an_uninterrupted_one(saved, tmp_path, counted):
    cache_dir = tmp_path / "cache"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, str(saved), str(cache_dir)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 180
        while not list(cache_dir.glob("logprobs-*/rows-*.parquet")):
            assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
            assert time.monotonic() < deadline, "no chunk was written in time"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it was killed"
    done = cached_items(cache_dir)
    assert 0 < done < 2 * N, done

    pairs = json.loads((saved / "pairs.json").read_text())
    args = (str(saved / "policy"), str(saved / "reference"), pairs)
    resumed = rmlab.implicit_rewards(*args, batch_tokens=1, cache_dir=cache_dir, progress=False)
    assert sum(counted) == 2 * N - done, "the resumed call must score only the missing pairs"
    counted.clear()
    # an uninterrupted run, without a cache and with the default batches, gives the same numbers exactly
    fresh = rmlab.implicit_rewards(*args, batch_tokens=1, progress=False)
    pd.testing.assert_frame_equal(resumed, fresh, check_exact=True)
    assert counted == [N, N], "without a cache each model scores every pair in one engine call"
    assert cached_items(cache_dir) == 2 * N


def test_keyboard_interrupt_saves_finished_pairs_and_resumes(tok, policy, reference, tmp_path, monkeypatch):
    pairs = make_pairs(N)
    kwargs = dict(tokenizer=tok, batch_tokens=1, progress=False)  # one pair per batch
    full = rmlab.implicit_rewards(policy, reference, pairs, **kwargs)
    real = logprob_engine.token_logprobs
    calls: list[int] = []

    def interrupting(model, sequences, *, groups, **kw):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(len(groups))
        return real(model, sequences, groups=groups, **kw)

    monkeypatch.setattr(logprob_engine, "token_logprobs", interrupting)
    with pytest.raises(KeyboardInterrupt) as info:
        rmlab.implicit_rewards(policy, reference, pairs, cache_dir=tmp_path, **kwargs)
    assert "resume" in "".join(getattr(info.value, "__notes__", []))
    # chunks hold up to CHUNK_ITEMS pairs: the three finished ones were written on the interrupt
    assert rmlab.cache.CHUNK_ITEMS > 3 and cached_items(tmp_path) == 3
    calls.clear()

    def counting(*args, groups, **kw):
        calls.append(len(groups))
        return real(*args, groups=groups, **kw)

    monkeypatch.setattr(logprob_engine, "token_logprobs", counting)
    resumed = rmlab.implicit_rewards(policy, reference, pairs, cache_dir=tmp_path, **kwargs)
    assert sum(calls) == 2 * N - 3
    pd.testing.assert_frame_equal(resumed, full, check_exact=True)


def test_same_inputs_reuse_and_any_change_invalidates(tok, policy, reference, tmp_path, counted):
    pairs = make_pairs(N)
    kwargs = dict(tokenizer=tok, progress=False, cache_dir=tmp_path)
    first = rmlab.implicit_rewards(policy, reference, pairs, **kwargs)
    assert sum(counted) == 2 * N
    counted.clear()
    pd.testing.assert_frame_equal(rmlab.implicit_rewards(policy, reference, pairs, **kwargs), first, check_exact=True)
    assert counted == [], "a cached call must not run a model"

    def recomputed(frame_of, expected_pairs):
        counted.clear()
        got = frame_of()
        assert sum(counted) == expected_pairs
        counted.clear()
        return got

    # a changed weight: the policy's entry is new, the reference's is reused
    other = copy.deepcopy(policy)
    with torch.no_grad():
        other.transformer.h[0].mlp.c_fc.weight[0, 0] += 1e-3
    changed = recomputed(lambda: rmlab.implicit_rewards(other, reference, pairs, **kwargs), N)
    uncached = rmlab.implicit_rewards(other, reference, pairs, tokenizer=tok, progress=False)
    pd.testing.assert_frame_equal(changed, uncached, check_exact=True)
    assert not np.array_equal(changed["logps_chosen"], first["logps_chosen"])
    # the same object changed in place is noticed too
    with torch.no_grad():
        other.transformer.h[0].mlp.c_fc.weight[0, 0] += 1e-3
    recomputed(lambda: rmlab.implicit_rewards(other, reference, pairs, **kwargs), N)
    # another tokenizer (here: only its chat template differs, the ids are the same)
    tok2 = copy.deepcopy(tok)
    tok2.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    recomputed(lambda: rmlab.implicit_rewards(policy, reference, pairs, **{**kwargs, "tokenizer": tok2}), 2 * N)
    # one data row changed
    edited = copy.deepcopy(pairs)
    edited[5]["chosen"] = " the plot was charming."
    got = recomputed(lambda: rmlab.implicit_rewards(policy, reference, edited, **kwargs), 2 * N)
    assert got["chosen"][5] == " the plot was charming." and got["logps_chosen"][4] == first["logps_chosen"][4]
    # a max_length that truncates
    cut = dict(max_length=24, truncation_mode="keep_end")
    short = recomputed(lambda: rmlab.implicit_rewards(policy, reference, pairs, **cut, **kwargs), 2 * N)
    assert short["truncated"].any()
    # overwrite recomputes and rewrites
    again = recomputed(lambda: rmlab.implicit_rewards(policy, reference, pairs, overwrite_cache=True, **kwargs), 2 * N)
    pd.testing.assert_frame_equal(again, first, check_exact=True)
    # and nothing stale was read: every call above equals its uncached twin
    for data, opts in ((edited, {}), (pairs, cut)):
        cached = rmlab.implicit_rewards(policy, reference, data, **kwargs, **opts)
        plain = rmlab.implicit_rewards(policy, reference, data, tokenizer=tok, progress=False, **opts)
        pd.testing.assert_frame_equal(cached, plain, check_exact=True)


def test_beta_and_derived_settings_reuse_the_logprob_cache(tok, policy, reference, tmp_path, counted):
    pairs = make_pairs(N)
    kwargs = dict(tokenizer=tok, progress=False, cache_dir=tmp_path)
    base = rmlab.implicit_rewards(policy, reference, pairs, beta=0.1, **kwargs)
    counted.clear()
    other = rmlab.implicit_rewards(policy, reference, pairs, beta=0.5, length_normalize=True, **kwargs)
    tokens = rmlab.token_rewards(policy, reference, pairs, beta=0.3, **kwargs)
    steps = rmlab.step_rewards(policy, reference, pairs, delimiter=" ", **kwargs)
    free = rmlab.implicit_rewards(policy, None, pairs, reference_free=True, **kwargs)
    assert counted == [], "beta, normalisation, token/step views and reference-free runs reuse the cache"
    plain = rmlab.implicit_rewards(
        policy, reference, pairs, beta=0.5, length_normalize=True, tokenizer=tok, progress=False
    )
    pd.testing.assert_frame_equal(other, plain, check_exact=True)
    np.testing.assert_allclose(
        tokens.groupby(["pair", "side"], observed=True)["reward"].sum().unstack()["chosen"],
        3 * base["reward_chosen"], rtol=1e-6,
    )
    assert len(steps) and np.array_equal(free["logps_chosen"], base["logps_chosen"])
    assert len(entries(tmp_path)) == 2  # one entry per model


def test_progress_bar_counts_cached_pairs_as_done(tok, policy, reference, tmp_path, monkeypatch):
    pairs = make_pairs(5)
    kwargs = dict(tokenizer=tok, batch_tokens=1, cache_dir=tmp_path)
    real = logprob_engine.token_logprobs
    calls: list[int] = []

    def interrupting(*args, **kw):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(logprob_engine, "token_logprobs", interrupting)
    with pytest.raises(KeyboardInterrupt):
        rmlab.implicit_rewards(policy, reference, pairs, progress=False, **kwargs)
    monkeypatch.setattr(logprob_engine, "token_logprobs", real)
    bars = []
    real_tqdm = rmlab.cache.tqdm

    def recording(*args, **kw):
        bars.append(kw)
        return real_tqdm(*args, **{**kw, "disable": True})

    monkeypatch.setattr(rmlab.cache, "tqdm", recording)
    rmlab.implicit_rewards(policy, reference, pairs, progress=True, **kwargs)
    assert [(b["total"], b["initial"], b["desc"]) for b in bars] == [
        (5, 2, "policy log-probs"), (5, 0, "reference log-probs")
    ]


def test_reward_scores_and_dense_rewards_cache(tok, tmp_path, monkeypatch):
    rm = tiny_reward_model("gpt2", seed=0)
    pairs = make_pairs(N)
    kwargs = dict(tokenizer=tok, progress=False, batch_tokens=1)
    full = rmlab.reward_scores(rm, pairs, **kwargs)
    real = reward_engine.score_sequences
    calls: list[int] = []

    def interrupting(model, sequences, **kw):
        if len(calls) == 5:
            raise KeyboardInterrupt
        calls.append(len(sequences))
        return real(model, sequences, **kw)

    monkeypatch.setattr(reward_engine, "score_sequences", interrupting)
    with pytest.raises(KeyboardInterrupt):
        rmlab.reward_scores(rm, pairs, cache_dir=tmp_path, **kwargs)
    assert cached_items(tmp_path, "scores") == 5
    calls.clear()

    def counting(model, sequences, **kw):
        calls.append(len(sequences))
        return real(model, sequences, **kw)

    monkeypatch.setattr(reward_engine, "score_sequences", counting)
    resumed = rmlab.reward_scores(rm, pairs, cache_dir=tmp_path, **kwargs)
    assert sum(calls) == 2 * N - 5
    pd.testing.assert_frame_equal(resumed, full, check_exact=True)
    calls.clear()
    pd.testing.assert_frame_equal(rmlab.reward_scores(rm, pairs, cache_dir=tmp_path, **kwargs), full, check_exact=True)
    assert calls == []
    # another reward model is another entry
    other = rmlab.reward_scores(tiny_reward_model("gpt2", seed=1), pairs, cache_dir=tmp_path, **kwargs)
    assert sum(calls) == 2 * N and not np.array_equal(other["score_chosen"], full["score_chosen"])

    dense = rmlab.dense_rewards(rm, pairs, tokenizer=tok, progress=False)
    first = rmlab.dense_rewards(rm, pairs, tokenizer=tok, progress=False, cache_dir=tmp_path)
    pd.testing.assert_frame_equal(first, dense, check_exact=True)
    monkeypatch.setattr(dense_module, "_one_pass_scores", lambda *a: pytest.fail("the cache was not used"))
    pd.testing.assert_frame_equal(
        rmlab.dense_rewards(rm, pairs, tokenizer=tok, progress=False, cache_dir=tmp_path), dense, check_exact=True
    )


def test_cache_arguments_are_checked(tok, policy, reference):
    with pytest.raises(rmlab.ArgumentError, match="overwrite_cache=True needs cache_dir"):
        rmlab.implicit_rewards(policy, reference, make_pairs(2), tokenizer=tok, overwrite_cache=True)
    with pytest.raises(rmlab.ArgumentError, match="cache_dir"):
        rmlab.reward_scores(tiny_reward_model("gpt2"), ["a"], tokenizer=tok, cache_dir=3)


def test_the_environment_names_a_default_cache_and_false_turns_it_off(tok, policy, reference, tmp_path, counted, monkeypatch):
    pairs = make_pairs(4)
    monkeypatch.setenv("RMLAB_CACHE_DIR", str(tmp_path / "env-cache"))
    first = rmlab.implicit_rewards(policy, reference, pairs, tokenizer=tok, progress=False)
    assert len(entries(tmp_path / "env-cache")) == 2  # policy and reference
    counted.clear()
    again = rmlab.implicit_rewards(policy, reference, pairs, tokenizer=tok, progress=False)
    assert counted == [], "the default cache was not reused"
    pd.testing.assert_frame_equal(again, first, check_exact=True)
    off = rmlab.implicit_rewards(policy, reference, pairs, tokenizer=tok, progress=False, cache_dir=False)
    pd.testing.assert_frame_equal(off, first)
    monkeypatch.delenv("RMLAB_CACHE_DIR")
    with pytest.raises(rmlab.ArgumentError, match="RMLAB_CACHE_DIR"):
        rmlab.implicit_rewards(policy, reference, pairs, tokenizer=tok, overwrite_cache=True)


def test_weights_digest_sees_every_byte_and_is_remembered():
    model = tiny_causal_lm("gpt2", seed=0)
    digest = rmlab.cache.weights_digest(model)
    assert rmlab.cache.weights_digest(tiny_causal_lm("gpt2", seed=0)) == digest
    assert rmlab.cache.weights_digest(tiny_causal_lm("gpt2", seed=1)) != digest
    with torch.no_grad():
        model.lm_head.weight.view(-1)[-1] += 1e-6  # the last element of a tied weight
    assert rmlab.cache.weights_digest(model) != digest
