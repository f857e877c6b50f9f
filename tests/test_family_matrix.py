"""The family matrix: every analysis on tiny random models of the families people DPO-train and
score with, against each model's own forward on each sequence alone (or autograd).

Each causal family is built from its real config class with a small attention window where the
family has one, and the data is longer than every window, so the shared-prompt KV-cache path, the
fused LM head (Gemma's soft-capping included) and left-padded decoding all meet the window's edge.
Agreement is asked to 1e-4 relative to the size of the number. The README's "Supported models"
table lists this matrix.
"""

from __future__ import annotations

import functools
import warnings

import numpy as np
import pytest
import torch

import rmlab
from rmlab.engine.kv_cache import attention_windows
from rmlab.engine.logprobs import lm_head_for
from rmlab.engine.decoding import decode_batch, decoding_mode, row_keys, row_uniforms
from rmlab.errors import ModelError
from rmlab.toy import tiny_causal_lm, tiny_reward_model, tiny_tokenizer
from tests.conftest import hand_tokenise, make_pairs, response_logprobs

pytestmark = pytest.mark.usefixtures("one_thread")

_SMALL = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=256, tie_word_embeddings=False,
)
WINDOW = 8

#: model_type -> config fields of a tiny model (merged over ``_SMALL`` unless the value says otherwise)
CAUSAL = {
    "llama": {},
    "mistral": dict(sliding_window=WINDOW),
    "mixtral": dict(sliding_window=WINDOW, num_local_experts=4, num_experts_per_tok=2),
    "qwen2": dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
    "qwen3": dict(head_dim=8, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
    "qwen2_moe": dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32,
        use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1,
    ),
    "qwen3_moe": dict(head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
    "gemma2": dict(head_dim=8, sliding_window=WINDOW, final_logit_softcapping=3.0, attn_logit_softcapping=5.0),
    "gemma3_text": dict(head_dim=8, sliding_window=WINDOW, final_logit_softcapping=3.0, sliding_window_pattern=2),
    "phi3": dict(sliding_window=WINDOW, pad_token_id=1),
    "olmo2": {},
    "olmoe": dict(num_experts=4, num_experts_per_tok=2),
    "phimoe": dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW),
    "starcoder2": dict(sliding_window=WINDOW),
    "cohere2": dict(head_dim=8, sliding_window=WINDOW),
    "gpt_oss": dict(head_dim=8, sliding_window=WINDOW, num_local_experts=4, num_experts_per_tok=2, rope_parameters=None),
    "llama4_text": dict(head_dim=8, attention_chunk_size=WINDOW, num_local_experts=2, intermediate_size_mlp=64),
    "gpt2": None,  # the project's own tiny sizes (rmlab.toy.tiny)
    "gpt_neox": None,
}

#: state-space and hybrid families: their cache cannot be shared between a pair's responses, and
#: Mamba's attention mask is not a padding mask, so they take the exact whole-sequence paths
STATE_SPACE = {
    "mamba": dict(hidden_size=32, state_size=4, num_hidden_layers=2, expand=2, conv_kernel=4),
    "falcon_mamba": dict(hidden_size=32, state_size=4, num_hidden_layers=2, expand=2, conv_kernel=4),
    "mamba2": dict(
        hidden_size=32, state_size=8, num_hidden_layers=2, expand=2, num_heads=8, head_dim=8, n_groups=1, conv_kernel=4
    ),
    "jamba": _SMALL | dict(
        num_experts=2, num_experts_per_tok=1, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
        expert_layer_offset=1, mamba_d_state=4, mamba_d_conv=4, mamba_expand=2,
    ),
}

REWARD = {
    "llama": {},
    "qwen2": CAUSAL["qwen2"],
    "gemma2": CAUSAL["gemma2"],
    "mistral": CAUSAL["mistral"],
}

_CONTEXT = " the plot was long the cast was good the music was loud the ending was sad the script was"
#: pairs whose prompts are long next to their responses (so the engine runs each prompt once) and of
#: different lengths (so prompts are padded), all longer than every window
PAIRS = [dict(row, prompt=row["prompt"] + _CONTEXT[: 30 + 9 * i]) for i, row in enumerate(make_pairs(6, seed=21))]
BETA = 0.1


