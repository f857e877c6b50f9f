"""Dense reward-model scores: the score of every prefix of a sequence, in one pass.

:func:`position_scores` is the one-pass shortcut for causal reward models: the score head applied
to every hidden state gives, at position ``t``, the score of the prefix ending at ``t`` (causal
attention: no position sees the future). It is checked once per model against scoring prefixes
one by one (:func:`one_pass_problem`), and refused for models where that does not hold
(encoders). :func:`shared_prompt_scores` runs a pair's prompt once and both responses from its
KV cache (see :mod:`rmlab.engine.kv_cache`), checked once per model and attention-window regime
(:func:`shared_prompt_problem`). These feed the dense rewards of :func:`rmlab.dense_rewards`
(``r_t = s_t - s_{t-1}``).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from rmlab.engine.batching import batch_budget, length_batches
from rmlab.engine.kv_cache import (
    attention_windows,
    probe_sequences,
    prompt_then_continuations,
    warn_once,
    window_regime,
)
from rmlab.engine.precision import autocast
from rmlab.engine.reward_model import pad_token, padded_batches
from rmlab.errors import ModelError
from rmlab.io.models import model_device


# --------------------------------------------------------------------------------------------------
# one pass: the score head at every position
# --------------------------------------------------------------------------------------------------
_ONE_PASS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _score_head(model):
    """The module that maps every hidden state to scores in causal ``*ForSequenceClassification``."""
    head = getattr(model, "score", None)
    return head if isinstance(head, torch.nn.Module) else None


def _all_positions(model, ids, mask, label: int) -> torch.Tensor:
    """Head output at every position, ``B x T`` (float32), captured from the model's own forward."""
    captured = {}

    def hook(_module, _inputs, output):
        captured["scores"] = output

    handle = _score_head(model).register_forward_hook(hook)
    try:
        model(input_ids=ids, attention_mask=mask)
    finally:
        handle.remove()
    scores = captured.get("scores")
    if scores is None or scores.dim() != 3 or scores.shape[1] != ids.shape[1]:
        raise ModelError(
            f"{type(model).__name__}'s score head does not output one score per position, so the "
            "one-pass dense rewards do not apply; use method='prefix'."
        )
    return scores[..., label].float()


