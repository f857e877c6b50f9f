"""Last hidden states of a causal LM at the positions that predict response tokens.

The *last hidden state* here is the input of the unembedding: the backbone's output after its final
norm (GPT-2's ``ln_f``, Llama's ``norm``, GPT-NeoX's ``final_layer_norm``), so that
``logits = lm_head(h)``. It is what Razin et al. 2024 ("Unintentional Unalignment: Likelihood
Displacement in Direct Preference Optimization", arXiv 2410.08847) write ``h_{x, y_<k}`` and what
their official code reads as ``model(..., output_hidden_states=True).hidden_states[-1]``.

The hidden state that predicts response token ``ids[t]`` is the one at position ``t - 1``: for a
response starting at ``start`` these are positions ``start - 1`` (the last prompt token) to
``len(ids) - 2``; the hidden state *at* the final token (usually EOS) predicts nothing that is scored
and is left out, while the one that predicts EOS is included.

Batching is the engine's: length-bucketed batches under a token budget, the chosen and rejected
sequences of a pair in one forward pass, right padding (never attended to), ``torch.inference_mode``.
Only the backbone runs (no ``B x T x V`` logits); the backbone / unembedding split is the one
:mod:`rmlab.engine.logprobs` checks once per model against the model's own forward.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from rmlab.engine.batching import batch_budget, length_batches, pad_right
from rmlab.engine.logprobs import LMHead, Scored, lm_head_for, verify_head
from rmlab.engine.precision import autocast


@dataclass
class HiddenSums:
    """Sums of the last hidden states that predict each sequence's scored tokens.

    Attributes:
        sums: ``(N, d)`` float64 array; row ``k`` is ``sum_{t=start}^{len(ids)-1} h[t - 1]`` of
            sequence ``k``, accumulated in float64 (zeros for a sequence with no scored token).
        counts: ``(N,)`` number of hidden states in each sum (``len(ids) - start``).
        positions: with ``per_position=True``, one ``(counts[k], d)`` float32 array per sequence
            (row ``j`` predicts response token ``j``); otherwise None.
    """

    sums: np.ndarray
    counts: np.ndarray
    positions: list[np.ndarray] | None = None


def _full_hidden(model, ids, mask) -> torch.Tensor:
    """The model's own last hidden states (for heads that :func:`rmlab.engine.logprobs.verify_head` rejected)."""
    out = model(input_ids=ids, attention_mask=mask, use_cache=False, output_hidden_states=True)
    return out.hidden_states[-1]


def _batch_hidden(head: LMHead, batch: Sequence[Scored], pad_id: int, device, per_position: bool):
    ids, mask = pad_right([s.ids for s in batch], pad_id)
    ids, mask = ids.to(device), mask.to(device)
    hidden = head.hidden_states(ids, mask) if head.fused else _full_hidden(head.model, ids, mask)
    rows, cols, counts = [], [], []
    for r, seq in enumerate(batch):
        n = max(len(seq.ids) - seq.start, 0)
        rows.extend([r] * n)
        cols.extend(range(seq.start - 1, seq.start - 1 + n))
        counts.append(n)
    rows_t = torch.as_tensor(rows, dtype=torch.long, device=device)
    cols_t = torch.as_tensor(cols, dtype=torch.long, device=device)
    picked = hidden[rows_t, cols_t]
    # CHES is a difference of inner products of these sums, so they are accumulated in float64:
    # float32 sums of long responses lose the digits that the difference keeps (MPS has no float64)
    where = device if torch.device(device).type != "mps" else "cpu"
    wide = picked.to(where, torch.float64)
    sums = torch.zeros(len(batch), hidden.shape[-1], dtype=torch.float64, device=where)
    sums.index_add_(0, rows_t.to(where), wide)
    pieces = list(torch.split(picked.float(), counts)) if per_position else None
    return sums, counts, pieces


