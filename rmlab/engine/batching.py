"""Length-bucketed batches under a token budget.

Padding is wasted compute: on a CPU the forward pass is compute-bound, so batches are formed from
items of similar length (sorted, longest first so that an out-of-memory error shows at once), and
each batch holds as many items as fit ``batch_tokens`` counted *with* padding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

#: Padded tokens per forward pass when ``batch_tokens`` is not given.
DEFAULT_BATCH_TOKENS = {"cpu": 2048, "cuda": 32768}


def default_batch_tokens(device: torch.device) -> int:
    """A token budget per forward pass suited to the device type."""
    return DEFAULT_BATCH_TOKENS.get(device.type, 8192)


def batch_budget(batch_tokens: int | None, device: torch.device) -> int:
    """The padded tokens per forward pass: ``batch_tokens`` if given, else the device's default."""
    return batch_tokens or default_batch_tokens(device)


def length_batches(
    lengths: Sequence[int],
    batch_tokens: int,
    *,
    width: int = 1,
    max_items: int | None = None,
) -> list[list[int]]:
    """Group item indices into batches of similar length.

    Args:
        lengths: length of each item (for a group of sequences, the longest of them).
        batch_tokens: budget per batch: ``width * len(batch) * max(length in batch) <= batch_tokens``
            (an item longer than the budget still gets a batch of its own).
        width: sequences per item (2 for a chosen/rejected pair run in one forward pass).
        max_items: optional cap on items per batch.

    Returns:
        Lists of item indices; every index appears exactly once. Batches are ordered longest first,
        items within a batch by decreasing length (ties keep input order), so the result is
        deterministic.
    """
    if batch_tokens < 1:
        raise ValueError(f"batch_tokens={batch_tokens} must be positive.")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        longest_if_added = max(longest, lengths[i])
        too_many = max_items is not None and len(current) >= max_items
        if current and (width * (len(current) + 1) * longest_if_added > batch_tokens or too_many):
            batches.append(current)
            current, longest_if_added = [], lengths[i]
        current.append(i)
        longest = longest_if_added
    if current:
        batches.append(current)
    return batches


def pad_right(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad id lists into ``(input_ids, attention_mask)`` long tensors.

    Right padding keeps every real token at its natural position, so a causal model needs no
    ``position_ids`` and real tokens never attend to padding.
    """
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids, mask
