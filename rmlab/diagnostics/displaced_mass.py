"""Where displaced probability mass goes: next-token gains where a pair's responses first differ.

Razin et al. 2024 ("Unintentional Unalignment: Likelihood Displacement in Direct Preference
Optimization", arXiv 2410.08847), Section 4's single-token picture: after a DPO run, at the first
position where the chosen and rejected responses differ (:func:`divergence`, a context both share),
:func:`displaced_mass` lists the tokens whose next-token probability rose most, with their
``<W_z, W_{y_w} - W_{y_l}>``.
"""

from __future__ import annotations

import pandas as pd
import torch

from rmlab.engine.hidden import next_token_logprobs
from rmlab.engine.pairs import PairInputs
from rmlab.io.tokenize import decode_tokens


def divergence(pair) -> int | None:
    """Index in the chosen ids of the first token where chosen and rejected differ (a scored token of both)."""
    c, r = pair.chosen, pair.rejected
    d = 0
    for a, b in zip(c.ids, r.ids):
        if a != b:
            break
        d += 1
    if d >= len(c.ids) or d >= len(r.ids) or d < max(c.start, r.start, 1):
        return None
    return d


def displaced_mass(inputs: PairInputs, before_model, after_model, top_k: int, chunk: int = 64) -> pd.DataFrame:
    """Tokens whose next-token probability rose most where the two responses first differ.

    Razin et al. 2024, Section 4: at a context both responses share, the logit of token ``z`` moves
    with ``<W_z, W_{y_w} - W_{y_l}>`` (``alignment``, with the unembedding of ``before_model``). The
    columns are those of :attr:`~rmlab.diagnostics.displacement_run.DisplacementRun.mass`.
    """
    where = [(i, divergence(p)) for i, p in enumerate(inputs.encoded)]
    where = [(i, d) for i, d in where if d is not None]
    columns = ["pair", "position", "token_id", "token", "role", "gain_rank", "prob_before", "prob_after",
               "gain", "logp_before", "logp_after", "alignment"]
    if not where:
        return pd.DataFrame({c: [] for c in columns})
    weight = before_model.get_output_embeddings().weight.detach().float().cpu()
    parts = []
    for s in range(0, len(where), chunk):
        block = where[s : s + chunk]
        contexts = [tuple(inputs.encoded[i].chosen.ids[:d]) for i, d in block]
        positions = [d - 1 for _, d in block]
        options = dict(pad_id=inputs.pad_id, batch_tokens=inputs.batch_tokens)
        before = next_token_logprobs(before_model, contexts, positions, **options)
        after = next_token_logprobs(after_model, contexts, positions, **options)
        gain = after.exp() - before.exp()
        vocab = torch.arange(gain.shape[1])
        top = torch.topk(gain, min(top_k, gain.shape[1]), dim=1).indices
        for j, (i, d) in enumerate(block):
            pair = inputs.encoded[i]
            yw, yl = pair.chosen.ids[d], pair.rejected.ids[d]
            ids = top[j].tolist()
            ids += [t for t in (yw, yl) if t not in ids]
            idx = torch.as_tensor(ids)
            g = gain[j]
            picked = g[idx]
            # rank in the whole vocabulary by gain (ties: lower id first), 1 = rose most
            ranks = 1 + (g[None, :] > picked[:, None]).sum(1) + (
                (g[None, :] == picked[:, None]) & (vocab[None, :] < idx[:, None])
            ).sum(1)
            order = torch.argsort(ranks)
            idx, ranks = idx[order], ranks[order]
            ids = idx.tolist()
            direction = weight[yw] - weight[yl]
            parts.append(
                pd.DataFrame(
                    {
                        "pair": i,
                        "position": d - pair.chosen.start,
                        "token_id": ids,
                        "role": ["chosen" if t == yw else "rejected" if t == yl else "other" for t in ids],
                        "gain_rank": ranks.numpy(),
                        "prob_before": before[j, idx].exp().double().numpy(),
                        "prob_after": after[j, idx].exp().double().numpy(),
                        "gain": gain[j, idx].double().numpy(),
                        "logp_before": before[j, idx].double().numpy(),
                        "logp_after": after[j, idx].double().numpy(),
                        "alignment": (weight[idx] @ direction).double().numpy(),
                    }
                )
            )
    frame = pd.concat(parts, ignore_index=True)
    frame.insert(3, "token", decode_tokens(inputs.tokenizer, frame["token_id"].to_numpy()))
    frame["role"] = pd.Categorical(frame["role"], categories=["chosen", "rejected", "other"])
    return frame[columns]