def _pooled_index(ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """For every position t, the rightmost index <= t whose token is not padding (the model's pooling)."""
    positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    real = torch.where(ids != pad_id, positions, torch.zeros_like(positions))
    return torch.cummax(real, dim=1).values


def one_pass_problem(model, pad_id: int, label: int = 0) -> str | None:
    """Why the one-pass shortcut does not hold for ``model`` (None when it does); checked once.

    The check scores a probe sequence in one pass and each of its prefixes alone with the model's
    own forward; they must agree to 1e-4 (relative to the score scale).
    """
    key = (pad_id, label)
    cached = _ONE_PASS.get(model, {})
    if key in cached:
        return cached[key]
    problem = None
    if _score_head(model) is None:
        problem = (
            f"{type(model).__name__} has no per-position score head (it pools before scoring, as "
            "encoders such as BERT or RoBERTa do)"
        )
    else:
        vocab = model.get_input_embeddings().weight.shape[0]
        generator = torch.Generator().manual_seed(0)
        probe = torch.randint(0, vocab, (1, 7), generator=generator)
        probe[probe == pad_id] = (pad_id + 1) % vocab
        device = model_device(model)
        probe = probe.to(device)
        with pad_token(model, pad_id), torch.inference_mode():
            try:
                every = _all_positions(model, probe, torch.ones_like(probe), label)[0]
            except ModelError as err:
                problem = str(err)
            else:
                alone = torch.stack(
                    [model(input_ids=probe[:, : t + 1]).logits[0, label].float() for t in range(probe.shape[1])]
                )
                scale = max(1.0, float(alone.abs().max()))
                if not torch.allclose(every, alone, atol=1e-4 * scale, rtol=0):
                    problem = (
                        f"{type(model).__name__}'s per-position scores differ from scoring each prefix "
                        f"alone (by up to {float((every - alone).abs().max()):.2g}): the model is not causal"
                    )
    cached[key] = problem
    _ONE_PASS[model] = cached
    return problem


def position_scores(
    model,
    sequences: Sequence[Sequence[int]],
    *,
    pad_id: int,
    label: int = 0,
    batch_tokens: int | None = None,
    autocast_dtype=None,
    progress: bool = True,
    desc: str = "dense rewards",
) -> list[np.ndarray]:
    """``s_t`` = the score of the prefix ending at every position t, in one forward pass per batch.

    The model's pooling is honoured: at a padding-token position the prefix score is that of the
    last non-padding token, as the model would pool the prefix. Callers check
    :func:`one_pass_problem` first.
    """
    out: list[np.ndarray] = [np.empty(0)] * len(sequences)
    padded = padded_batches(model, sequences, pad_id, batch_tokens, autocast_dtype, progress, desc)
    with contextlib.closing(padded) as batches:
        for batch, ids, mask, pad in batches:
            scores = _all_positions(model, ids, mask, label)
            scores = torch.gather(scores, 1, _pooled_index(ids, pad)).cpu().numpy().astype(np.float64)
            for row, i in enumerate(batch):
                out[i] = scores[row, : len(sequences[i])]
    return out


# --------------------------------------------------------------------------------------------------
# one pass with a shared prompt: the prompt runs once, both responses continue from its KV cache
# --------------------------------------------------------------------------------------------------
_SHARED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _pooled(ids: Sequence[int], scores: np.ndarray, pad_id: int) -> np.ndarray:
    """Apply the model's pooling to per-position scores of one unpadded sequence (numpy)."""
    ids = np.asarray(ids)
    positions = np.where(ids != pad_id, np.arange(len(ids)), 0)
    return scores[np.maximum.accumulate(positions)]


def _shared_batch(model, prompts, continuations, pad_id: int, label: int) -> list[list[np.ndarray]]:
    """Raw per-position scores (prompt + each continuation) for one batch of prompt groups."""
    device = model_device(model)
    width = len(continuations[0])
    captured = []
    handle = _score_head(model).register_forward_hook(lambda _m, _i, output: captured.append(output))
    try:
        prompt_then_continuations(model, prompts, continuations, pad_id, device)
    finally:
        handle.remove()
    # prompts are left-padded: prompt g's scores are the last len(prompt) columns of row g
    prompt_scores, cont_scores = (c[..., label].float().cpu().numpy().astype(np.float64) for c in captured)
    result = []
    for g, (prompt, group) in enumerate(zip(prompts, continuations)):
        head = prompt_scores[g, prompt_scores.shape[1] - len(prompt) :]
        result.append(
            [np.concatenate([head, cont_scores[g * width + k, : len(c)]]) for k, c in enumerate(group)]
        )
    return result


def shared_prompt_problem(model, pad_id: int, label: int = 0, length: int = 0) -> str | None:
    """Why running a prompt once and continuing both responses from its KV cache is not exact for
    ``model`` on sequences of up to ``length`` tokens (None when it is).

    Checked once per model and attention-window regime (:func:`rmlab.engine.kv_cache.window_regime`)
    on padded prompts of different lengths and sequences longer than the regime's windows
    (:func:`rmlab.engine.kv_cache.probe_sequences`), against scoring every sequence alone with
    :func:`position_scores`; a problem is also warned about once.
    """
    regime = window_regime(model, length)
    key = (pad_id, label, regime)
    cached = _SHARED.get(model, {})
    if key in cached:
        return cached[key]
    problem = one_pass_problem(model, pad_id, label)
    if problem is None:
        prompts, groups = probe_sequences(model, regime, pad_id)
        try:
            with pad_token(model, pad_id) as pad, torch.inference_mode():
                shared = _shared_batch(model, prompts, groups, pad, label)
        except Exception as err:  # an architecture whose cache cannot be reused this way
            problem = f"reusing {type(model).__name__}'s KV cache failed ({type(err).__name__}: {err})"
        else:
            full = [p + c for p, group in zip(prompts, groups) for c in group]
            alone = position_scores(model, full, pad_id=pad_id, label=label, progress=False)
            got = [s for group in shared for s in group]
            worst = max(float(np.abs(a - b).max()) for a, b in zip(alone, got))
            scale = max(1.0, max(float(np.abs(a).max()) for a in alone))
            # float32 agrees to rounding; half precision rounds each path differently
            rel = 1e-4 if next(model.parameters()).dtype == torch.float32 else 2e-2
            if not worst <= rel * scale:
                windows = attention_windows(model)
                problem = (
                    f"continuing from {type(model).__name__}'s KV cache changes the scores "
                    f"(by up to {worst:.2g} on {max(len(f) for f in full)}-token sequences"
                    + (f", attention windows {windows}" if windows else "")
                    + ")"
                )
        if problem is not None:
            warn_once(model, ("share", key), f"{problem}; every pair runs whole for this model (exact, slower).")
    cached[key] = problem
    _SHARED[model] = cached
    return problem


def shared_prompt_scores(
    model,
    groups: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]],
    *,
    pad_id: int,
    label: int = 0,
    batch_tokens: int | None = None,
    autocast_dtype=None,
    progress: bool = True,
    desc: str = "dense rewards",
) -> list[list[np.ndarray]]:
    """Per-position prefix scores of several responses that share a prompt, the prompt run once.

    ``groups`` holds ``(prompt ids, [response ids, ...])`` with the same number of non-empty
    responses in every group (2 for preference pairs). Returns, per group and response, the scores
    of ``prompt + response`` at every position, as :func:`position_scores` would (the model's
    pooling honoured); callers check :func:`shared_prompt_problem` first.
    """
    device = model_device(model)
    budget = batch_budget(batch_tokens, device)
    width = len(groups[0][1]) if groups else 1
    # padded tokens per group: the prompt once, then `width` continuations
    lengths = [len(p) // width + max(len(c) for c in conts) for p, conts in groups]
    batches = length_batches(lengths, budget, width=width)
    out: list[list[np.ndarray]] = [[] for _ in groups]
    with pad_token(model, pad_id) as pad, torch.inference_mode(), autocast(device, autocast_dtype):
        for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
            prompts = [list(groups[i][0]) for i in batch]
            continuations = [[list(c) for c in groups[i][1]] for i in batch]
            raw = _shared_batch(model, prompts, continuations, pad, label)
            for i, scores in zip(batch, raw):
                prompt = list(groups[i][0])
                out[i] = [_pooled(prompt + list(c), s, pad) for c, s in zip(groups[i][1], scores)]
    return out