def close(got, expected, what: str, rel: float = 1e-4) -> None:
    """``|got - expected| <= rel * max(1, |expected|)`` elementwise."""
    got, expected = np.asarray(got, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    assert got.shape == expected.shape, what
    bound = rel * np.maximum(1.0, np.abs(expected))
    worst = np.abs(got - expected) - bound
    assert (worst <= 0).all(), f"{what}: off by {np.abs(got - expected).max():.3g} (allowed {bound.min():.3g})"


@functools.cache
def causal(family: str, seed: int):
    if family in STATE_SPACE:
        return tiny_causal_lm(family, seed=seed, **STATE_SPACE[family])
    fields = {} if CAUSAL[family] is None else _SMALL | CAUSAL[family]
    return tiny_causal_lm(family, seed=seed, **fields)


@functools.cache
def reward_model(family: str):
    if family == "deberta-v2":
        return tiny_reward_model(
            "deberta-v2", seed=5, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=256,
        )
    return tiny_reward_model(family, seed=5, **(_SMALL | REWARD[family]))


def tokenizer(padding_side: str, family: str):
    return tiny_tokenizer(padding_side=padding_side, add_bos=family not in ("gpt2", "gpt_neox"))


def longest(tok) -> int:
    return max(len(ids) for row in PAIRS for ids, _ in hand_tokenise(tok, row).values())


def test_the_data_is_longer_than_every_window():
    for family in CAUSAL:
        windows = attention_windows(causal(family, 1))
        assert longest(tokenizer("right", family)) > 3 * max(windows, default=0), family
    assert attention_windows(causal("gemma2", 1)) == [WINDOW]
    assert attention_windows(causal("llama", 1)) == []


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("family", list(CAUSAL))
def test_implicit_and_token_rewards_equal_each_sequence_alone(family, padding_side):
    policy, ref = causal(family, 1), causal(family, 2)
    tok = tokenizer(padding_side, family)
    frame = rmlab.implicit_rewards(policy, ref, PAIRS, tokenizer=tok, beta=BETA, progress=False)
    tokens = rmlab.token_rewards(policy, ref, PAIRS, tokenizer=tok, beta=BETA, progress=False)
    # the fast paths ran: the fused head and the shared prompt, past the window where there is one
    head = lm_head_for(policy)
    assert head.fused and True in head.shared.values(), head.shared
    for i, row in enumerate(PAIRS):
        enc = hand_tokenise(tok, row)
        for side in ("chosen", "rejected"):
            ids, start = enc[side]
            lp, ref_lp = response_logprobs(policy, ids, start), response_logprobs(ref, ids, start)
            close(frame.at[i, f"logps_{side}"], lp.sum(), f"{family} pair {i} {side} log-prob")
            close(frame.at[i, f"ref_logps_{side}"], ref_lp.sum(), f"{family} pair {i} {side} reference")
            close(frame.at[i, f"reward_{side}"], BETA * (lp.sum() - ref_lp.sum()), f"{family} reward", rel=1e-3)
            rows = tokens[(tokens["pair"] == i) & (tokens["side"] == side)]
            assert list(rows["token_id"]) == list(ids[start:])
            close(rows["logp"], lp, f"{family} pair {i} {side} token log-probs")
            close(rows["ref_logp"], ref_lp, f"{family} pair {i} {side} reference token log-probs")


def _lm_head_inputs(model, ids) -> torch.Tensor:
    """The unembedding's input at every position of the model's own forward (float64)."""
    seen = []
    handle = model.get_output_embeddings().register_forward_hook(lambda _m, args, _o: seen.append(args[0]))
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([list(ids)]))
    finally:
        handle.remove()
    return seen[0][0].double()


@pytest.mark.parametrize("family", list(CAUSAL))
def test_ches_equals_the_models_own_hidden_states(family):
    policy = causal(family, 1)
    tok = tokenizer("left", family)
    frame = rmlab.ches(policy, PAIRS, tokenizer=tok, progress=False)
    for i, row in enumerate(PAIRS):
        sums, counts = {}, {}
        for side, (ids, start) in hand_tokenise(tok, row).items():
            hidden = _lm_head_inputs(policy, ids)
            sums[side] = hidden[start - 1 : len(ids) - 1].sum(0)  # the states that predict the response
            counts[side] = len(ids) - start
        inner, sq = float(sums["chosen"] @ sums["rejected"]), float(sums["chosen"] @ sums["chosen"])
        scale = abs(inner) + sq
        assert abs(frame.at[i, "ches"] - (inner - sq)) <= 1e-4 * scale, family
        ln = inner / (counts["chosen"] * counts["rejected"]) - sq / counts["chosen"] ** 2
        ln_scale = abs(inner) / (counts["chosen"] * counts["rejected"]) + sq / counts["chosen"] ** 2
        assert abs(frame.at[i, "ln_ches"] - ln) <= 1e-4 * ln_scale, family


