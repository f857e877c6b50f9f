"""A policy and its reference, loaded once, that remember the log-probs they computed.

Implicit, token and step rewards, ranking accuracy and the reference sums of the gradient
diagnostics all start from the same beta-free numbers: the per-token log-probs of every chosen and
rejected response under the policy and the reference (Rafailov et al. 2023). :class:`ModelPair`
holds the two models, one tokenizer and one :class:`rmlab.Options`, and computes those numbers once
per data set: a second analysis of the same pairs reuses them (kept in memory for the last few data
sets, and on disk in the one cache of :mod:`rmlab.cache` when ``cache_dir`` is set, where an
interrupted run resumes). Every pair analysis accepts a ``ModelPair`` where it takes a policy.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pyarrow as pa

from rmlab.cache import (
    ChunkCache,
    compute_dtype,
    resolve_cache_dir,
    run_cached,
    sequences_digest,
    tokenizer_digest,
    weights_digest,
)
from rmlab.engine.batching import batch_budget, length_batches
from rmlab.engine.pairs import PairInputs, PairLogprobs, load_pair_models, prepare_pair_inputs, run_logprobs
from rmlab.options import LOADING, OPTION_NAMES, Options, resolve_options

#: Bump when a change to the engine changes the log-probs it computes (invalidates caches).
LOGPROBS_VERSION = 1

_FLOATS = pa.list_(pa.float32())


class ModelPair:
    """A policy, its reference (or None), their tokenizer and the run options, loaded once.

    Args:
        policy, reference: ``PreTrainedModel`` s or hub names / local paths (loaded here, once).
        options: :class:`rmlab.Options` (or its fields as flat keywords) for loading, tokenising,
            batching and caching.
        memory: how many data sets' log-probs to keep in memory (most recent first).

    Example:
        >>> import rmlab
        >>> from rmlab.toy import tiny_causal_lm, tiny_tokenizer
        >>> pair = rmlab.ModelPair(tiny_causal_lm("gpt2", seed=1), tiny_causal_lm("gpt2"), tokenizer=tiny_tokenizer(), progress=False)
        >>> data = [{"prompt": "Review:", "chosen": " great film", "rejected": " dull film"}]
        >>> rewards = rmlab.implicit_rewards(pair, data, beta=0.1)  # the models ran once
        >>> tokens = rmlab.token_rewards(pair, data, beta=0.1)      # the same log-probs, reused
        >>> len(rewards), int(tokens["pair"].max())
        (1, 0)
    """

    def __init__(self, policy, reference=None, *, options: Options | None = None, memory: int = 4, **flat):
        opts = resolve_options(options, "ModelPair", **flat)
        self.policy, self.reference, self.tokenizer = load_pair_models(policy, reference, opts)
        self.options = opts.replace(tokenizer=self.tokenizer)
        self._memory = max(0, int(memory))
        self._memo: OrderedDict[tuple, PairLogprobs] = OrderedDict()

    def __repr__(self) -> str:
        ref = type(self.reference).__name__ if self.reference is not None else None
        return f"ModelPair(policy={type(self.policy).__name__}, reference={ref})"

    def inputs(self, data, options: Options | None = None) -> PairInputs:
        """The validated, tokenised pairs of ``data`` for these models (nothing runs)."""
        opts = self.with_call(options)
        return prepare_pair_inputs(self.policy, self.reference, data, options=opts)

    def logprobs(self, data, *, options: Options | None = None, reference: bool = True) -> PairLogprobs:
        """Per-token log-probs of every response of ``data`` under the policy (and the reference
        unless ``reference=False``), computed once per data set and tokenisation."""
        opts = self.with_call(options)
        inputs = self.inputs(data, opts)
        seqs = inputs.sequences
        key = (
            sequences_digest((s.ids for s in seqs), (s.start for s in seqs)),
            opts.batch_tokens, str(opts.dtype), reference and self.reference is not None,
        )
        if key in self._memo:
            self._memo.move_to_end(key)
            hit = self._memo[key]
            return PairLogprobs(pairs=inputs.pairs, encoded=inputs.encoded, policy=hit.policy,
                                reference=hit.reference, tokenizer=inputs.tokenizer)
        models = [("policy", self.policy)] + ([("reference", self.reference)] if key[-1] else [])
        cache_dir = resolve_cache_dir(opts.cache_dir, opts.overwrite_cache)
        runs = {
            role: (
                run_logprobs(inputs, model, role, progress=opts.progress)
                if cache_dir is None
                else cached_logprobs(inputs, model, role, cache_dir, overwrite=opts.overwrite_cache, progress=opts.progress)
            )
            for role, model in models
        }
        result = PairLogprobs(
            pairs=inputs.pairs, encoded=inputs.encoded, policy=runs["policy"], reference=runs.get("reference"),
            tokenizer=inputs.tokenizer,
        )
        if self._memory:
            self._memo[key] = result
            while len(self._memo) > self._memory:
                self._memo.popitem(last=False)
        return result

    def with_call(self, options: Options | None, given=None) -> Options:
        """This pair's options with the fields a call chose on top: ``given`` names them (default:
        what :func:`rmlab.options.with_options` recorded, i.e. every field of an object the caller
        passed and the flat keywords); the models and their tokenizer stay this pair's."""
        if options is None:
            return self.options
        if given is None:
            given = getattr(options, "given", OPTION_NAMES)
        fixed = ("tokenizer", *LOADING)
        chosen = {name: getattr(options, name) for name in given if name not in fixed}
        return self.options.replace(**chosen) if chosen else self.options


