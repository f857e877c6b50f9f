"""Run a policy (and a reference) over preference pairs: every per-token log-prob, once.

This is the shared first step of implicit DPO rewards, token rewards, step rewards and the
diagnostics built on them. All input checks happen here, before any model runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from rmlab.engine.precision import autocast_dtype
from rmlab.engine.runner import runner_for
from rmlab.errors import ArgumentError, TokenizerError
from rmlab.options import OPTION_NAMES, Options, resolve_options
from rmlab.io.models import (
    check_context,
    check_same_tokenizer,
    check_vocab_covers,
    load_causal_lm,
    load_tokenizer,
    padding_id,
)
from rmlab.io.pairs import load_pairs
from rmlab.io.tokenize import EncodedPair, EncodedSequence, encode_pairs


@dataclass
class PairLogprobs:
    """Per-token log-probs of both responses of every pair.

    ``policy[2 * i]`` / ``policy[2 * i + 1]`` hold the chosen / rejected response tokens of pair
    ``i`` (float32 arrays); ``reference`` likewise, or None when no reference model was run.
    """

    pairs: pd.DataFrame
    encoded: list[EncodedPair]
    policy: list[np.ndarray]
    reference: list[np.ndarray] | None
    tokenizer: object

    def side(self, which: str, i: int, model: str = "policy") -> np.ndarray:
        values = self.policy if model == "policy" else self.reference
        return values[2 * i + (0 if which == "chosen" else 1)]


def check_beta(beta) -> float:
    """Return beta as a float, or raise :class:`ArgumentError` unless it is a finite number > 0."""
    try:
        value = float(beta)
    except (TypeError, ValueError):
        raise ArgumentError(f"beta={beta!r} must be a number > 0 (DPO's KL coefficient, e.g. 0.1).") from None
    if not np.isfinite(value) or value <= 0:
        raise ArgumentError(f"beta={beta!r} must be a finite number > 0 (DPO's KL coefficient, e.g. 0.1).")
    return value


@dataclass
class PairInputs:
    """Validated models, tokenizer and pairs, tokenised as TRL's DPOTrainer; nothing has run yet.

    ``sequences[2 * i]`` / ``sequences[2 * i + 1]`` are the chosen / rejected sequences of pair ``i``
    (:class:`EncodedSequence`: ``ids`` and ``start``, the first response token).
    """

    pairs: pd.DataFrame
    encoded: list[EncodedPair]
    policy: torch.nn.Module
    reference: torch.nn.Module | None
    tokenizer: object
    pad_id: int
    options: Options

    @property
    def sequences(self) -> list[EncodedSequence]:
        return [s for p in self.encoded for s in (p.chosen, p.rejected)]

    @property
    def batch_tokens(self) -> int | None:
        return self.options.batch_tokens

    @property
    def dtype(self):
        return self.options.dtype

    @property
    def runner(self):
        """The forward runner the options name (:mod:`rmlab.engine.runner`)."""
        return runner_for(self.options.runner)

    def autocast_dtype(self, model) -> torch.dtype | None:
        """The dtype to autocast ``model`` to (see :mod:`rmlab.engine.precision`)."""
        return autocast_dtype(model, self.options.dtype)

    def batch_plan(self, model) -> dict:
        """How the engine runs these pairs through ``model``: the chosen and rejected response of a
        pair in one forward pass, length-bucketed under ``batch_tokens``, padded with ``pad_id``."""
        return dict(
            groups=[[2 * i, 2 * i + 1] for i in range(len(self.encoded))],
            batch_tokens=self.batch_tokens,
            pad_id=self.pad_id,
            autocast_dtype=self.autocast_dtype(model),
        )


def load_pair_models(policy, reference, options: Options):
    """Load (or check) the policy, the reference (None allowed) and their tokenizer.

    Raises :class:`ModelError` for models that are not causal LMs and :class:`TokenizerError` for
    tokenizers that disagree or do not fit the models; nothing runs.
    """
    policy_model = load_causal_lm(policy, role="policy", **options.loading)
    tok = load_tokenizer(options.tokenizer, policy, role="policy", trust_remote_code=options.trust_remote_code)
    check_vocab_covers(policy_model, tok, role="policy")
    ref_model = None
    if reference is not None:
        ref_model = load_causal_lm(reference, role="reference", **options.loading)
        if isinstance(reference, (str, os.PathLike)):
            try:
                ref_tok = load_tokenizer(None, reference, role="reference")
            except TokenizerError:  # no tokenizer saved beside the reference: the policy's is used
                ref_tok = None
            if ref_tok is not None:
                check_same_tokenizer(tok, ref_tok)
        check_vocab_covers(ref_model, tok, role="reference")
    return policy_model, ref_model, tok


def prepare_pair_inputs(policy, reference, data, *, options: Options | None = None, **flat) -> PairInputs:
    """Validate everything and tokenise as TRL's DPOTrainer; no model runs here.

    ``options`` (:class:`rmlab.Options`, or its fields as flat keywords) says how to load, tokenise
    and batch. ``reference=None`` prepares the policy alone; a :class:`rmlab.ModelPair` as
    ``policy`` brings its loaded models and tokenizer. Raises the specific errors of
    :mod:`rmlab.errors` for bad data, models that are not causal LMs, tokenizers that disagree or do
    not fit the model, and sequences longer than a model's context.
    """
    opts = resolve_options(options, "prepare_pair_inputs", **flat)
    pairs = load_pairs(data)
    from rmlab.engine.model_pair import ModelPair  # builds on this module

    if isinstance(policy, ModelPair):
        if reference is not None and reference is not policy.reference:
            raise ArgumentError("A ModelPair brings its own reference: pass reference=None (or the pair's own).")
        given = (*getattr(options, "given", OPTION_NAMES if options is not None else ()), *flat)
        opts = policy.with_call(opts, given)
        policy_model, ref_model, tok = policy.policy, policy.reference, policy.tokenizer
    else:
        policy_model, ref_model, tok = load_pair_models(policy, reference, opts)
    encoded = encode_pairs(pairs, tok, **opts.tokenizing)
    lengths = [
        (f"Row {i}, {side}", len(getattr(p, side).ids), p.prompt_tokens)
        for i, p in enumerate(encoded)
        for side in ("chosen", "rejected")
    ]
    check_context(lengths, policy_model, "policy", opts.max_length)
    if ref_model is not None:
        check_context(lengths, ref_model, "reference", opts.max_length)
    return PairInputs(
        pairs=pairs, encoded=encoded, policy=policy_model, reference=ref_model, tokenizer=tok,
        pad_id=padding_id(tok, policy_model), options=opts,
    )


def run_logprobs(inputs: PairInputs, model, role: str, *, progress: bool = True) -> list[np.ndarray]:
    """Per-token log-probs of every response of ``inputs`` under ``model`` (chosen and rejected of a
    pair in one forward pass; length-bucketed batches under ``batch_tokens``)."""
    return inputs.runner.logprobs(
        model, inputs.sequences, **inputs.batch_plan(model), progress=progress, desc=f"{role} log-probs"
    )


def pair_logprobs(policy, reference, data, *, progress: bool = True, **options) -> PairLogprobs:
    """Validate everything, tokenise as TRL's DPOTrainer, then score every response token.

    ``options`` are those of :func:`prepare_pair_inputs`. ``reference=None`` runs the policy only.
    The one-off form of :meth:`rmlab.ModelPair.logprobs` (nothing is kept for a later call).
    """
    from rmlab.engine.model_pair import ModelPair  # builds on this module

    return ModelPair(policy, reference, memory=0, progress=progress, **options).logprobs(data)
