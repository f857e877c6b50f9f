"""Proxy and gold rewards along policy checkpoints, against KL from the reference.

Overoptimization is read off a curve: as a policy moves away from its initial (reference) policy,
measured by ``d = sqrt(KL(pi || pi_ref))``, the proxy reward it was optimised for keeps rising
while the true (gold) reward peaks and falls (Gao et al. 2022, "Scaling Laws for Reward Model
Overoptimization"). Direct alignment algorithms such as DPO show the same along training steps
and across beta (Rafailov et al. 2024, "Scaling Laws for Reward Model Overoptimization in Direct
Alignment Algorithms").

- :func:`checkpoint_curve`: sample every checkpoint (:func:`rmlab.sample`), score the samples under
  the reference, a proxy and a gold reward; one row per checkpoint.
- :func:`curve_from_samples`: the same summary from a saved samples frame, e.g. to score it with
  another proxy without sampling again.
- The KL estimate is :func:`rmlab.diagnostics.kl.kl_estimate`'s; checkpoints and their labels are
  read by :mod:`rmlab.diagnostics.checkpoint_labels`; scorers are those of
  :mod:`rmlab.diagnostics.scorers`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from rmlab.cache import resolve_cache_dir
from rmlab.diagnostics.checkpoint_labels import check_checkpoints, checkpoint_items
from rmlab.diagnostics.kl import kl_estimate, mean_se
from rmlab.diagnostics.scorers import SampleScorer
from rmlab.engine.completions import engine_logprobs, summed
from rmlab.engine.sampling import SAMPLE_COLUMNS, SamplingInterrupted, sample
from rmlab.engine.sampling_inputs import check_prompt_context, check_prompts, check_settings, encode_prompts
from rmlab.errors import ArgumentError, DataError
from rmlab.io.models import check_vocab_covers, load_causal_lm, load_tokenizer, padding_id
from rmlab.options import CACHING, LOADING, RUNNING, Options, with_options

#: Columns every samples frame of :func:`checkpoint_curve` has (beside the label columns).
CURVE_SAMPLE_COLUMNS = ("checkpoint",) + SAMPLE_COLUMNS + ("ref_logp", "log_ratio")
#: The run options of the functions of this module.
CURVE_OPTIONS = ("tokenizer", "chat_template_kwargs", *RUNNING, *LOADING, *CACHING)


def _summarise(samples: pd.DataFrame, label_cols: list[str], scored: list[str], n_samples) -> pd.DataFrame:
    """One row per checkpoint: KL (per prompt, then over prompts) and the mean of every scored column."""
    rows = []
    for name, group in samples.groupby("checkpoint", sort=False):
        g = group["prompt_index"].to_numpy()
        row = {"checkpoint": name}
        for col in label_cols:
            row[col] = group[col].iloc[0]
        kl, kl_se, prompts = mean_se(group["log_ratio"].to_numpy(), g)
        row.update(kl=kl, kl_se=kl_se, sqrt_kl=math.sqrt(max(kl, 0.0)))
        for col in scored:
            mean, se, _ = mean_se(group[col].to_numpy(), g)
            row[col], row[f"{col}_se"] = mean, se
        row["tokens"] = float(group["n_tokens"].mean())
        row["finished"] = float(group["finished"].mean())
        row["n_samples"] = n_samples if n_samples is not None else int(group.groupby("prompt_index").size().max())
        row["prompts"] = prompts
        rows.append(row)
    curve = pd.DataFrame(rows)
    curve.attrs["kind"] = "checkpoint_curve"
    return curve



def _scorer(samples, options: Options, *, reward_tokenizer, fallback_tokenizer, proxy, gold) -> SampleScorer:
    """The checked scorers of ``proxy`` and ``gold`` on ``samples`` (a frame, or the column names of
    one still to be sampled), their reward models loaded. Reward models score whole rows, EOS
    appended to plain text as TRL's RewardTrainer appends it."""
    scoring = options.replace(add_eos=None, max_length=None, truncation_mode="keep_start")
    scorer = SampleScorer(list(samples.columns) if isinstance(samples, pd.DataFrame) else samples, options=scoring,
                          tokenizer=reward_tokenizer, fallback_tokenizer=fallback_tokenizer, tokenizer_arg="reward_tokenizer")
    if isinstance(samples, pd.DataFrame):
        scorer.bind(samples)
    for role, spec in (("proxy", proxy), ("gold", gold)):
        if spec is not None:
            scorer.check(spec, role)
    scorer.check_texts()
    scorer.load_models()
    return scorer


