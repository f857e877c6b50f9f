"""Run an explicit reward model (a sequence classifier) over preference pairs or single responses.

Shared first step of :func:`rmlab.reward_scores`, :func:`rmlab.dense_rewards` and
:func:`rmlab.attribute_reward`: every input check happens in :func:`prepare_reward_inputs`, before
any model runs. Scores come from the model's own forward pass, so they are pooled exactly as the
model was trained (for causal reward models: the head at the rightmost non-padding token, as
transformers' ``*ForSequenceClassification`` and TRL's ``RewardTrainer`` do; for encoders: the
class-token pooler).

:func:`position_scores` is the one-pass shortcut for causal reward models: the score head applied
to every hidden state gives, at position ``t``, the score of the prefix ending at ``t`` (causal
attention: no position sees the future). It is checked once per model against scoring prefixes
one by one, and refused for models where that does not hold (encoders).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from tqdm.auto import tqdm

from rmlab.cache import ChunkCache, compute_dtype, run_cached, sequences_digest, tokenizer_digest, weights_digest
from rmlab.engine.batching import batch_budget, length_batches, pad_right
from rmlab.engine.kv_cache import (
    attention_windows,
    probe_sequences,
    prompt_then_continuations,
    warn_once,
    window_regime,
)
from rmlab.engine.precision import autocast, autocast_dtype
from rmlab.errors import ModelError, TokenizerError
from rmlab.options import Options, resolve_options
from rmlab.io.models import (
    check_context,
    load_reward_model,
    load_tokenizer,
    model_device,
    padding_id,
    reward_label,
)
from rmlab.io.responses import load_scoring_data
from rmlab.io.tokenize import EncodedSequence, encode_pairs, encode_responses


@dataclass
class RewardInputs:
    """Validated data, tokenised, with the reward model that will score it.

    For pairs (``kind == "pairs"``) ``sequences[2 * i]`` / ``sequences[2 * i + 1]`` are the chosen /
    rejected sequences of pair ``i``; for responses (``kind == "responses"``) ``sequences[i]`` is
    row ``i``.
    """

    kind: str
    frame: pd.DataFrame
    sequences: list[EncodedSequence]
    model: torch.nn.Module
    tokenizer: object
    label: int
    pad_id: int
    options: Options

    @property
    def batch_tokens(self) -> int | None:
        return self.options.batch_tokens

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The dtype the model's forward autocasts to (see :mod:`rmlab.engine.precision`)."""
        return autocast_dtype(self.model, self.options.dtype)

    @property
    def runner(self):
        """The forward runner the options name (:mod:`rmlab.engine.runner`)."""
        from rmlab.engine.runner import runner_for  # the runner module builds on this one

        return runner_for(self.options.runner)

    @property
    def sides(self) -> tuple[str, ...]:
        return ("chosen", "rejected") if self.kind == "pairs" else ("response",)

    def index(self, seq: int) -> tuple[int, str]:
        """(row of the frame, side) of sequence ``seq``."""
        width = len(self.sides)
        return seq // width, self.sides[seq % width]


@contextlib.contextmanager
def pad_token(model, pad_id: int):
    """Give the model a ``pad_token_id`` for the duration of a call if its config has none."""
    had = getattr(model.config, "pad_token_id", None)
    if had is None:
        model.config.pad_token_id = pad_id
    try:
        yield model.config.pad_token_id
    finally:
        if had is None:
            model.config.pad_token_id = None


def prepare_reward_inputs(
    reward_model, data, *, label=None, role: str = "reward model", options: Options | None = None, **flat
) -> RewardInputs:
    """Validate the model, the tokenizer and the data, then tokenise; nothing heavy runs here.

    ``data`` with ``chosen``/``rejected`` columns are pairs (:func:`rmlab.load_pairs`); anything
    else is read as single responses (:func:`rmlab.io.responses.load_responses`). ``options``
    (:class:`rmlab.Options`, or its fields as flat keywords) says how to load, tokenise and batch;
    ``add_eos=None`` (the default here) appends EOS to plain text when the tokenizer does not close
    texts itself (TRL's ``RewardTrainer`` appends it; encoder tokenizers add their own separator).
    """
    if options is None and "add_eos" not in flat:
        flat["add_eos"] = None
    opts = resolve_options(options, "prepare_reward_inputs", **flat)
    kind, frame = load_scoring_data(data)
    pairs = kind == "pairs"
    model = load_reward_model(reward_model, role=role, **opts.loading)
    index = reward_label(model, label)
    tok = load_tokenizer(opts.tokenizer, reward_model, role=role, trust_remote_code=opts.trust_remote_code)
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tok) > rows:
        raise TokenizerError(
            f"The tokenizer has {len(tok)} tokens but the {role}'s embedding has only {rows} rows: "
            f"they do not belong together. Pass the tokenizer the {role} was trained with."
        )
    if pairs:
        encoded = encode_pairs(frame, tok, **opts.tokenizing)
        sequences = [s for p in encoded for s in (p.chosen, p.rejected)]
        where = [f"Row {i}, {side}" for i in range(len(encoded)) for side in ("chosen", "rejected")]
    else:
        sequences = encode_responses(frame, tok, **opts.tokenizing)
        where = [f"Row {i}" for i in range(len(sequences))]
    check_context([(w, len(s.ids), s.start) for w, s in zip(where, sequences)], model, role, opts.max_length)
    return RewardInputs(
        kind="pairs" if pairs else "responses",
        frame=frame,
        sequences=sequences,
        model=model,
        tokenizer=tok,
        label=index,
        pad_id=padding_id(tok, model, role=role),
        options=opts,
    )


