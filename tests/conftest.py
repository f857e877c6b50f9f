"""Shared fixtures: tiny tokenizers, models and preference pairs, all built offline."""

from __future__ import annotations

import random

import pytest

from rmlab.toy import tiny_causal_lm, tiny_tokenizer

ADJ = ["great", "dull", "charming", "slow", "clever", "flat", "wonderful", "weak", "funny", "long"]


@pytest.fixture(scope="module")
def world():
    """The shipped toy world, loaded once per test module."""
    from rmlab.toy import load

    return load()


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``): tiny
    models run fastest so on shared cores, and exact comparisons need one reduction order."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def no_default_cache(monkeypatch):
    """A developer's RMLAB_CACHE_DIR must not leak cached results into the tests."""
    monkeypatch.delenv("RMLAB_CACHE_DIR", raising=False)


NOUNS = ["film", "movie", "plot", "cast", "music", "script", "ending", "story"]


def make_pairs(n: int = 12, seed: int = 0, chat: bool = False) -> list[dict]:
    """Preference pairs of varied lengths (1 to ~12 words of response) from a fixed seed."""
    rng = random.Random(seed)

    def sentence(k):
        return " ".join(f"the {rng.choice(NOUNS)} was {rng.choice(ADJ)}" for _ in range(k))

    rows = []
    for i in range(n):
        prompt = rng.choice(["Review:", "Write a short review of the movie.", "Describe the film in one sentence."])
        if i % 3 == 0:
            prompt += " " + sentence(rng.randint(1, 3))
        chosen = " " + sentence(rng.randint(1, 4)) + "."
        rejected = " " + sentence(rng.randint(1, 4)) + "!"
        if chat:
            rows.append(
                {
                    "prompt": [{"role": "user", "content": prompt}],
                    "chosen": [{"role": "assistant", "content": chosen.strip()}],
                    "rejected": [{"role": "assistant", "content": rejected.strip()}],
                }
            )
        else:
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


@pytest.fixture(scope="session")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def bos_tok():
    return tiny_tokenizer(add_bos=True)


@pytest.fixture(scope="session")
def policy():
    return tiny_causal_lm("gpt2", seed=1)


@pytest.fixture(scope="session")
def reference():
    return tiny_causal_lm("gpt2", seed=0)


@pytest.fixture(scope="session")
def pairs():
    return make_pairs(12)