def _score(scorer: SampleScorer, samples: pd.DataFrame, proxy, gold) -> list[str]:
    """Put the ``proxy`` and ``gold`` scores on ``samples`` (in place); the names of those scored."""
    if scorer.frame is not samples:
        scorer.bind(samples)
    scored = []
    for role, spec in (("proxy", proxy), ("gold", gold)):
        if spec is not None:
            samples[role] = scorer.scores(spec, role)
            scored.append(role)
    return scored


@with_options(*CURVE_OPTIONS)
def curve_from_samples(
    samples: pd.DataFrame,
    *,
    proxy=None,
    gold=None,
    reward_tokenizer=None,
    return_samples: bool = False,
    options: Options,
):
    """One row per checkpoint from a samples frame of :func:`checkpoint_curve`, scoring it if asked.

    Re-ranks or re-scores saved samples without sampling again (e.g. with another proxy, an
    ensemble callable, or a gold reward added later). KL and rewards are aggregated as in
    :func:`checkpoint_curve` (Gao et al. 2022; per prompt, then over prompts).

    Args:
        samples: the samples frame (``checkpoint_curve(..., return_samples=True)[1]``), with
            ``checkpoint``, ``prompt_index``, ``prompt``, ``completion``, ``n_tokens``, ``finished``
            and ``log_ratio`` (or ``logp`` and ``ref_logp``).
        proxy, gold: as in :func:`checkpoint_curve`; a string that names a column uses it.
        tokenizer: fallback tokenizer for reward models that have none of their own.
        reward_tokenizer, return_samples: as in :func:`checkpoint_curve`.
        chat_template_kwargs, batch_tokens, device, dtype, progress, trust_remote_code, revision,
            use_safetensors, runner, cache_dir, overwrite_cache: how reward models score, as in
            :func:`checkpoint_curve` (see :class:`rmlab.Options`).
        options: the run options above as one :class:`rmlab.Options` (flat keywords override it).

    Returns:
        The curve (and the samples with the new score columns when ``return_samples``).
    """
    if not isinstance(samples, pd.DataFrame):
        raise DataError("samples must be the samples DataFrame of rmlab.checkpoint_curve(..., return_samples=True).")
    samples = samples.copy()
    if "log_ratio" not in samples.columns and {"logp", "ref_logp"} <= set(samples.columns):
        samples["log_ratio"] = samples["logp"] - samples["ref_logp"]
    need = {"checkpoint", "prompt_index", "prompt", "completion", "n_tokens", "finished", "log_ratio"}
    missing = sorted(need - set(samples.columns))
    if missing:
        raise DataError(f"samples lacks the columns {missing}; pass the samples frame of rmlab.checkpoint_curve.")
    if len(samples) < 2:
        raise DataError("samples has fewer than 2 rows: a KL estimate needs at least 2 samples.")
    check_prompts(list(samples["prompt"].iloc[:1]))
    scorer = _scorer(samples, options, reward_tokenizer=reward_tokenizer, fallback_tokenizer=options.tokenizer,
                     proxy=proxy, gold=gold)
    scored = _score(scorer, samples, proxy, gold)
    label_cols = [c for c in samples.attrs.get("label_columns", []) if c in samples.columns]
    curve = _summarise(samples, label_cols, scored, None)
    return (curve, samples) if return_samples else curve