def score_sequences(
    model,
    sequences: Sequence[Sequence[int]],
    *,
    pad_id: int,
    label: int = 0,
    batch_tokens: int | None = None,
    autocast_dtype=None,
    progress: bool = True,
    desc: str = "reward scores",
) -> np.ndarray:
    """One score per id list from the model's own forward pass, in length-bucketed batches.

    Right padding with ``pad_id``; the model pools as it was trained (rightmost non-padding token
    for causal reward models, the class token for encoders).
    """
    out = np.empty(len(sequences), dtype=np.float64)
    # closing(): on an exception the generator's contexts (inference mode, the pad token) end at
    # once, not whenever a traceback holding its frame is collected
    padded = _padded_batches(model, sequences, pad_id, batch_tokens, autocast_dtype, progress, desc)
    with contextlib.closing(padded) as batches:
        for batch, ids, mask, _ in batches:
            out[batch] = model(input_ids=ids, attention_mask=mask).logits[:, label].float().cpu().numpy()
    return out


#: Bump when a change to the engine changes the scores it computes (invalidates caches).
SCORES_VERSION = 1


def reward_cache(inputs: RewardInputs, cache_dir, kind: str, *, overwrite: bool = False, **settings) -> ChunkCache:
    """The cache entry ``<kind>-<key>`` of ``inputs`` in ``cache_dir``.

    The key holds the reward model's weights (and config), the tokenizer, the token ids of every
    sequence, the output label, the padding id (it decides where causal reward models pool), the
    device type, the compute dtype and ``settings`` (see :mod:`rmlab.cache`).
    """
    model = inputs.model
    seqs = inputs.sequences
    meta = {
        "kind": kind,
        "version": SCORES_VERSION,
        "model": weights_digest(model),
        "model_class": type(model).__name__,
        "tokenizer": tokenizer_digest(inputs.tokenizer),
        "sequences": sequences_digest((s.ids for s in seqs), (s.start for s in seqs)),
        "count": len(seqs),
        "label": int(inputs.label),
        "pad_id": int(inputs.pad_id),
        "device": model_device(model).type,
        "compute_dtype": compute_dtype(model, inputs.autocast_dtype),
        **settings,
    }
    return ChunkCache(cache_dir, kind, meta, overwrite=overwrite)


def cached_scores(inputs: RewardInputs, cache_dir, *, overwrite: bool = False, progress: bool = True) -> np.ndarray:
    """:func:`score_sequences` of every sequence of ``inputs``, with a resumable cache.

    The entry ``scores-<key>`` (see :func:`reward_cache`) holds one float64 score per sequence. The
    model runs batch by batch on the same length-bucketed batches as :func:`score_sequences`, so
    the scores equal an uncached call's; finished sequences are saved in chunks as they finish.
    """
    cache = reward_cache(inputs, cache_dir, "scores", overwrite=overwrite)
    ids = [s.ids for s in inputs.sequences]
    budget = batch_budget(inputs.batch_tokens, model_device(inputs.model))
    batches = length_batches([len(s) for s in ids], budget)  # exactly score_sequences' batches

    def compute(todo: list[int]) -> dict[str, list]:
        values = score_sequences(
            inputs.model, [ids[i] for i in todo], pad_id=inputs.pad_id, label=inputs.label,
            batch_tokens=inputs.batch_tokens, autocast_dtype=inputs.autocast_dtype, progress=False,
        )
        return {"score": values.tolist()}

    out = run_cached(
        cache, batches, compute, {"score": pa.float64()}, progress=progress, desc="reward scores", unit="seq"
    )
    return np.asarray(out["score"], dtype=np.float64)


def _padded_batches(model, sequences, pad_id: int, batch_tokens, autocast_dtype, progress: bool, desc: str):
    """Length-bucketed, right-padded batches on the model's device, run under ``inference_mode``
    (and autocast when asked), with the model given ``pad_id`` as its padding token meanwhile.
    Yields ``(indices, input_ids, attention_mask, pad_id used)``. Consume it inside
    ``contextlib.closing``: the contexts stay entered while the generator is suspended."""
    device = model_device(model)
    budget = batch_budget(batch_tokens, device)
    batches = length_batches([len(s) for s in sequences], budget)
    with pad_token(model, pad_id) as pad, torch.inference_mode(), autocast(device, autocast_dtype):
        for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
            ids, mask = pad_right([sequences[i] for i in batch], pad)
            yield batch, ids.to(device), mask.to(device), pad


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
    padded = _padded_batches(model, sequences, pad_id, batch_tokens, autocast_dtype, progress, desc)
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
