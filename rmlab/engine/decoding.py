"""Decoding with a KV cache, exactly: the sampler's randomness, token choice and decoding loop.

The random number that picks token ``t`` of sample ``k`` of prompt ``i`` is a counter-based hash
of ``(seed, i, k, t)`` (SplitMix64), so a row's draw does not depend on its batch; a token is
drawn by inverse-CDF sampling from the temperature / top-p distribution (Holtzman et al. 2020)
with that number. :func:`decode_batch` decodes rows together from left-padded prompts;
:func:`decoding_mode` checks once per model, before any sampling, that this follows the model's
own forward (and picks unpadded decoding for models whose mask is not a padding mask).
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Sequence

import numpy as np
import torch

from rmlab.engine.kv_cache import cache_kwarg, output_cache, probe_sequences, warn_once, window_regime
from rmlab.engine.logprobs import Scored, own_forward_logprobs
from rmlab.errors import ModelError
from rmlab.io.models import model_device


# --------------------------------------------------------------------------------------------------
# randomness: a counter-based hash of (seed, prompt, sample, step)
# --------------------------------------------------------------------------------------------------
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on a uint64 array (wraps around, as intended)."""
    x = x ^ (x >> np.uint64(30))
    x = x * _M1
    x = x ^ (x >> np.uint64(27))
    x = x * _M2
    return x ^ (x >> np.uint64(31))


def row_keys(seed: int, prompt_index, sample_index) -> np.ndarray:
    """One 64-bit key per (prompt, sample) row, from the seed."""
    p = np.asarray(prompt_index, dtype=np.uint64)
    s = np.asarray(sample_index, dtype=np.uint64)
    base = _mix(np.full(p.shape, seed % (1 << 64), dtype=np.uint64) + _GOLDEN)
    return _mix(_mix(base ^ _mix(p + _GOLDEN)) ^ _mix(s + _M1))


