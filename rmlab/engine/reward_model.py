"""Run an explicit reward model (a sequence classifier) over preference pairs or single responses.

Shared first step of :func:`rmlab.reward_scores`, :func:`rmlab.dense_rewards` and
:func:`rmlab.attribute_reward`: every input check happens in :func:`prepare_reward_inputs`, before
any model runs. Scores come from the model's own forward pass, so they are pooled exactly as the
model was trained (for causal reward models: the head at the rightmost non-padding token, as
transformers' ``*ForSequenceClassification`` and TRL's ``RewardTrainer`` do; for encoders: the
class-token pooler).

Prefix scores at every position (dense rewards) live in :mod:`rmlab.engine.prefix_scores`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from tqdm.auto import tqdm

from rmlab.cache import ChunkCache, compute_dtype, run_cached, sequences_digest, tokenizer_digest, weights_digest
from rmlab.engine.batching import batch_budget, length_batches, pad_right
from rmlab.engine.precision import autocast, autocast_dtype
from rmlab.errors import TokenizerError
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
    padded = padded_batches(model, sequences, pad_id, batch_tokens, autocast_dtype, progress, desc)
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


def padded_batches(model, sequences, pad_id: int, batch_tokens, autocast_dtype, progress: bool, desc: str):
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
