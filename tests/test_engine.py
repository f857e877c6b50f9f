"""The engine against an independent brute force: one sequence at a time, no padding, full softmax."""

from __future__ import annotations

import random
import warnings

import numpy as np
import pytest
import torch

import rmlab
from rmlab.engine.batching import length_batches, pad_right
from rmlab.engine.logprobs import Scored, lm_head_for, selective_log_softmax, token_logprobs
from rmlab.io.pairs import load_pairs
from rmlab.io.tokenize import encode_pairs
from rmlab.toy import tiny_causal_lm, tiny_tokenizer
from tests.conftest import make_pairs


def brute_force(model, seq) -> np.ndarray:
    """log pi(ids[t] | ids[:t]) for t >= start: the sequence alone, full logits, plain log_softmax."""
    ids = torch.tensor([list(seq.ids)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    return np.array([logp[t - 1, seq.ids[t]].item() for t in range(seq.start, len(seq.ids))])


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gpt_neox"])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_batched_equals_unbatched_unpadded(arch, padding_side):
    tok = tiny_tokenizer(padding_side=padding_side, add_bos=(arch == "llama"))
    model = tiny_causal_lm(arch, seed=3)
    encoded = encode_pairs(load_pairs(make_pairs(10, seed=5)), tok)
    sequences = [s for p in encoded for s in (p.chosen, p.rejected)]
    lengths = {len(s.ids) for s in sequences}
    assert len(lengths) > 4, "the data must force padding"
    # a small budget gives several padded batches of mixed lengths
    groups = [[2 * i, 2 * i + 1] for i in range(len(encoded))]
    got = token_logprobs(model, sequences, groups=groups, batch_tokens=120, pad_id=tok.pad_token_id, progress=False)
    whole = token_logprobs(
        model, sequences, groups=groups, batch_tokens=120, pad_id=tok.pad_token_id, progress=False,
        share_prompt=False,
    )
    assert lm_head_for(model).shared == {0: True}, "the pairs' prompts should have run once"
    for seq, values, unshared in zip(sequences, got, whole):
        expected = brute_force(model, seq)
        assert values.shape == expected.shape
        np.testing.assert_allclose(values, expected, atol=1e-4, rtol=0)
        np.testing.assert_allclose(unshared, expected, atol=1e-4, rtol=0)


def _long_prompt_pairs(vocab: int, n: int = 6, seed: int = 0) -> tuple[list, list]:
    """Pairs with long prompts and short responses: the engine chooses to run the prompts once."""
    rng = np.random.default_rng(seed)
    sequences, groups = [], []
    for i in range(n):
        prompt = rng.integers(1, vocab, int(rng.integers(18, 25))).tolist()
        for _ in range(2):
            response = rng.integers(1, vocab, int(rng.integers(2, 7))).tolist()
            sequences.append(Scored(tuple(prompt + response), len(prompt)))
        groups.append([2 * i, 2 * i + 1])
    return sequences, groups


def test_prompt_sharing_that_disagrees_falls_back_to_whole_sequences(monkeypatch):
    """If resuming from the prompt's KV cache changed the numbers, the check catches it once, says
    so in one warning, and every sequence runs whole (the result still equals the brute force)."""
    import rmlab.engine.logprobs as engine

    real = engine._shared_batch_logprobs

    def broken(*args, **kwargs):
        return [[v + 0.5 for v in group] for group in real(*args, **kwargs)]

    monkeypatch.setattr(engine, "_shared_batch_logprobs", broken)
    model = tiny_causal_lm("llama", seed=6)
    sequences, groups = _long_prompt_pairs(model.config.vocab_size)
    with pytest.warns(UserWarning, match="changes log-probs by 0.5") as caught:
        got = token_logprobs(model, sequences, groups=groups, progress=False)
        token_logprobs(model, sequences, groups=groups, progress=False)
    assert len([w for w in caught if "KV cache" in str(w.message)]) == 1, "warned once per model"
    assert engine.lm_head_for(model).shared == {0: False}
    for seq, values in zip(sequences, got):
        np.testing.assert_allclose(values, brute_force(model, seq), atol=1e-4)


def test_the_sharing_check_catches_right_padded_prompts_under_a_sliding_window(monkeypatch):
    """Right-padded prompts put padding between a prompt and its continuation in the KV cache, and a
    sliding-window layer then attends to padding: the check (padded prompts, sequences longer than
    the window) must see it and fall back, so no wrong number comes out."""
    from transformers import MistralConfig, MistralForCausalLM

    import rmlab.engine.kv_cache as kv

    def right_padded(sequences, pad_id):
        ids, mask = pad_right(sequences, pad_id)
        return ids, mask, torch.arange(ids.shape[1]).expand_as(ids).clone()

    monkeypatch.setattr(kv, "pad_left", right_padded)
    torch.manual_seed(0)
    config = MistralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=8, max_position_embeddings=128,
    )
    model = MistralForCausalLM(config).eval()
    sequences, groups = _long_prompt_pairs(64)
    with pytest.warns(UserWarning, match=r"KV cache changes log-probs .*attention windows \[8\]"):
        got = token_logprobs(model, sequences, groups=groups, progress=False)
    assert lm_head_for(model).shared == {1: False}
    for seq, values in zip(sequences, got):
        np.testing.assert_allclose(values, brute_force(model, seq), atol=1e-4)


def test_batch_budget_does_not_change_results(policy, tok, pairs):
    encoded = encode_pairs(load_pairs(pairs), tok)
    sequences = [s for p in encoded for s in (p.chosen, p.rejected)]
    small = token_logprobs(policy, sequences, batch_tokens=16, progress=False)
    large = token_logprobs(policy, sequences, batch_tokens=1 << 20, progress=False)
    for a, b in zip(small, large):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_selective_log_softmax_matches_full_log_softmax_and_stays_finite():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(37, 50, generator=gen) * torch.tensor([1.0, 30.0, 1e4])[torch.arange(37) % 3, None]
    labels = torch.randint(0, 50, (37,), generator=gen)
    got = selective_log_softmax(logits, labels, chunk_rows=4)
    expected = torch.log_softmax(logits.double(), dim=-1)[torch.arange(37), labels].float()
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-6)
    # the same through a head (rows are hidden states) and default chunking
    head = torch.nn.Linear(8, 50, bias=True)
    hidden = torch.randn(37, 8, generator=gen)
    with torch.no_grad():
        got = selective_log_softmax(hidden, labels, head)
        expected = torch.log_softmax(head(hidden).double(), -1)[torch.arange(37), labels].float()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-6)


