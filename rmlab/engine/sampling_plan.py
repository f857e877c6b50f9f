"""Which completions decode together: the batch plan of a sampling call and its default budget.

Every (prompt, sample) row is one sequence of at most ``prompt + max_new_tokens`` tokens. Rows are
sorted by length, so a batch holds prompts of similar length, and batched under a budget of rows
(``batch_size``) and padded tokens (``batch_tokens``). By default the KV cache of a batch stays
within about 1 GiB on a CPU (40% of free memory on CUDA) and its logits within a quarter of that.
"""

from __future__ import annotations

import torch

from rmlab.engine.batching import length_batches
from rmlab.io.models import model_device


def kv_bytes_per_token(model) -> int:
    """Bytes of KV cache one token takes in ``model`` (keys and values of every layer, as the
    multi-head / grouped-query attention of Vaswani et al. 2017 and Ainslie et al. 2023 store them)."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None) or 12
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None) or 768
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None) or 12
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    elem = torch.finfo(next(model.parameters()).dtype).bits // 8
    return max(1, 2 * layers * kv_heads * head_dim * elem)


def default_batch(model) -> tuple[int, int]:
    """``(batch_tokens, batch_size)`` for sampling: the KV cache within ~1 GiB on a CPU (40% of free
    memory on CUDA) and the per-row logits within a quarter of that; at most 256 rows on a CPU
    (the budget of the batched ancestral sampler behind Gao et al. 2022's best-of-n pools)."""
    dev = model_device(model)
    if dev.type == "cuda":
        budget = int(0.4 * torch.cuda.mem_get_info(dev)[0])
    else:
        budget = 1 << 30
    vocab = model.get_output_embeddings().weight.shape[0]
    rows = max(1, budget // 4 // (vocab * 24))
    if dev.type != "cuda":
        rows = min(rows, 256)
    return max(1, budget // kv_bytes_per_token(model)), rows


def sampling_plan(
    model, prompt_lengths: list[int], n: int, max_new_tokens: int, *, batch_tokens: int | None,
    batch_size: int | None, padded: bool,
) -> list[list[int]]:
    """Batches of rows ``r = i * n + k`` (prompt ``i``, sample ``k``) under the budgets.

    ``padded=False`` (models whose mask is not a padding mask, see
    :func:`rmlab.engine.decoding.decoding_mode`) puts only rows of one length in a batch.
    Sequence lengths are counted as ``prompt + max_new_tokens``, so a batch never outgrows its
    budget as it decodes (Gao et al. 2022 sample whole completions per prompt).
    """
    default_tokens, default_rows = default_batch(model)
    budget, rows_cap = batch_tokens or default_tokens, batch_size or default_rows
    lengths = [prompt_lengths[r // n] + max_new_tokens for r in range(len(prompt_lengths) * n)]
    if padded:
        return length_batches(lengths, budget, max_items=rows_cap)
    by_length: dict[int, list[int]] = {}
    for r, length in enumerate(lengths):
        by_length.setdefault(length, []).append(r)
    return [
        [rows[i] for i in batch]
        for length in sorted(by_length, reverse=True)
        for rows in [by_length[length]]
        for batch in length_batches([length] * len(rows), budget, max_items=rows_cap)
    ]