def response_hidden_states(
    model,
    sequences: Sequence[Scored],
    *,
    groups: Sequence[Sequence[int]] | None = None,
    batch_tokens: int | None = None,
    pad_id: int = 0,
    autocast_dtype: torch.dtype | None = None,
    per_position: bool = False,
    progress: bool = True,
    desc: str = "hidden states",
) -> HiddenSums:
    """Sum (and optionally keep) the last hidden states that predict each sequence's scored tokens.

    Follows Razin et al. 2024 ("Unintentional Unalignment", arXiv 2410.08847, Definition 2 and the
    official ``ches/ches.py``): for a response ``y`` after prompt ``x``, ``H(y) = sum_{k=1..|y|}
    h_{x, y_<k}``, where ``h`` is the input of the unembedding (after the final norm) and ``y``
    includes its EOS token when the tokenised response carries one.

    Args:
        model: a causal LM (``PreTrainedModel``); put it in eval mode for deterministic results.
        sequences: objects with ``ids`` and ``start`` (the first scored token, ``start >= 1``).
        groups: lists of sequence indices that share a forward pass (``[2i, 2i+1]`` for a pair).
        batch_tokens: padded tokens per forward pass (default: 2048 on CPU, 32768 on CUDA).
        pad_id: id used for right padding.
        autocast_dtype: run the backbone under ``torch.autocast`` in this dtype (bf16 on CUDA).
        per_position: also return the ``(n, d)`` hidden states of every sequence.
        progress: show a tqdm progress bar over sequences.
        desc: label of the progress bar.

    Returns:
        :class:`HiddenSums`: float64 sums of the hidden states (each taken exactly, as the model
        computed it, and added in float64: CHES subtracts two inner products of these sums, which
        float32 accumulation over long responses would leave with too few correct digits).
        Batched, padded results equal an unbatched, unpadded forward of each sequence to float
        tolerance (``tests/test_displacement.py`` checks GPT-2, Llama and GPT-NeoX).
    """
    for k, seq in enumerate(sequences):
        if seq.start < 1:
            raise ValueError(f"sequence {k}: start={seq.start} must be >= 1 (position 0 has no context)")
    device = next(model.parameters()).device
    if groups is None:
        groups = [[k] for k in range(len(sequences))]
    budget = batch_budget(batch_tokens, device)
    lengths = [max(len(sequences[k].ids) for k in g) for g in groups]
    width = max((len(g) for g in groups), default=1)
    batches = length_batches(lengths, budget, width=width)
    head = lm_head_for(model)
    sums: list[np.ndarray | None] = [None] * len(sequences)
    counts = np.zeros(len(sequences), dtype=np.int64)
    positions: list[np.ndarray | None] | None = [None] * len(sequences) if per_position else None
    precision = autocast(device, autocast_dtype)
    bar = tqdm(total=sum(len(g) for g in groups), desc=desc, unit="seq", disable=not progress, leave=False)
    with torch.inference_mode(), precision:
        try:
            for batch in batches:
                members = [k for g in batch for k in groups[g]]
                seqs = [sequences[k] for k in members]
                if head.fused and not head.verified:
                    # the same once-per-model check as the log-probs: head(backbone(x)) == model(x).logits
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        verify_head(head, min(seqs, key=lambda s: len(s.ids)), pad_id, device)
                    if not head.fused:
                        warnings.warn(
                            f"{type(model).__name__}: the backbone's output does not reproduce the model's "
                            "logits through its output embeddings; using output_hidden_states[-1], which may "
                            "not be the unembedding's input for this architecture.",
                            stacklevel=2,
                        )
                batch_sums, batch_counts, pieces = _batch_hidden(head, seqs, pad_id, device, per_position)
                batch_sums = batch_sums.cpu().numpy()
                for j, k in enumerate(members):
                    sums[k] = batch_sums[j]
                    counts[k] = batch_counts[j]
                    if positions is not None:
                        positions[k] = pieces[j].cpu().numpy()
                bar.update(len(members))
        finally:
            bar.close()
    width_d = next((s.shape[0] for s in sums if s is not None), 0)
    stacked = np.stack(sums) if sums else np.zeros((0, width_d), dtype=np.float64)
    return HiddenSums(sums=stacked.astype(np.float64, copy=False), counts=counts, positions=positions)


def next_token_logprobs(
    model,
    sequences: Sequence[Sequence[int]],
    positions: Sequence[int],
    *,
    pad_id: int = 0,
    batch_tokens: int | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Full next-token log-distributions ``log softmax(logits)`` at one position per sequence.

    Row ``k`` is the model's float32 log-distribution over the vocabulary after ``ids[: positions[k]
    + 1]`` of sequence ``k`` (the distribution that predicts token ``positions[k] + 1``). Used to see
    where probability mass moves (Razin et al. 2024, Section 4: the tokens whose probability rises
    when the preferred token's falls). Returns a ``(N, V)`` float32 CPU tensor.
    """
    device = next(model.parameters()).device
    head = lm_head_for(model)
    budget = batch_budget(batch_tokens, device)
    batches = length_batches([len(s) for s in sequences], budget)
    out: list[torch.Tensor | None] = [None] * len(sequences)
    precision = autocast(device, autocast_dtype)
    with torch.inference_mode(), precision:
        if head.fused and not head.verified:
            checkable = [s for s in sequences if len(s) >= 2]
            if checkable:
                shortest = min(checkable, key=len)
                verify_head(head, Scored(tuple(shortest), len(shortest) - 1), pad_id, device)
        for batch in batches:
            ids, mask = pad_right([sequences[k] for k in batch], pad_id)
            ids, mask = ids.to(device), mask.to(device)
            rows = torch.arange(len(batch), device=device)
            cols = torch.as_tensor([positions[k] for k in batch], dtype=torch.long, device=device)
            if head.fused and head.verified:
                logits = head.logits(head.hidden_states(ids, mask)[rows, cols])
            else:
                logits = head.model(input_ids=ids, attention_mask=mask, use_cache=False).logits[rows, cols]
            logp = torch.log_softmax(logits.float(), dim=-1).cpu()
            for j, k in enumerate(batch):
                out[k] = logp[j]
    return torch.stack(out) if out else torch.zeros(0)  # type: ignore[arg-type]
