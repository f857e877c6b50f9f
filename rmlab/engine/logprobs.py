"""Per-token log-probs of response tokens: batched, exact, and without a B x T x V tensor.

The model's backbone runs once per batch and the unembedding only at the positions that predict a
response token (the fused head of :mod:`rmlab.engine.lm_head`, checked once per model against the
model's own forward). Length-bucketed batches run the chosen and rejected responses of a pair
together; when they share a prompt, the prompt runs once and both continue from its KV cache
(:mod:`rmlab.engine.kv_cache`, checked once per model and attention-window regime). Where a check
fails the exact path runs, with a warning, so a number is never silently wrong.
"""

from __future__ import annotations

import warnings
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
from rmlab.engine.lm_head import (  # noqa: F401  (Scored, lm_head_for, selective_log_softmax: public here too)
    LMHead,
    Scored,
    batch_logprobs,
    lm_head_for,
    own_forward_logprobs,
    selective_log_softmax,
    verify_head,
)
from rmlab.engine.precision import autocast

#: A batch runs its shared prompts once only if that needs at most this fraction of the padded
#: tokens of running its sequences whole (the cache copy and the longer masks cost something too).
_SHARE_GAIN = 0.85


def _shares_prompt(seqs: Sequence[Scored]) -> bool:
    """All sequences continue one prompt (same ``start``, same ids before it), each with >= 1 token."""
    start = seqs[0].start
    prompt = tuple(seqs[0].ids[:start])
    return all(s.start == start and tuple(s.ids[:start]) == prompt and len(s.ids) > start for s in seqs)