def _autograd_gradient(model, ids, start) -> torch.Tensor:
    """d/dtheta of the summed response log-prob, from the model's own forward and autograd."""
    params = [p for p in model.parameters() if p.requires_grad]
    ids_t = torch.tensor([list(ids)])
    logp = torch.log_softmax(model(input_ids=ids_t).logits[0, :-1].float(), -1)
    total = logp.gather(1, ids_t[0, 1:, None])[start - 1 :].sum()
    grads = torch.autograd.grad(total, params, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).double() for g, p in zip(grads, params)])


@pytest.mark.parametrize("family", list(CAUSAL))
def test_gradient_entanglement_equals_autograd(family):
    policy = causal(family, 1)
    tok = tokenizer("right", family)
    rows = PAIRS[:3]
    frame = rmlab.gradient_entanglement(policy, rows, tokenizer=tok, progress=False)
    for i, row in enumerate(rows):
        enc = hand_tokenise(tok, row)
        g_w, g_l = (_autograd_gradient(policy, *enc[side]) for side in ("chosen", "rejected"))
        expected = {
            "grad_sq_chosen": float(g_w @ g_w), "grad_sq_rejected": float(g_l @ g_l), "grad_inner": float(g_w @ g_l)
        }
        scale = float(g_w.norm() * g_l.norm())
        for column, value in expected.items():
            assert abs(frame.at[i, column] - value) <= 1e-4 * max(scale, abs(value)), (family, column)


PROMPTS = ["Review:", "Write a short review of the movie. the plot was long", "Describe the film in one sentence."]


@pytest.mark.parametrize("family", list(CAUSAL))
def test_sampling_decodes_and_scores_as_the_models_own_forward(family):
    """Left-padded decoding with a KV cache, past the window: every step's log-prob equals the
    model's own forward of the prompt and the tokens so far, and so does the ``logp`` column."""
    policy = causal(family, 1)
    tok = tokenizer("left", family)
    steps = 2 * WINDOW + 3
    prompt_ids = [tok(p)["input_ids"] for p in PROMPTS]
    assert len({len(p) for p in prompt_ids}) == 3, "prompts of different lengths are padded"
    uniforms = np.random.default_rng(0).random((len(prompt_ids), steps))
    with torch.no_grad():
        tokens, _, step_lp = decode_batch(
            policy, prompt_ids, uniforms, temperature=1.0, top_p=1.0, stop_ids=[], pad_id=tok.pad_token_id
        )
    for prompt, toks, lp in zip(prompt_ids, tokens, step_lp):
        assert len(toks) == steps
        close(lp, response_logprobs(policy, prompt + toks, len(prompt)), f"{family} decoding")
    frame = rmlab.sample(policy, PROMPTS, n=2, max_new_tokens=steps, tokenizer=tok, progress=False, cache_dir=False)
    for row in frame.itertuples():
        expected = response_logprobs(policy, tok(row.prompt)["input_ids"] + list(row.tokens), len(tok(row.prompt)["input_ids"]))
        close(row.logp, expected.sum(), f"{family} sample logp")


def _score(model, ids) -> float:
    with torch.no_grad():
        return float(model(input_ids=torch.tensor([list(ids)])).logits[0, 0])


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("family", [*REWARD, "deberta-v2"])
def test_reward_scores_and_dense_rewards_equal_each_sequence_alone(family, padding_side):
    rm = reward_model(family)
    encoder = family == "deberta-v2"
    tok = tiny_tokenizer(padding_side=padding_side, encoder=encoder, add_bos=not encoder)
    scores = rmlab.reward_scores(rm, PAIRS, tokenizer=tok, progress=False)
    dense = rmlab.dense_rewards(rm, PAIRS, tokenizer=tok, progress=False)
    assert dense.attrs["method"] == ("prefix" if encoder else "one_pass")
    closing = "" if encoder else tok.eos_token
    for i, row in enumerate(PAIRS):
        prompt = tok(row["prompt"])["input_ids"]
        for side in ("chosen", "rejected"):
            ids = tok(row["prompt"] + row[side] + closing)["input_ids"]
            close(scores.at[i, f"score_{side}"], _score(rm, ids), f"{family} pair {i} {side} score")
            if encoder:  # an encoder's prefix ends with its closing token
                continue
            start = len(prompt) - (1 if tok.eos_token_id in prompt[-1:] else 0)
            prefix = [_score(rm, ids[: t + 1]) for t in range(start, len(ids))]
            got = dense[(dense["pair"] == i) & (dense["side"] == side)]
            assert list(got["token_id"]) == ids[start:]
            close(got["prefix_score"], prefix, f"{family} pair {i} {side} prefix scores")
            close(got["reward"], np.diff([_score(rm, ids[:start])] + prefix), f"{family} dense rewards", rel=2e-4)