def row_uniforms(keys: np.ndarray, steps: int) -> np.ndarray:
    """``(rows, steps)`` uniform numbers in [0, 1): step ``t`` of row ``r`` depends on ``keys[r]`` and
    ``t`` only."""
    t = np.arange(1, steps + 1, dtype=np.uint64)
    x = _mix(keys[:, None] ^ _mix(t[None, :] * _GOLDEN))
    return (x >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


# --------------------------------------------------------------------------------------------------
# the decoding loop
# --------------------------------------------------------------------------------------------------
def pick_tokens(
    logits: torch.Tensor, u: torch.Tensor, temperature: float, top_p: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row by inverse-CDF sampling with the uniform numbers ``u``.

    The sampling distribution is ``softmax(logits / temperature)`` restricted to the smallest set of
    most likely tokens whose mass reaches ``top_p`` (nucleus sampling, Holtzman et al. 2020), in
    float64. Returns the tokens and their log-probs under the *policy*, ``log_softmax(logits)`` at
    temperature 1 (what KL needs), whatever the sampling settings.
    """
    lf = logits.float()
    policy_lp = torch.log_softmax(lf, dim=-1)
    if temperature == 1.0:
        probs = policy_lp.double().exp()
    else:
        probs = torch.softmax(lf.double() / temperature, dim=-1)
    if top_p < 1.0:
        sp, si = probs.sort(dim=-1, descending=True, stable=True)
        before = sp.cumsum(dim=-1) - sp
        sp = sp.masked_fill(before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(1, si, sp)
    cdf = probs.cumsum(dim=-1)
    total = cdf[:, -1]
    if not bool(torch.isfinite(total).all()) or not bool((total > 0).all()):
        raise ModelError("The model produced non-finite logits while sampling (NaN or inf); check its weights/dtype.")
    target = torch.minimum(u.to(cdf) * total, torch.nextafter(total, torch.zeros_like(total)))
    tokens = torch.searchsorted(cdf, target[:, None], right=True).squeeze(1).clamp_(max=cdf.shape[1] - 1)
    return tokens, policy_lp.gather(1, tokens[:, None]).squeeze(1)


_NO_LOGITS_TO_KEEP: weakref.WeakSet = weakref.WeakSet()


def _forward(model, **inputs):
    """The model's forward, asking for the last position's logits only where the model allows it."""
    if model not in _NO_LOGITS_TO_KEEP:
        try:
            return model(**inputs, logits_to_keep=1)
        except TypeError:
            _NO_LOGITS_TO_KEEP.add(model)
    return model(**inputs)


def decode_batch(
    model,
    prompt_ids: Sequence[Sequence[int]],
    uniforms: np.ndarray,
    *,
    temperature: float,
    top_p: float,
    stop_ids: Sequence[int],
    pad_id: int,
    on_finished: Callable[[int], None] | None = None,
    padded: bool = True,
) -> tuple[list[list[int]], list[bool], list[np.ndarray]]:
    """Sample one completion per prompt in ``prompt_ids`` (rows), together, with a KV cache.

    Prompts are left-padded (positions count real tokens only); with ``padded=False`` every prompt
    must have one length and the model gets no attention mask or positions, only ids and its
    cache (for models whose mask means something else, see :func:`decoding_mode`). ``uniforms[r, t]`` picks token ``t``
    of row ``r`` (see :func:`pick_tokens`). A row stops at its first stop token (kept as the last
    token) or after ``uniforms.shape[1]`` tokens; finished rows leave the cache as the batch goes
    on. Returns per row the generated ids, whether a stop token ended them, and the sampler's
    per-token log-probs (used to check the engine's).
    """
    device = model_device(model)
    rows, steps = len(prompt_ids), uniforms.shape[1]
    width = max(len(p) for p in prompt_ids)
    ids = torch.full((rows, width), pad_id, dtype=torch.long)
    mask = torch.zeros((rows, width), dtype=torch.long)
    for r, p in enumerate(prompt_ids):
        ids[r, width - len(p):] = torch.as_tensor(p, dtype=torch.long)
        mask[r, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    pos = (mask.cumsum(1) - 1).clamp_(min=0)
    u_all = torch.as_tensor(uniforms, dtype=torch.float64, device=device)
    stop = torch.as_tensor(list(stop_ids), dtype=torch.long, device=device)
    out = torch.full((rows, steps), pad_id, dtype=torch.long, device=device)
    lps = torch.zeros((rows, steps), dtype=torch.float32, device=device)
    n_gen = torch.zeros(rows, dtype=torch.long, device=device)
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    live = torch.arange(rows, device=device)  # original row of each cache row
    alive = torch.ones(rows, dtype=torch.bool, device=device)  # cache rows still decoding
    if not padded and len({len(p) for p in prompt_ids}) > 1:
        raise ValueError("padded=False needs prompts of one length")
    inputs = dict(attention_mask=mask, position_ids=pos) if padded else {}
    result = _forward(model, input_ids=ids, use_cache=True, **inputs)
    cache, logits = output_cache(result), result.logits[:, -1]
    if cache is None:
        raise ModelError(f"{type(model).__name__} returns no KV cache to continue decoding from.")
    compactable = hasattr(cache, "batch_select_indices")
    for t in range(steps):
        tokens, lp = pick_tokens(logits, u_all[live, t], temperature, top_p)
        tokens = torch.where(alive, tokens, torch.full_like(tokens, pad_id))
        out[live[alive], t] = tokens[alive]
        lps[live[alive], t] = lp[alive]
        n_gen[live[alive]] = t + 1
        ended = alive & torch.isin(tokens, stop) if len(stop) else torch.zeros_like(alive)
        if bool(ended.any()):
            done[live[ended]] = True
            alive = alive & ~ended
            if on_finished is not None:
                on_finished(int(ended.sum()))
        if t == steps - 1 or not bool(alive.any()):
            break
        if compactable and int((~alive).sum()) * 8 >= len(alive):  # drop finished rows from the cache
            keep = alive.nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            mask, pos, live, tokens, alive = mask[keep], pos[keep], live[keep], tokens[keep], alive[keep]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        pos = pos[:, -1:] + 1
        inputs = dict(attention_mask=mask, position_ids=pos) if padded else {}
        result = _forward(model, input_ids=tokens[:, None], use_cache=True, **inputs, **{cache_kwarg(model): cache})
        cache, logits = output_cache(result), result.logits[:, -1]
    if on_finished is not None and int((~done).sum()):
        on_finished(int((~done).sum()))
    n_gen, out, lps, done = n_gen.cpu().tolist(), out.cpu(), lps.cpu(), done.cpu().tolist()
    return (
        [out[r, : n_gen[r]].tolist() for r in range(rows)],
        done,
        [lps[r, : n_gen[r]].numpy() for r in range(rows)],
    )


_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_DECODING: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _decoding_error(model, prompts, pad_id: int, steps: int, padded: bool) -> float:
    """Largest difference between :func:`decode_batch`'s step log-probs and the model's own forward."""
    uniforms = np.random.default_rng(0).random((len(prompts), steps))
    with torch.inference_mode():
        tokens, _, step_lp = decode_batch(
            model, prompts, uniforms, temperature=1.0, top_p=1.0, stop_ids=[], pad_id=pad_id, padded=padded
        )
        alone = [
            own_forward_logprobs(model, Scored(tuple(p) + tuple(t), len(p))).cpu().numpy()
            for p, t in zip(prompts, tokens)
        ]
    return max(float(np.abs(a - b).max()) for a, b in zip(step_lp, alone))


def decoding_mode(model, pad_id: int, length: int = 0) -> str:
    """How :func:`decode_batch` decodes ``model`` exactly, for sequences of up to ``length`` tokens:
    ``"padded"`` (left-padded prompts of any lengths together) or ``"unpadded"`` (prompts of one
    length together, no attention mask: for models such as Mamba whose mask is not a padding mask
    over the whole sequence).

    Checked once per model and attention-window regime (:func:`rmlab.engine.kv_cache.window_regime`)
    before any sampling: prompts decode past the regime's attention windows and every step's
    log-prob is compared with the model's own forward of that prompt and those tokens alone. The
    unpadded mode is used, with a one-line warning, only when the padded one differs. Raises
    :class:`ModelError` for a model whose forward returns no KV cache to continue from (e.g. RWKV,
    RecurrentGemma) or that neither mode decodes exactly.
    """
    regime = window_regime(model, length)
    known = _DECODING.setdefault(model, {})
    if regime in known:
        return known[regime]
    name = f"{type(model).__name__} ({getattr(model.config, 'model_type', '?')})"
    advice = "Sample with the model's own generate() and score the completions with rmlab.completion_logprobs."
    probe = torch.full((1, 2), (pad_id + 1) % model.get_input_embeddings().weight.shape[0], device=model_device(model))
    with torch.inference_mode():
        out = model(input_ids=probe, attention_mask=torch.ones_like(probe), use_cache=True)
    if output_cache(out) is None:
        raise ModelError(f"{name} returns no KV cache to continue decoding from, so rmlab's sampler cannot run it. {advice}")
    prompts, groups = probe_sequences(model, regime, pad_id)
    # the long prompt is past the regime's windows already; a few steps decode beyond it (each
    # step of a large model costs a forward, so the check stays short)
    steps = max(3, min(len(groups[0][0]), 12))
    tol = 1e-3 if next(model.parameters()).dtype == torch.float32 else 0.1
    padded = _decoding_error(model, [prompts[0], prompts[1][:2]], pad_id, steps, padded=True)
    mode = "padded"
    if not padded <= tol:
        unpadded = _decoding_error(model, [prompts[0], prompts[0][::-1]], pad_id, steps, padded=False)
        if not unpadded <= tol:
            raise ModelError(
                f"rmlab's sampler cannot decode {name} exactly: its step-by-step log-probs differ from its "
                f"own forward by {min(padded, unpadded):.2g}. {advice}"
            )
        mode = "unpadded"
        warn_once(
            model, ("decoding", regime),
            f"{name}: decoding left-padded prompts changes its log-probs by {padded:.2g}; only prompts of "
            "equal length decode together, without padding (exact, slower).",
        )
    known[regime] = mode
    return mode


def check_sampler(model, sampler_lp: list[np.ndarray], engine_lp: list[np.ndarray], *, autocast: bool = False) -> None:
    """Once per model: the sampler's incremental log-probs must equal the engine's full forward
    (``autocast``: both ran under a lower-precision autocast, which widens the tolerance)."""
    if _CHECKED.get(model):
        return
    _CHECKED[model] = True
    err = max((float(np.abs(a - b).max()) for a, b in zip(sampler_lp, engine_lp) if len(a)), default=0.0)
    tol = 1e-3 if next(model.parameters()).dtype == torch.float32 and not autocast else 0.1
    if not err <= tol:
        warnings.warn(
            f"{type(model).__name__}: the sampler's step-by-step log-probs differ from the model's full "
            f"forward by {err:.2e} (left padding or the KV cache may be handled differently by this "
            "architecture), so the samples may not follow the model's distribution exactly. The logp "
            "column comes from the full forward and is exact for the sampled tokens.",
            stacklevel=3,
        )