def _last_hidden(out) -> torch.Tensor:
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def _shared_batch_logprobs(
    head: LMHead, groups: Sequence[Sequence[Scored]], pad_id: int, device
) -> list[list[torch.Tensor]]:
    """Log-probs of groups of sequences that share a prompt: the prompt runs once through the
    backbone, every continuation resumes from its KV cache (see :mod:`rmlab.engine.kv_cache`)."""
    width = len(groups[0])
    prompts = [list(g[0].ids[: g[0].start]) for g in groups]
    conts = [[list(s.ids[s.start :]) for s in g] for g in groups]
    prompt_out, cont_out = prompt_then_continuations(head.backbone, prompts, conts, pad_id, device)
    p_hidden, c_hidden = _last_hidden(prompt_out), _last_hidden(cont_out)
    # the first response token is predicted by the prompt's last state (the last column: prompts
    # are left-padded), the others by the continuation's
    rows, labels, counts = [], [], []
    for k, cont in enumerate(c for group in conts for c in group):
        rows.append(p_hidden[k // width, -1:])
        rows.append(c_hidden[k, : len(cont) - 1])
        labels.extend(cont)
        counts.append(len(cont))
    flat = selective_log_softmax(
        torch.cat(rows), torch.as_tensor(labels, dtype=torch.long, device=device), head.logits
    )
    per_seq = list(torch.split(flat, counts))
    return [per_seq[i * width : (i + 1) * width] for i in range(len(groups))]


def sharing_is_exact(head: LMHead, regime: int, pad_id: int, device) -> bool:
    """Whether running a prompt once and continuing from its KV cache gives the model's own
    log-probs for sequences of ``regime`` (see :func:`rmlab.engine.kv_cache.window_regime`).

    Checked once per model and regime on :func:`~rmlab.engine.kv_cache.probe_sequences` (padded
    prompts of different lengths, sequences longer than the regime's attention windows) against
    the model's own forward of each sequence alone; on a mismatch a one-line warning says so and
    every sequence of that regime runs whole.
    """
    if regime in head.shared:
        return head.shared[regime]
    head.shared[regime] = False
    if not head.fused:
        return False
    model = head.model
    name = type(model).__name__
    prompts, conts = probe_sequences(model, regime, pad_id)
    groups = [[Scored(tuple(p + c), len(p)) for c in group] for p, group in zip(prompts, conts)]
    was_training = model.training
    model.eval()
    try:
        shared = [v for group in _shared_batch_logprobs(head, groups, pad_id, device) for v in group]
        alone = [own_forward_logprobs(model, s) for group in groups for s in group]
    except Exception as err:  # an architecture whose cache cannot be resumed this way
        warn_once(
            model, ("share", regime),
            f"{name}: running a shared prompt once failed ({type(err).__name__}: {err}); every "
            "sequence runs whole for this model (exact, slower).",
        )
        return False
    finally:
        model.train(was_training)
    dtype = next(model.parameters()).dtype
    tol = 1e-3 if dtype == torch.float32 else 0.1
    err = max(float((a - b).abs().max()) for a, b in zip(shared, alone))
    if not err <= tol:
        windows = attention_windows(model)
        where = f" (attention windows {windows})" if windows else ""
        warn_once(
            model, ("share", regime),
            f"{name}: continuing sequences from their shared prompt's KV cache changes log-probs by "
            f"{err:.2g} on {max(len(s.ids) for g in groups for s in g)}-token sequences{where}; every "
            "such sequence runs whole for this model (exact, slower).",
        )
        return False
    head.shared[regime] = True
    return True


def token_logprobs(
    model,
    sequences: Sequence[Scored],
    *,
    groups: Sequence[Sequence[int]] | None = None,
    batch_tokens: int | None = None,
    pad_id: int = 0,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = True,
    desc: str = "log-probs",
    share_prompt: bool = True,
) -> list[np.ndarray]:
    """Log-probs of every scored token of every sequence under a causal LM.

    Args:
        model: a causal LM (``PreTrainedModel``) in eval mode.
        sequences: objects with ``ids`` and ``start``; token ``ids[t]`` for ``t >= start`` is scored
            from the model's output at ``t - 1`` (so ``start >= 1``).
        groups: lists of sequence indices that must share a forward pass (e.g. ``[2i, 2i+1]`` for a
            chosen/rejected pair); every sequence alone by default.
        batch_tokens: padded tokens per forward pass (default: 2048 on CPU, 32768 on CUDA).
        pad_id: id used for padding (never attended to: padding is on the right).
        autocast_dtype: run the forward under ``torch.autocast`` in this dtype (bf16 on CUDA).
        progress: show a tqdm progress bar over batches.
        desc: label of the progress bar.
        share_prompt: when the sequences of a group continue one prompt (a preference pair), run
            the prompt once and resume every continuation from its KV cache. Checked once per model
            and attention-window regime against the model's own forward (padded prompts, sequences
            longer than the windows); where that differs the sequences run whole, with a warning.

    Returns:
        One float32 array per sequence, in input order, of length ``len(ids) - start``.

    The computation equals an unbatched, unpadded forward of each sequence alone followed by
    ``log_softmax`` (to float tolerance); ``tests/test_engine.py`` checks it on GPT-2, Llama and
    GPT-NeoX architectures.
    """
    for k, seq in enumerate(sequences):
        if seq.start < 1:
            raise ValueError(f"sequence {k}: start={seq.start} must be >= 1 (position 0 has no context)")
    device = next(model.parameters()).device
    if groups is None:
        groups = [[k] for k in range(len(sequences))]
    budget = batch_budget(batch_tokens, device)
    lengths = [max(len(sequences[k].ids) for k in g) for g in groups]
    width = max(len(g) for g in groups) if groups else 1
    head = lm_head_for(model)
    shareable = [
        share_prompt and head.fused and len(g) == width > 1 and _shares_prompt([sequences[k] for k in g])
        for g in groups
    ]
    if any(shareable):
        first = next(g for g, ok in zip(groups, shareable) if ok)
        with torch.inference_mode():
            verify_head(head, sequences[first[0]], pad_id, device)
    # Batches are formed on whole lengths (as without sharing); a batch of shareable groups runs its
    # prompts once only when that saves enough padded tokens (prompts and continuations are padded
    # separately, so sharing can cost more than it saves when prompt lengths vary within a batch)
    # and when sharing is exact for sequences as long as the batch's (checked once per regime).
    batches = []
    for batch in length_batches(lengths, budget, width=width):
        shared = [g for g in batch if shareable[g] and head.fused]
        if shared:
            prompt = max(sequences[groups[g][0]].start for g in shared)
            cont = max(len(sequences[k].ids) - sequences[k].start for g in shared for k in groups[g])
            whole = max(lengths[g] for g in shared)
            if len(shared) * (prompt + width * cont) > _SHARE_GAIN * len(shared) * width * whole:
                shared = []
        if shared:
            regime = window_regime(model, max(lengths[g] for g in shared))
            with torch.inference_mode():
                if not sharing_is_exact(head, regime, pad_id, device):
                    shared = []
        rest = [g for g in batch if g not in shared]
        batches += [(part, use) for part, use in ((shared, True), (rest, False)) if part]
    results: list[np.ndarray | None] = [None] * len(sequences)
    precision = autocast(device, autocast_dtype)
    bar = tqdm(total=sum(len(g) for g in groups), desc=desc, unit="seq", disable=not progress, leave=False)
    with torch.inference_mode(), precision:
        try:
            for batch, use_shared in batches:
                members = [k for g in batch for k in groups[g]]
                seqs = [sequences[k] for k in members]
                if use_shared:
                    grouped = _shared_batch_logprobs(
                        head, [[sequences[k] for k in groups[g]] for g in batch], pad_id, device
                    )
                    values = [v for group in grouped for v in group]
                else:
                    verify_head(head, min(seqs, key=lambda s: len(s.ids)), pad_id, device)
                    values = batch_logprobs(head, seqs, pad_id, device)
                for k, v in zip(members, values):
                    results[k] = v.cpu().numpy()
                bar.update(len(members))
        finally:
            bar.close()
    _warn_non_finite(model, results)  # type: ignore[arg-type]
    return results  # type: ignore[return-value]


def _warn_non_finite(model, values: Sequence[np.ndarray]) -> None:
    """Warn when log-probs came out NaN or infinite: never silently put them in a frame.

    In float32 arithmetic on finite logits a log-prob is finite (``logit - logsumexp``, both finite),
    so a non-finite one means the model's own logits or hidden states were not finite: a float16
    model whose activations overflow (above 65504), or NaN weights.
    """
    bad = [k for k, v in enumerate(values) if v.size and not np.isfinite(v).all()]
    if not bad:
        return
    tokens = sum(int((~np.isfinite(values[k])).sum()) for k in bad)
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    hint = (
        " float16 overflows above 65504: load the model in bfloat16 or float32 instead."
        if dtype == "float16"
        else " Check the model's weights for NaN or infinite values."
    )
    warnings.warn(
        f"{type(model).__name__} ({dtype}) gave non-finite log-probs for {tokens} token(s) of "
        f"{len(bad)} sequence(s) (first: sequence {bad[0]}); its logits are not finite.{hint}",
        RuntimeWarning,
        stacklevel=3,
    )


def logprobs_with_grad(model, sequences: Sequence[Scored], *, pad_id: int = 0) -> list[torch.Tensor]:
    """Differentiable per-token log-probs of one batch (for training steps and gradient analyses).

    The same computation as :func:`token_logprobs` (fused head, checked once per model against the
    full forward), without ``inference_mode`` and without re-batching: the caller picks the batch.
    Returns one 1-D tensor per sequence, on the model's device.
    """
    device = next(model.parameters()).device
    head = lm_head_for(model)
    with torch.no_grad():
        verify_head(head, min(sequences, key=lambda s: len(s.ids)), pad_id, device)
    return batch_logprobs(head, sequences, pad_id, device)
