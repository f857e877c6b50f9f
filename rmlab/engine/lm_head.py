"""The fused LM head: the backbone once, the unembedding only where a log-prob is needed.

Each scored row's log-prob is ``logit[label] - logsumexp(logits)`` computed in float32, in chunks
of rows: the selective log-softmax of TRL's fused LM head (``trl.trainer.utils.add_fused_lm_head``),
including the logit scaling and soft-capping some architectures apply (Gemma 2/3, Cohere, Granite,
...). :func:`verify_head` checks it once per model against the model's own forward pass
(:func:`own_forward_logprobs`); an architecture whose head does something else falls back to the
model's full logits, with a warning, so a number is never silently wrong.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rmlab.engine.batching import pad_right

#: Bytes of float32 logits one chunk of the selective log-softmax may hold.
_CHUNK_BYTES = {"cpu": 1 << 26, "cuda": 1 << 29}


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


def batch_logprobs(head: LMHead, batch: Sequence[Scored], pad_id: int, device) -> list[torch.Tensor]:
    """Log-probs of the scored tokens of one right-padded batch: fused head, or full logits where
    :func:`verify_head` rejected it. One 1-D tensor per sequence."""
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
        fused = batch_logprobs(head, [seq], pad_id, device)[0]
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
