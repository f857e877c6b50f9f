"""CHES: which preference pairs DPO is likely to lower the chosen likelihood on.

Follows Razin et al. 2024, "Unintentional Unalignment: Likelihood Displacement in Direct Preference
Optimization" (arXiv 2410.08847; official code princeton-nlp/unintentional-unalignment), Definition 2:
:func:`ches` scores each pair by its centered hidden embedding similarity and its length-normalised
form, from the sums of the last hidden states that predict each response's tokens
(:func:`ches_from_sums` holds the formula).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from rmlab.diagnostics.pair_frames import pair_columns
from rmlab.engine.hidden import response_hidden_states
from rmlab.engine.pairs import PairInputs, prepare_pair_inputs
from rmlab.options import LOADING, TOKENIZING, Options, with_options


def ches_from_sums(sum_chosen, sum_rejected, n_chosen, n_rejected) -> tuple[np.ndarray, np.ndarray]:
    """CHES and LN-CHES from summed hidden states (Razin et al. 2024, Definition 2 and Section 6).

    Args:
        sum_chosen, sum_rejected: ``(N, d)`` arrays ``H(y_w)``, ``H(y_l)``.
        n_chosen, n_rejected: ``(N,)`` response lengths ``|y_w|``, ``|y_l|`` (hidden states summed).

    Returns:
        ``(ches, ln_ches)`` as float64 arrays; NaN where a response has no token (the official code
        skips such pairs).

    The sums are taken in float64 and each score is computed in its centred form,
    ``CHES = <H(y_w), H(y_l) - H(y_w)>`` and
    ``LN-CHES = <H(y_w), H(y_l) |y_w|/|y_l| - H(y_w)> / |y_w|^2`` (the same quantities): the two inner products of the definition are large and nearly equal when
    the responses' hidden states share a large common component, and subtracting them would cancel
    most of their digits.
    """
    w = np.asarray(sum_chosen, dtype=np.float64)
    lo = np.asarray(sum_rejected, dtype=np.float64)
    nw = np.asarray(n_chosen, dtype=np.float64)
    nl = np.asarray(n_rejected, dtype=np.float64)
    valid = (nw > 0) & (nl > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        scores = (w * (lo - w)).sum(axis=1)
        ln_scores = (w * (lo * (nw / nl)[:, None] - w)).sum(axis=1) / nw**2
        ches = np.where(valid, scores, np.nan)
        ln_ches = np.where(valid, ln_scores, np.nan)
    return ches, ln_ches


@with_options(*TOKENIZING, *LOADING, "batch_tokens", "progress")
def ches(policy, data, *, options: Options) -> pd.DataFrame:
    """Centered hidden embedding similarity (CHES) of every preference pair under a policy.

    Follows Razin et al. 2024 ("Unintentional Unalignment: Likelihood Displacement in Direct
    Preference Optimization", arXiv 2410.08847), Definition 2 and the official implementation:
    ``CHES = <H(y_w), H(y_l)> - |H(y_w)|^2`` and the length-normalised
    ``LN-CHES = <H(y_w), H(y_l)>/(|y_w||y_l|) - |H(y_w)|^2/|y_w|^2``, where ``H(y)`` sums the last
    hidden states (the unembedding's input, after the final norm) that predict each response token,
    from the last prompt token on; the EOS token TRL appends to text responses counts as a response
    token. Pairs with a high score are the ones whose chosen log-prob DPO tends to lower; the paper
    filters data by LN-CHES, so ``rank`` orders pairs by it.

    Tokenisation is TRL's ``DPOTrainer``'s (as :func:`rmlab.implicit_rewards`); chosen and rejected of
    a pair share one forward pass; only the backbone runs.

    Args:
        policy: the model whose hidden states are used (usually the model DPO starts from): a
            ``PreTrainedModel``, a hub name / local path, or an :class:`rmlab.ModelPair` (its policy).
        data: preference pairs (DataFrame, records, ``datasets.Dataset``, or a .jsonl/.json/.parquet/
            .csv path) with ``prompt``, ``chosen``, ``rejected`` as text or chat messages.
        tokenizer, max_length, truncation_mode, add_eos, chat_template_kwargs, batch_tokens, progress,
            device, dtype, trust_remote_code, revision, use_safetensors: as in
            :func:`rmlab.implicit_rewards` (see :class:`rmlab.Options`).
        options: all of those as one :class:`rmlab.Options` (flat keywords override its fields).

    Returns:
        One row per pair: ``pair``, ``ches``, ``ln_ches``, ``rank`` (1 = highest LN-CHES, the pair
        most at risk of likelihood displacement; missing for a response truncated to nothing, whose
        scores are NaN), ``tokens_chosen``, ``tokens_rejected`` (``|y_w|``, ``|y_l|``), ``truncated``,
        then the input columns.

    Example:
        >>> import rmlab
        >>> from rmlab.toy import tiny_causal_lm, tiny_tokenizer
        >>> pairs = [{"prompt": "Review:", "chosen": " great film", "rejected": " dull film"}]
        >>> frame = rmlab.ches(tiny_causal_lm("gpt2"), pairs, tokenizer=tiny_tokenizer(), progress=False)
        >>> list(frame.columns[:4])
        ['pair', 'ches', 'ln_ches', 'rank']
    """
    inputs = prepare_pair_inputs(policy, None, data, options=options)
    hidden = pair_hidden_states(inputs, inputs.policy, progress=options.progress)
    scores, ln_scores = ches_from_sums(hidden.sums[0::2], hidden.sums[1::2], hidden.counts[0::2], hidden.counts[1::2])
    frame = pd.DataFrame(
        {
            "pair": np.arange(len(inputs.encoded)),
            "ches": scores,
            "ln_ches": ln_scores,
        }
    )
    frame["rank"] = frame["ln_ches"].rank(ascending=False, method="first", na_option="keep").astype("Int64")
    frame = pair_columns(frame, inputs)  # response token counts: the hidden states summed
    frame.attrs.update(measure="ches", format=inputs.pairs.attrs.get("format"))
    return frame


def pair_hidden_states(inputs: PairInputs, model, *, progress: bool):
    """Summed last hidden states ``H(y)`` of every response of ``inputs`` under ``model`` (Razin et al.
    2024, Definition 2; :func:`rmlab.engine.hidden.response_hidden_states`), both responses of a pair
    in one forward pass; ``sums[2 i]`` / ``sums[2 i + 1]`` are pair ``i``'s chosen / rejected."""
    return response_hidden_states(
        model, inputs.sequences, **inputs.batch_plan(model), progress=progress, desc="policy hidden states"
    )