def test_length_batches_cover_every_item_once_within_budget():
    rng = random.Random(0)
    for _ in range(50):
        lengths = [rng.randint(1, 300) for _ in range(rng.randint(1, 80))]
        budget = rng.choice([64, 256, 1000, 4096])
        width = rng.choice([1, 2])
        batches = length_batches(lengths, budget, width=width)
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(len(lengths)))
        for b in batches:
            cost = width * len(b) * max(lengths[i] for i in b)
            assert cost <= budget or len(b) == 1
        # sorted longest first: little padding
        firsts = [max(lengths[i] for i in b) for b in batches]
        assert firsts == sorted(firsts, reverse=True)


def test_pad_right():
    ids, mask = pad_right([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_head_that_disagrees_falls_back_to_full_logits(tok, pairs):
    """A model whose forward changes logits after the head (as some architectures do) is detected."""
    model = tiny_causal_lm("gpt2", seed=4)
    original = model.forward

    def forward(*args, **kwargs):  # an extra transform the backbone + output embeddings do not know
        out = original(*args, **kwargs)
        out.logits = out.logits * 3.0
        return out

    model.forward = forward
    encoded = encode_pairs(load_pairs(pairs[:4]), tok)
    sequences = [s for p in encoded for s in (p.chosen, p.rejected)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = token_logprobs(model, sequences, progress=False)
    assert any("full logits" in str(w.message) for w in caught)
    for seq, values in zip(sequences, got):
        np.testing.assert_allclose(values, brute_force(model, seq), atol=1e-4)


def test_deterministic(policy, reference, tok, pairs):
    a = rmlab.implicit_rewards(policy, reference, pairs, tokenizer=tok, progress=False)
    b = rmlab.implicit_rewards(policy, reference, pairs, tokenizer=tok, progress=False)
    cols = ["logps_chosen", "logps_rejected", "ref_logps_chosen", "ref_logps_rejected", "margin"]
    np.testing.assert_array_equal(a[cols].to_numpy(), b[cols].to_numpy())


def test_training_mode_with_dropout_keeps_the_fused_head(tok, pairs):
    """The fused-head check runs in eval mode: dropout in a training model is no disagreement."""
    from rmlab.engine.logprobs import logprobs_with_grad

    model = tiny_causal_lm("gpt2", seed=5, resid_pdrop=0.1)
    model.config.resid_pdrop = 0.1
    for block in model.transformer.h:
        block.mlp.dropout.p = 0.3
    model.train()
    encoded = encode_pairs(load_pairs(pairs[:3]), tok)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        values = logprobs_with_grad(model, [encoded[0].chosen, encoded[1].rejected], pad_id=tok.pad_token_id)
    assert lm_head_for(model).fused and model.training
    values[0].sum().backward()
    assert model.lm_head.weight.grad is not None