def cached_logprobs(
    inputs: PairInputs, model, role: str, cache_dir, *, overwrite: bool = False, progress: bool = True
) -> list[np.ndarray]:
    """Per-token log-probs of every response of ``inputs`` under ``model``, with a resumable cache.

    The entry ``logprobs-<key>`` holds, per pair, the per-token log-probs of the chosen and the
    rejected response under ``model`` (float32, exactly as the engine returns them); its key is the
    model's weights, the tokenizer, the token ids of every sequence (and where its response starts),
    the device type and the compute dtype (see :mod:`rmlab.cache`). It depends on nothing else, so a
    reference model's entry serves every policy scored against it, and ``beta`` never enters it.
    The engine runs batch by batch on the same length-bucketed batches as without a cache, so the
    numbers are the same as an uncached call's; finished pairs are saved in chunks as they finish.
    """
    device = next(model.parameters()).device
    autocast = inputs.autocast_dtype(model)
    seqs = inputs.sequences
    meta = {
        "kind": "per-token log-probs of chosen and rejected responses",
        "version": LOGPROBS_VERSION,
        "model": weights_digest(model),
        "model_class": type(model).__name__,
        "tokenizer": tokenizer_digest(inputs.tokenizer),
        "sequences": sequences_digest((s.ids for s in seqs), (s.start for s in seqs)),
        "pairs": len(inputs.encoded),
        "device": device.type,
        "compute_dtype": compute_dtype(model, autocast),
    }
    cache = ChunkCache(cache_dir, "logprobs", meta, overwrite=overwrite)
    lengths = [max(len(p.chosen.ids), len(p.rejected.ids)) for p in inputs.encoded]
    batches = length_batches(lengths, batch_budget(inputs.batch_tokens, device), width=2)  # the engine's batches

    def compute(todo: list[int]) -> dict[str, list]:
        values = inputs.runner.logprobs(
            model,
            [s for i in todo for s in (seqs[2 * i], seqs[2 * i + 1])],
            groups=[[2 * k, 2 * k + 1] for k in range(len(todo))],
            batch_tokens=inputs.batch_tokens,
            pad_id=inputs.pad_id,
            autocast_dtype=autocast,
            progress=False,
        )
        return {"chosen": values[0::2], "rejected": values[1::2]}

    out = run_cached(
        cache, batches, compute, {"chosen": _FLOATS, "rejected": _FLOATS},
        progress=progress, desc=f"{role} log-probs", unit="pair",
    )
    return [np.asarray(v, dtype=np.float32) for pair in zip(out["chosen"], out["rejected"]) for v in pair]