@with_options(*CURVE_OPTIONS)
def checkpoint_curve(
    checkpoints,
    reference,
    prompts,
    *,
    proxy=None,
    gold=None,
    n_samples: int = 16,
    max_new_tokens: int = 64,
    seed: int = 0,
    label_names: Sequence[str] = ("beta", "step"),
    reward_tokenizer=None,
    batch_size: int | None = None,
    return_samples: bool = False,
    options: Options,
):
    """KL from the reference, proxy reward and gold reward of each policy checkpoint, from its samples.

    The measured points of an overoptimization curve (Gao et al. 2022, "Scaling Laws for Reward
    Model Overoptimization": reward against ``d = sqrt(KL(pi || pi_init))``; Rafailov et al. 2024
    for DPO checkpoints across beta and steps). For every checkpoint: ``n_samples`` completions per
    prompt from the checkpoint itself (:func:`rmlab.sample`, temperature 1, the same seed for every
    checkpoint so that they share random numbers), their log-probs under the checkpoint and the
    reference (rmlab's engine, the exact sampled ids), the k1 KL estimate (:func:`kl_estimate`), and
    the mean proxy and gold rewards of the samples. Means are taken per prompt, then over prompts;
    standard errors across prompts (across samples with a single prompt).

    Args:
        checkpoints: the policies, as
            ``{label: model or path}``; a nested ``{beta: {step: model or path}}`` (a toy world's
            ``.checkpoints``; labels become ``(beta, step)``); or a list of models / paths
            (labelled by their path). Labels that are tuples or numbers fill the columns named by
            ``label_names`` in order; string labels and paths are searched for ``beta<number>``
            and ``step<number>`` (``"dpo_beta0.1/step_50"``). Add the reference itself, e.g.
            ``{(0.1, 0): sft, **...}``, to start the curve at KL 0.
        reference: the initial policy (a causal LM or path); KL is measured from it.
        prompts: a list of strings or chat conversations (as :func:`rmlab.sample`).
        proxy, gold: the rewards to average over the samples, each a scorer of
            :mod:`rmlab.diagnostics.scorers`: a reward model (``AutoModelForSequenceClassification``
            object or path, one output), scored on prompt + completion exactly as
            :func:`rmlab.reward_scores` tokenises prompt/completion rows (its own tokenizer, else
            ``reward_tokenizer``, else the policy's); a callable, called with the list of completion
            texts when it takes one required positional parameter (a toy world's ``.gold``), with
            ``(prompts, completions)`` when it takes two, or TRL-style with keywords; the name of a
            column of the samples (e.g. ``"n_tokens"``); or an :func:`rmlab.ensemble` of these.
        n_samples: completions per prompt and checkpoint.
        max_new_tokens: longest completion in tokens.
        tokenizer: the policies' tokenizer (loaded from the reference's path if None).
        seed: sampling seed (the same for every checkpoint).
        label_names: names of the label parts (default ``("beta", "step")``).
        reward_tokenizer: tokenizer for reward models that have none saved with them.
        batch_size, batch_tokens, cache_dir, overwrite_cache, chat_template_kwargs, device, dtype,
            progress, trust_remote_code, revision, use_safetensors, runner: as in
            :func:`rmlab.sample` (see :class:`rmlab.Options`); with ``cache_dir`` the samples of every
            checkpoint (and the reward models' scores) are kept on disk and an interrupted curve
            resumes.
        options: the run options above as one :class:`rmlab.Options` (flat keywords override it).
        return_samples: also return the samples frame (one row per completion and checkpoint, with
            ``ref_logp``, ``log_ratio`` and the ``proxy`` / ``gold`` scores), to re-rank or re-score
            it with :func:`curve_from_samples` without sampling again.

    Returns:
        One row per checkpoint, in the order given: ``checkpoint`` (label), the label columns
        (``beta``, ``step`` when the labels carry them), ``kl``, ``kl_se``, ``sqrt_kl``
        (``sqrt(max(kl, 0))``), ``proxy``, ``proxy_se``, ``gold``, ``gold_se`` (when asked),
        ``tokens`` (mean completion length), ``finished`` (fraction that ended with EOS),
        ``n_samples`` (per prompt), ``prompts``. With ``return_samples=True``: ``(curve, samples)``.

    Raises:
        ArgumentError, DataError, ModelError, TokenizerError: bad checkpoints, prompts, settings or
        scorers, all before sampling starts.
        SamplingInterrupted: on an interrupt; ``.partial`` holds the samples of the finished
        checkpoints.

    Example:
        >>> import rmlab, rmlab.toy
        >>> w = rmlab.toy.load()  # doctest: +SKIP
        >>> curve = rmlab.checkpoint_curve(
        ...     {(0.1, 0): w.sft, **{(0.1, s): p for s, p in w.checkpoints[0.1].items()}}, w.sft,
        ...     w.prompts[:16], proxy=w.reward_models[0], gold=w.gold, n_samples=8)  # doctest: +SKIP
    """
    n_samples, max_new_tokens, _, _, seed = check_settings(
        n=n_samples, max_new_tokens=max_new_tokens, temperature=1.0, top_p=1.0, seed=seed,
        batch_size=batch_size, backend="hf",
    )
    items = checkpoint_items(checkpoints, label_names)
    prompt_list, fmt = check_prompts(prompts)
    if n_samples * len(prompt_list) < 2:
        raise ArgumentError(
            f"n_samples={n_samples} with {len(prompt_list)} prompt gives 1 sample per checkpoint; a KL "
            "estimate and its standard error need at least 2. Raise n_samples or add prompts."
        )
    cache_dir = resolve_cache_dir(options.cache_dir, options.overwrite_cache)
    ref_model = load_causal_lm(reference, role="reference", **options.loading)
    source = reference
    if options.tokenizer is None and not (isinstance(reference, (str, os.PathLike)) or getattr(reference, "name_or_path", "")):
        source = items[0][2]
    tok = load_tokenizer(options.tokenizer, source, role="reference", trust_remote_code=options.trust_remote_code)
    check_vocab_covers(ref_model, tok, role="reference")
    prompt_ids = encode_prompts(prompt_list, fmt, tok, options.chat_template_kwargs)
    check_prompt_context(prompt_ids, ref_model, max_new_tokens, role="reference")
    label_cols = [name for name in label_names if any(name in fields for _, fields, _ in items)]
    columns = list(CURVE_SAMPLE_COLUMNS) + label_cols
    scorer = _scorer(columns, options, reward_tokenizer=reward_tokenizer, fallback_tokenizer=tok, proxy=proxy, gold=gold)
    pad_id = padding_id(tok, ref_model)
    check_checkpoints(items, tok, options.trust_remote_code)

    sampling = options.replace(tokenizer=tok)
    frames: list[pd.DataFrame] = []
    bar = tqdm(items, desc="checkpoints", unit="ckpt", disable=not options.progress or len(items) < 2, leave=False)
    try:
        for name, fields, spec in bar:
            policy = load_causal_lm(spec, role=f"checkpoint {name!r}", **options.loading)
            check_vocab_covers(policy, tok, role=f"checkpoint {name!r}")
            frame = sample(policy, prompt_list, n=n_samples, max_new_tokens=max_new_tokens, seed=seed,
                           batch_size=batch_size, options=sampling)
            ref = engine_logprobs(ref_model, prompt_ids, frame["prompt_index"], frame["tokens"], pad_id=pad_id,
                                  options=options)
            frame["ref_logp"] = summed(ref)
            frame["log_ratio"] = frame["logp"] - frame["ref_logp"]
            frame.insert(0, "checkpoint", name)
            for k, col in enumerate(label_cols):
                frame.insert(1 + k, col, fields.get(col, np.nan))
            frames.append(frame)
            del policy
    except KeyboardInterrupt as err:  # SamplingInterrupted from sample(), or an interrupt elsewhere
        partial = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)
        hint = "call again with the same arguments to resume" if cache_dir is not None else "pass cache_dir=... to resume next time"
        raise SamplingInterrupted(
            f"checkpoint_curve interrupted after {len(frames)} of {len(items)} checkpoints; their samples "
            f"are in .partial ({hint}).",
            partial,
        ) from err
    finally:
        bar.close()
    samples = pd.concat(frames, ignore_index=True)
    samples.attrs.update(kind="checkpoint_samples", format=fmt, label_columns=label_cols)
    scored = _score(scorer, samples, proxy, gold)
    curve = _summarise(samples, label_cols, scored, n_samples)
    return (curve, samples) if return_samples else curve


__all__ = ["CURVE_SAMPLE_COLUMNS", "checkpoint_curve", "curve_from_samples", "kl_estimate", "mean_se"]
