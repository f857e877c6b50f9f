"""Per-token log-probs of response tokens: batched, exact, and without a B x T x V tensor.

The model's backbone runs once per batch; the unembedding (LM head) is applied only at the
positions that predict a response token, in chunks of rows, and each row's log-prob is
``logit[label] - logsumexp(logits)`` computed in float32. This is the selective log-softmax of
TRL's fused LM head (``trl.trainer.utils.add_fused_lm_head``), including the logit scaling and
soft-capping some architectures apply (Gemma 2/3, Cohere, Granite, ...).

Before trusting that shortcut on a model, the first call checks it against the model's own forward
pass on one sequence; an architecture whose head does something else falls back to the model's full
logits, with a warning, so a number is never silently wrong.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from rmlab.engine.batching import batch_budget, length_batches, pad_right
from rmlab.engine.kv_cache import (
    attention_windows,
    probe_sequences,
    prompt_then_continuations,
    warn_once,
    window_regime,
)
from rmlab.engine.precision import autocast

#: Bytes of float32 logits one chunk of the selective log-softmax may hold.
_CHUNK_BYTES = {"cpu": 1 << 26, "cuda": 1 << 29}

#: A batch runs its shared prompts once only if that needs at most this fraction of the padded
#: tokens of running its sequences whole (the cache copy and the longer masks cost something too).
_SHARE_GAIN = 0.85


@dataclass(frozen=True)
class Scored:
    """What the engine needs of a sequence: its ids and the index of its first scored token."""

    ids: Sequence[int]
    start: int


class LMHead:
    """The backbone / unembedding split of a causal LM, with the head's logit transforms."""

    def __init__(self, model):
        self._model = weakref.ref(model)  # the cache is keyed by the model: never keep it alive
        self.backbone = _backbone(model)
        self.head = model.get_output_embeddings()
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.softcap = getattr(cfg, "final_logit_softcapping", None)
        scale = getattr(cfg, "logit_scale", None)
        if scale is None:
            scale = getattr(cfg, "output_multiplier", None)
        if scale is None:
            scale = getattr(cfg, "lm_head_multiplier", None)
        if scale is None and getattr(cfg, "logits_scaling", None) is not None:
            scaling = cfg.logits_scaling
            scale = scaling if getattr(cfg, "model_type", "") == "hyperclovax" else 1.0 / scaling
        self.scale = 1.0 if scale is None else float(scale)
        self.fused = self.backbone is not None and self.head is not None
        self.verified = False
        self.shared: dict[int, bool] = {}  # window regime -> prompt sharing is exact (checked)

    @property
    def model(self):
        return self._model()

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.head(hidden)
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def hidden_states(self, input_ids, attention_mask) -> torch.Tensor:
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def _backbone(model):
    """The transformer under a causal LM's head: its ``base_model_prefix`` attribute, else the usual
    names (some classes declare a prefix they do not use, e.g. Llama 4's text model)."""
    names = [getattr(model, "base_model_prefix", ""), "model", "transformer"]
    for name in names:
        module = getattr(model, name, None) if name else None
        if isinstance(module, torch.nn.Module) and module is not model:
            return module
    return None


_HEADS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def lm_head_for(model) -> LMHead:
    """One :class:`LMHead` per model, so the fused-head check runs once per model."""
    head = _HEADS.get(model)
    if head is None:
        head = _HEADS[model] = LMHead(model)
    return head