@pytest.mark.filterwarnings("ignore:.*running a shared prompt once failed:UserWarning")
@pytest.mark.parametrize("family", list(STATE_SPACE))
def test_state_space_families_take_the_exact_paths(family):
    """Mamba-style caches cannot be shared by a pair's responses: the check says so once and the
    sequences run whole; Mamba-1's attention mask is not a padding mask, so sampling decodes only
    prompts of one length together. Both equal the model's own forward."""
    policy, ref = causal(family, 1), causal(family, 2)
    tok = tokenizer("left", family)
    frame = rmlab.implicit_rewards(policy, ref, PAIRS, tokenizer=tok, beta=BETA, progress=False)
    for i, row in enumerate(PAIRS):
        for side, (ids, start) in hand_tokenise(tok, row).items():
            close(frame.at[i, f"logps_{side}"], response_logprobs(policy, ids, start).sum(), f"{family} {side}")
    steps = 2 * WINDOW + 3
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        samples = rmlab.sample(policy, PROMPTS, n=2, max_new_tokens=steps, tokenizer=tok, progress=False, cache_dir=False)
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "step-by-step" in m], messages  # the sampler agreed with the engine
    mode = decoding_mode(policy, tok.pad_token_id, 64)
    assert (mode == "unpadded") == any("decoding left-padded prompts" in m for m in messages)
    prompt_ids = [tok(p)["input_ids"] for p in PROMPTS]
    for row in samples.itertuples():
        # the same uniforms, the prompt decoded alone (nothing to pad), through the model's own forward
        uniforms = row_uniforms(row_keys(0, [row.prompt_index], [row.sample]), steps)
        prompt = prompt_ids[row.prompt_index]
        with torch.no_grad():
            alone, _, _ = decode_batch(
                policy, [prompt], uniforms, temperature=1.0, top_p=1.0, stop_ids=[tok.eos_token_id],
                pad_id=tok.pad_token_id, padded=False,
            )
        assert list(row.tokens) == alone[0], family
        close(row.logp, response_logprobs(policy, prompt + list(row.tokens), len(prompt)).sum(), f"{family} sample logp")


def test_mamba_is_decoded_unpadded_and_attention_models_padded():
    tok = tokenizer("left", "llama")
    assert decoding_mode(causal("mistral", 1), tok.pad_token_id, 64) == "padded"
    with pytest.warns(UserWarning, match="MambaForCausalLM .*decoding left-padded prompts changes its log-probs"):
        assert decoding_mode(causal("mamba", 3), tok.pad_token_id, 64) == "unpadded"


RECURRENT_WITHOUT_CACHE = {
    "rwkv": dict(hidden_size=32, num_hidden_layers=2, attention_hidden_size=32, intermediate_size=64, context_length=256),
    "recurrent_gemma": dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
        head_dim=8, lru_width=32, attention_window_size=WINDOW, block_types=["recurrent", "attention"],
    ),
}


@pytest.mark.parametrize("family", list(RECURRENT_WITHOUT_CACHE))
def test_sampling_a_model_without_a_kv_cache_is_a_model_error_before_any_sampling(family, monkeypatch):
    """RWKV and RecurrentGemma keep their recurrent state outside transformers' cache: the sampler
    cannot continue them, and says so (naming the class) before decoding anything."""
    import rmlab.engine.decoding as decoding

    model = tiny_causal_lm(family, seed=1, **RECURRENT_WITHOUT_CACHE[family])
    calls = []
    real = decoding.decode_batch
    monkeypatch.setattr(decoding, "decode_batch", lambda *a, **k: calls.append(1) or real(*a, **k))
    with pytest.raises(ModelError, match=f"{type(model).__name__} .*returns no KV cache.*completion_logprobs"):
        rmlab.sample(model, PROMPTS, n=1, max_new_tokens=4, tokenizer=tokenizer("left", family), progress=False, cache_dir=False)
    assert calls == []


def _t5():
    from transformers import T5Config, T5ForConditionalGeneration

    return T5ForConditionalGeneration(T5Config(vocab_size=384, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8))


@pytest.mark.parametrize(
    "build",
    [lambda: tiny_reward_model("llama", seed=1, **_SMALL), _t5],
    ids=["sequence-classifier", "encoder-decoder"],
)
def test_a_model_that_is_not_a_causal_lm_gets_a_model_error_before_any_forward(build, monkeypatch):
    model = build()
    calls = []
    monkeypatch.setattr(type(model), "forward", lambda *a, **k: calls.append(1))
    with pytest.raises(ModelError, match=f"{type(model).__name__} .*not a causal language model"):
        rmlab.implicit_rewards(model, model, PAIRS[:1], tokenizer=tiny_tokenizer(), progress=False)
    assert calls == []
