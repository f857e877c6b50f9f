"""The toy world: its gold reward, its build, and the qualities it must show (recomputed, not read)."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pandas as pd
import pytest

import rmlab
from rmlab.toy import language
from rmlab.toy.build import BuildConfig, bon_expectation, build


def test_gold_reward_hand_worked_cases():
    # 4 words: +1 positive, +0.8 detail
    assert language.gold_reward(" The plot was great.")[0] == pytest.approx(1.8)
    # 9 words: 1 - 1 + 1.8
    assert language.gold_reward(" The plot was great and the music was dull.")[0] == pytest.approx(1.8)
    # a repeated clause costs 2 (the repeat's adjective still counts): 2 - 2 + 8 * 0.2
    assert language.gold_reward(" The plot was great, the plot was great.")[0] == pytest.approx(1.6)
    # 23 words: within the limit, so 3 positives + 0.2 * 23
    long = " I thought the plot was great, I thought the music was funny, I thought the cast was clever, I saw it last week."
    assert language.word_count(long) == 23
    assert language.gold_reward(long)[0] == pytest.approx(3 + 0.2 * 23)
    # 32 words: the detail bonus stops at 25 words (+5) and 7 words over the limit cost 7
    longer = long + " We watched it at home, my friend picked it."
    assert language.word_count(longer) == 32
    assert language.gold_reward(longer)[0] == pytest.approx(3 + 5 - 7)
    # words outside the grammar count towards length only; upper case and punctuation do not matter
    assert language.gold_reward(" GREAT!!! banana")[0] == pytest.approx(1 + 0.4)
    texts = [language.sample_review(np.random.default_rng(s)) for s in range(50)]
    np.testing.assert_array_equal(language.gold_reward(texts), language.gold_reward(list(texts)))


def test_grammar_is_seeded_and_varied():
    a, b = language.corpus(200, seed=3), language.corpus(200, seed=3)
    assert a == b and a != language.corpus(200, seed=4)
    words = [language.word_count(r) for _, r in language.corpus(2000, seed=0)]
    assert min(words) <= 6 and max(words) >= 30, "lengths must vary on both sides of the 20-word limit"
    gold = language.gold_reward([r for _, r in language.corpus(2000, seed=0)])
    assert gold.min() < -5 and gold.max() >= 3


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_best_of_n_estimator_equals_enumeration(n):
    rng = np.random.default_rng(n)
    proxy, gold = rng.normal(size=7), rng.normal(size=7)
    subsets = list(itertools.combinations(range(7), n))
    brute = np.mean([gold[max(s, key=lambda i: proxy[i])] for s in subsets])
    assert bon_expectation(proxy, gold, n) == pytest.approx(brute, rel=1e-12)
    assert bon_expectation(proxy, proxy, n) >= bon_expectation(proxy, proxy, max(1, n - 1)) - 1e-12


def test_quick_build_runs_and_loads(tmp_path):
    manifest = build(tmp_path / "world", BuildConfig.quick(), progress=False)
    world = rmlab.toy.load(tmp_path / "world")
    assert len(world.reward_models) == 3 and len(world.dpo) == 3
    assert all(len(steps) >= 5 for steps in world.checkpoints.values())
    for rel, info in manifest["files"].items():
        assert (tmp_path / "world" / rel).stat().st_size == info["bytes"]
    frame = rmlab.implicit_rewards(
        world.dpo[0.1], world.sft, world.heldout.head(8), tokenizer=world.tokenizer, progress=False
    )
    assert len(frame) == 8 and frame["logps_chosen"].notna().all()


@pytest.fixture(scope="module")
def world():
    try:
        return rmlab.toy.load()
    except rmlab.DataFileError:
        pytest.fail("the shipped toy world data/toy is missing")


def test_shipped_world_contents(world):
    assert world.tokenizer.chat_template
    params = sum(p.numel() for p in world.sft.parameters())
    assert 0.3e6 <= params <= 2e6
    assert len(world.reward_models) >= 3
    for rm in world.reward_models:
        assert type(rm).__name__ == "GPT2ForSequenceClassification" and rm.config.num_labels == 1
    assert len(world.dpo) >= 3 and all(len(s) >= 5 for s in world.checkpoints.values())
    pairs = world.pairs
    for col in ["prompt", "chosen", "rejected", "split", "gold_chosen", "gold_rejected", "true_prob", "flipped"]:
        assert col in pairs.columns
    assert (pairs.split == "train").sum() >= 2000 and (pairs.split == "heldout").sum() >= 500
    np.testing.assert_array_equal(world.gold(list(pairs.chosen)), pairs.gold_chosen.to_numpy())
    np.testing.assert_allclose(
        pairs.true_prob, 1 / (1 + np.exp(-(pairs.gold_chosen - pairs.gold_rejected))), rtol=1e-9
    )
    assert (pairs.flipped == (pairs.gold_chosen < pairs.gold_rejected)).all()
    assert 0.05 < pairs.flipped.mean() < 0.35
    assert len(world.prompts) >= 32
    # the models load like hub models from their folders
    from transformers import AutoModelForCausalLM

    again = AutoModelForCausalLM.from_pretrained(world.sft_path)
    assert type(again).__name__ == "GPT2LMHeadModel"
    manifest = json.loads((world.root / "manifest.json").read_text())
    assert manifest["files"]


def test_sft_samples_read_like_the_language(world):
    from rmlab.toy.build import generate

    samples = generate(world.sft, world.tokenizer, world.prompts[:4], n=16, max_new_tokens=64, seed=5, progress=False)
    vocab = set(" ".join(language.POSITIVE + language.NEGATIVE + language.NOUNS + language.FILLERS).lower().split())
    vocab |= {"the", "was", "very", "i", "found", "thought", "and"} | set(" ".join(language._TEMPLATES).split())
    words = [w for c in samples["completion"] for w in language._WORD.findall(c.lower())]
    assert np.mean([w in vocab for w in words]) > 0.95


def test_proxy_accuracy_above_chance_below_gold(world):
    held = world.heldout
    gc, gr = held.gold_chosen.to_numpy(), held.gold_rejected.to_numpy()
    gold_acc = np.mean(np.where(gc == gr, 0.5, (gc > gr).astype(float)))
    for rm in world.reward_models:
        acc = rmlab.reward_scores(rm, held, tokenizer=world.tokenizer, progress=False)["correct"].mean()
        assert 0.65 <= acc <= gold_acc - 0.015, (acc, gold_acc)


def test_best_of_n_overoptimises(world):
    pool = pd.read_parquet(world.root / "bon_pool.parquet")
    ns = [1, 2, 4, 8, 16, 32, 64, 128, 256]
    proxy, gold = [], []
    for n in ns:
        per_prompt = [
            (bon_expectation(g.proxy.to_numpy(), g.proxy.to_numpy(), n), bon_expectation(g.proxy.to_numpy(), g.gold.to_numpy(), n))
            for _, g in pool.groupby("prompt")
        ]
        p, g = np.mean(per_prompt, axis=0)
        proxy.append(p)
        gold.append(g)
    assert all(b > a for a, b in zip(proxy, proxy[1:])), "proxy must keep rising with n"
    peak = int(np.argmax(gold))
    assert 0 < peak < len(ns) - 1, f"gold must rise then fall, got {np.round(gold, 2)}"
    assert gold[peak] - gold[-1] > 0.3 and gold[peak] - gold[0] > 0.3
    # the pool's gold scores are the gold reward of its completions (aligned, not shuffled)
    np.testing.assert_array_equal(world.gold(list(pool.completion)), pool.gold.to_numpy())


def test_dpo_policies_learn_and_displace(world):
    held = world.heldout.head(300)
    for beta, policy in world.dpo.items():
        frame = rmlab.implicit_rewards(policy, world.sft, held, tokenizer=world.tokenizer, beta=beta, progress=False)
        assert frame["correct"].mean() > 0.6, beta
        # likelihood displacement: DPO lowers the chosen response's log-prob on some pairs
        assert (frame["logps_chosen"] < frame["ref_logps_chosen"]).mean() > 0.05, beta


def test_world_pairs_in_chat_form(world):
    """The world's tokenizer carries a chat template, so conversational data run end to end."""
    held = world.heldout.head(6)
    chat = [
        {
            "prompt": [{"role": "user", "content": r.prompt}],
            "chosen": [{"role": "assistant", "content": r.chosen.strip()}],
            "rejected": [{"role": "assistant", "content": r.rejected.strip()}],
        }
        for r in held.itertuples()
    ]
    frame = rmlab.implicit_rewards(world.dpo[0.1], world.sft, chat, tokenizer=world.tokenizer, progress=False)
    assert frame.attrs["format"] == "chat"
    assert np.isfinite(frame["margin"]).all() and (frame["tokens_chosen"] > 0).all()