def selective_log_softmax(
    rows: torch.Tensor,
    labels: torch.Tensor,
    to_logits=None,
    *,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """``log_softmax(to_logits(rows))[i, labels[i]]`` for every row, chunked, in float32.

    Args:
        rows: ``(N, d)`` hidden states (or ``(N, V)`` logits when ``to_logits`` is None).
        labels: ``(N,)`` token ids.
        to_logits: maps a chunk of rows to ``(n, V)`` logits (the LM head); identity if None.
        chunk_rows: rows per chunk; by default as many as keep a chunk's float32 logits under
            64 MiB on CPU (512 MiB on CUDA).

    Returns:
        ``(N,)`` float32 log-probabilities. Equals ``torch.log_softmax(logits.float(), -1)``
        gathered at ``labels``, without materialising the full log-softmax.
    """
    n = rows.shape[0]
    out = torch.empty(n, dtype=torch.float32, device=rows.device)
    if n == 0:
        return out
    if chunk_rows is None:
        vocab = to_logits(rows[:1]).shape[-1] if to_logits is not None else rows.shape[-1]
        budget = _CHUNK_BYTES.get(rows.device.type, 1 << 27)
        chunk_rows = max(1, budget // (4 * vocab))
    for s in range(0, n, chunk_rows):
        chunk = rows[s : s + chunk_rows]
        logits = (to_logits(chunk) if to_logits is not None else chunk).float()
        picked = logits.gather(1, labels[s : s + chunk_rows, None]).squeeze(1)
        out[s : s + chunk_rows] = picked - torch.logsumexp(logits, dim=-1)
    return out


def _targets(batch: Sequence[Scored], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """Row/position indices of the hidden states that predict each scored token, and the labels."""
    rows, cols, labels, counts = [], [], [], []
    for r, seq in enumerate(batch):
        positions = range(seq.start, len(seq.ids))
        rows.extend([r] * len(positions))
        cols.extend(p - 1 for p in positions)
        labels.extend(seq.ids[p] for p in positions)
        counts.append(len(positions))
    as_long = lambda v: torch.as_tensor(v, dtype=torch.long, device=device)  # noqa: E731
    return as_long(rows), as_long(cols), as_long(labels), counts


def own_forward_logprobs(model, seq: Scored) -> torch.Tensor:
    """The model's own forward pass and a plain log-softmax: the independent check of the fused path."""
    device = next(model.parameters()).device
    ids = torch.as_tensor([list(seq.ids)], dtype=torch.long, device=device)
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits[0].float()
    logp = torch.log_softmax(logits[:-1], dim=-1)
    target = ids[0, 1:]
    picked = logp.gather(1, target[:, None]).squeeze(1)
    return picked[seq.start - 1 :]


def _batch_logprobs(head: LMHead, batch: Sequence[Scored], pad_id: int, device) -> list[torch.Tensor]:
    ids, mask = pad_right([s.ids for s in batch], pad_id)
    ids, mask = ids.to(device), mask.to(device)
    rows, cols, labels, counts = _targets(batch, device)
    if head.fused:
        hidden = head.hidden_states(ids, mask)
        flat = selective_log_softmax(hidden[rows, cols], labels, head.logits)
    else:
        logits = head.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        flat = selective_log_softmax(logits[rows, cols], labels)
    return list(torch.split(flat, counts))


def verify_head(head: LMHead, seq: Scored, pad_id: int, device) -> None:
    """Compare the fused head with the model's full forward once; fall back if they disagree."""
    if not head.fused or head.verified or len(seq.ids) - seq.start < 1:
        return
    was_training = head.model.training
    head.model.eval()  # dropout would make the two passes differ
    try:
        fused = _batch_logprobs(head, [seq], pad_id, device)[0]
        full = own_forward_logprobs(head.model, seq)
    finally:
        head.model.train(was_training)
    dtype = next(head.model.parameters()).dtype
    tol = 1e-3 if dtype == torch.float32 else 0.1
    # positions where both paths are non-finite say nothing about the head (overflowing logits are
    # reported by token_logprobs); one finite and one not is a disagreement
    both_bad = ~torch.isfinite(fused) & ~torch.isfinite(full)
    err = (fused - full).abs().masked_fill(both_bad, 0.0).max().item()
    if not err <= tol:
        warnings.warn(
            f"{type(head.model).__name__}: log-probs from the backbone + output embeddings differ from "
            f"the model's own logits by {err:.2e}; using the full logits for this model (slower).",
            stacklevel=3,
        )
        head.fused = False
    head.verified = True


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
                    values = _batch_logprobs(head, seqs, pad_id, device)
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
    return _batch_logprobs(head, sequences, pad_id, device)
