"""Running a prompt once and continuing several sequences from its KV cache, exactly.

Preference pairs share their prompt, so the engine runs it once and resumes both responses from
the prompt's key/value cache. Two facts make that exact on every architecture:

* **Prompts are left-padded** (positions count real tokens only) and continuations are appended
  right after them. The real tokens of every row are then contiguous in the cache's index space,
  so an attention window measured in cache slots (sliding-window layers of Mistral, Gemma 2/3,
  Qwen2 and others keep only the last ``window - 1`` slots) covers the same tokens as in the
  model's own forward of the sequence alone. Right-padded prompts put padding slots between the
  prompt and its continuation, and a sliding window then sees padding instead of the prompt.
* **The check exercises what real data does**: :func:`probe_sequences` builds groups whose prompts
  have different lengths (so they are padded) and whose sequences are longer than every attention
  window the model's config declares, so a model where continuing from the cache is not exact is
  caught before any result is returned (the callers then run every sequence whole).

The cache is passed and read under the name the installed transformers uses (``cache`` from
transformers 5.x, ``past_key_values`` before).
"""

from __future__ import annotations

import inspect
import warnings
import weakref
from collections.abc import Sequence

import torch

from rmlab.engine.batching import pad_right

#: Config attributes that bound how far back a layer attends (in tokens).
_WINDOW_FIELDS = ("sliding_window", "attention_chunk_size", "local_attention", "attention_window", "window_size")

_CACHE_KWARG: dict[type, str] = {}


def cache_kwarg(module) -> str:
    """Name of the forward argument that takes a KV cache: ``cache`` or (older) ``past_key_values``."""
    cls = type(module)
    if cls not in _CACHE_KWARG:
        try:
            params = inspect.signature(module.forward).parameters
        except (TypeError, ValueError):
            params = {}
        _CACHE_KWARG[cls] = "cache" if "cache" in params else "past_key_values"
    return _CACHE_KWARG[cls]


def output_cache(output):
    """The KV cache a forward returned, read under the field name its output class defines (None
    when the class has none: a model whose recurrent state is not a transformers cache)."""
    fields = getattr(type(output), "__dataclass_fields__", {})
    for name in ("cache", "past_key_values", "cache_params"):
        if name in fields:
            return getattr(output, name)
    return None


def with_cache(module, cache, **inputs):
    """Run ``module`` with ``cache`` passed under the keyword its forward expects."""
    return module(**inputs, **{cache_kwarg(module): cache})


def attention_windows(model) -> list[int]:
    """Every attention window (in tokens) the model's config declares, ascending; [] if none."""
    config = model.config
    configs = [config]
    if hasattr(config, "get_text_config"):
        configs.append(config.get_text_config())
    found = set()
    for cfg in configs:
        if getattr(cfg, "use_sliding_window", True) is False:
            continue
        for name in _WINDOW_FIELDS:
            value = getattr(cfg, name, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                found.add(value)
            elif isinstance(value, (list, tuple)):
                found.update(v for v in value if isinstance(v, int) and v > 0)
    return sorted(found)


def window_regime(model, length: int) -> int:
    """How many of the model's attention windows a sequence of ``length`` tokens may reach.

    Sharing a prompt is checked once per regime: sequences shorter than every window never meet a
    window's edge, longer ones do, and the check must use sequences as long as the data's.
    """
    return sum(1 for w in attention_windows(model) if length + 2 >= w)


def probe_length(model, regime: int) -> int:
    """Length of the longest check sequence for ``regime`` (within the model's context): short of
    every window for regime 0; otherwise long enough that both a prompt and a continuation are
    longer than the regime's largest window."""
    windows = attention_windows(model)
    if regime == 0:
        length = 16 if not windows else max(4, min(16, windows[0] - 3))
    else:
        length = 2 * windows[regime - 1] + 6
    limit = getattr(model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config,
                    "max_position_embeddings", None)
    return min(length, limit) if isinstance(limit, int) and limit > 4 else length


def probe_sequences(model, regime: int, pad_id: int, seed: int = 1) -> tuple[list[list[int]], list[list[list[int]]]]:
    """Two groups of two continuations of two prompts of different lengths, for checking sharing.

    The first sequence of each group has :func:`probe_length` tokens, so both prompts and the
    continuations are padded and every sequence of the regime's length meets its windows.
    """
    length = probe_length(model, regime)
    vocab = model.get_input_embeddings().weight.shape[0]
    generator = torch.Generator().manual_seed(seed)
    drawn = torch.randint(0, vocab, (4 * length,), generator=generator).tolist()
    tokens = [t if t != pad_id else (pad_id + 1) % vocab for t in drawn]
    long_prompt = max(2, length // 2)
    short_prompt = max(1, long_prompt - 3)
    prompts = [tokens[:long_prompt], tokens[length : length + short_prompt]]
    rest = tokens[2 * length :]
    groups = [
        [rest[: length - long_prompt], rest[: max(1, length - long_prompt - 2)][::-1]],
        [rest[length : 2 * length - short_prompt], rest[length : length + 2]],
    ]
    return prompts, groups


def pad_left(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-pad id lists into ``(input_ids, attention_mask, position_ids)``; positions count real
    tokens only, so every row's last real token sits in the last column."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if len(seq):
            ids[row, width - len(seq) :] = torch.as_tensor(seq, dtype=torch.long)
            mask[row, width - len(seq) :] = 1
    positions = (mask.cumsum(1) - 1).clamp_(min=0)
    return ids, mask, positions


def prompt_then_continuations(module, prompts, continuations, pad_id: int, device):
    """Run left-padded ``prompts`` through ``module`` once, then every group's continuations
    (right-padded, appended after the prompt) from the prompt's KV cache.

    ``continuations[g]`` lists the continuations of ``prompts[g]``, the same number for every
    group. Returns the two forward outputs: row ``g`` of the first is prompt ``g`` (its last real
    token in the last column), row ``g * width + k`` of the second is continuation ``k`` of group
    ``g`` (from column 0).
    """
    width = len(continuations[0])
    p_ids, p_mask, p_pos = (t.to(device) for t in pad_left(prompts, pad_id))
    prompt_out = module(input_ids=p_ids, attention_mask=p_mask, position_ids=p_pos, use_cache=True)
    cache = output_cache(prompt_out)
    cache.batch_repeat_interleave(width)
    flat = [list(c) for group in continuations for c in group]
    c_ids, c_mask = (t.to(device) for t in pad_right(flat, pad_id))
    lengths = torch.tensor([len(p) for p in prompts], device=device).repeat_interleave(width)
    mask = torch.cat([p_mask.repeat_interleave(width, dim=0), c_mask], dim=1)
    # padding after a short continuation repeats its last position, which stays inside the context
    last = lengths + torch.tensor([len(c) for c in flat], device=device) - 1
    positions = torch.minimum(lengths[:, None] + torch.arange(c_ids.shape[1], device=device)[None, :], last[:, None])
    cont_out = with_cache(
        module, cache, input_ids=c_ids, attention_mask=mask, position_ids=positions, use_cache=True
    )
    return prompt_out, cont_out


_WARNED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def warn_once(model, key, message: str, stacklevel: int = 3) -> None:
    """Emit ``message`` as a warning the first time ``key`` is seen for ``model``."""
    seen = _WARNED.setdefault(model, set())
    if key not in seen:
        seen.add(key)
        warnings.warn(message, stacklevel=stacklevel + 1)
