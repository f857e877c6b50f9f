"""Log-probs of given completions after their prompts: the exact sampled ids, scored by the runner.

The policy side of a sample's log-prob (:func:`rmlab.sample`'s ``logp``) and the reference side of a
KL estimate (:func:`completion_logprobs`) are the same computation: the completion's tokens after
the prompt's ids, scored in one batched pass by the forward runner the options name
(:mod:`rmlab.engine.runner`), so they equal what :func:`rmlab.implicit_rewards` computes for the
same token ids.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from rmlab.engine.logprobs import Scored
from rmlab.engine.precision import autocast_dtype
from rmlab.engine.runner import runner_for
from rmlab.engine.sampling_inputs import check_prompts, encode_prompts
from rmlab.errors import DataError
from rmlab.io.models import check_vocab_covers, context_length, load_causal_lm, load_tokenizer, padding_id
from rmlab.io.pairs import to_python
from rmlab.options import LOADING, RUNNING, Options, with_options


def engine_logprobs(
    model, prompt_ids: Sequence[Sequence[int]], prompt_index, tokens, *, pad_id: int, options: Options,
    progress: bool = False, desc: str = "log-probs",
) -> list[np.ndarray]:
    """Per-token log-probs of each completion ``tokens[k]`` after prompt ``prompt_index[k]``.

    Scored by the runner ``options.runner`` under ``options.batch_tokens`` and the autocast rule of
    ``options.dtype``: ``log pi(y_t | x, y_<t)`` of every completion token (Rafailov et al. 2023,
    DPO, the per-token terms of ``lp(y)``).
    """
    seqs = [
        Scored(tuple(prompt_ids[i]) + tuple(int(t) for t in toks), len(prompt_ids[i]))
        for i, toks in zip(prompt_index, tokens)
    ]
    empty = [k for k, s in enumerate(seqs) if len(s.ids) == s.start]
    if empty:
        raise DataError(f"Row {empty[0]} has no completion tokens to score.")
    return runner_for(options.runner).logprobs(
        model, seqs, batch_tokens=options.batch_tokens, pad_id=pad_id,
        autocast_dtype=autocast_dtype(model, options.dtype), progress=progress, desc=desc,
    )


def summed(values: Sequence[np.ndarray]) -> list[float]:
    """Each sequence's per-token log-probs summed in float64: ``lp(y) = sum_t log pi(y_t | x, y_<t)``
    (Rafailov et al. 2023, DPO)."""
    return [float(v.astype(np.float64).sum()) for v in values]


@with_options("tokenizer", "chat_template_kwargs", *RUNNING, *LOADING)
def completion_logprobs(model, samples: pd.DataFrame, *, options: Options) -> np.ndarray:
    """Summed log-prob under ``model`` of each sampled completion (its ``tokens``) after its prompt.

    The reference side of a KL estimate: with samples from a policy ``pi`` (:func:`rmlab.sample`),
    ``samples["logp"] - completion_logprobs(reference, samples)`` is the per-sample log-ratio
    ``log pi(y|x) - log pi_ref(y|x)`` whose mean estimates ``KL(pi || pi_ref)`` (Gao et al. 2022,
    "Scaling Laws for Reward Model Overoptimization"; Schulman 2020, "Approximating KL
    Divergence"). The exact token ids are scored (no re-tokenising of the text), EOS included when
    the sample has one, by the forward runner the options name.

    Args:
        model: a causal LM or a hub name / local path; it must share the sampler's tokenizer.
        samples: a frame from :func:`rmlab.sample` (columns ``prompt`` and ``tokens``).
        tokenizer: the tokenizer the samples were drawn with (loaded from ``model`` if None).
        chat_template_kwargs, batch_tokens, device, dtype, progress, trust_remote_code, revision,
            use_safetensors, runner: as in :func:`rmlab.sample` (see :class:`rmlab.Options`).
        options: all of the above as one :class:`rmlab.Options` (flat keywords override it).

    Returns:
        A float64 array, one value per row of ``samples``.
    """
    if not isinstance(samples, pd.DataFrame) or not {"prompt", "tokens"} <= set(samples.columns):
        raise DataError("samples must be a frame from rmlab.sample (with 'prompt' and 'tokens' columns).")
    prompts, fmt = check_prompts(list(samples["prompt"]))
    lm = load_causal_lm(model, role="model", **options.loading)
    tok = load_tokenizer(options.tokenizer, model, role="model", trust_remote_code=options.trust_remote_code)
    check_vocab_covers(lm, tok, role="model")
    prompt_ids = encode_prompts(prompts, fmt, tok, options.chat_template_kwargs)
    tokens = [to_python(t) for t in samples["tokens"]]
    vocab = lm.get_output_embeddings().weight.shape[0]
    for k, toks in enumerate(tokens):
        if not isinstance(toks, list) or not toks or not all(0 <= int(t) < vocab for t in toks):
            raise DataError(f"Row {k}, column 'tokens' must be a non-empty list of token ids below {vocab}.")
    limit = context_length(lm)
    if limit is not None:
        for k, (p, toks) in enumerate(zip(prompt_ids, tokens)):
            if len(p) + len(toks) > limit:
                raise DataError(f"Row {k}: prompt+completion is {len(p) + len(toks)} tokens; the model accepts {limit}.")
    values = engine_logprobs(
        lm, prompt_ids, range(len(prompt_ids)), tokens, pad_id=padding_id(tok, lm), options=options,
        progress=options.progress,
    )
    return np.array(summed(values))
