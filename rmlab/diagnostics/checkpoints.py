"""KL from the reference and proxy / gold rewards along policy checkpoints.

Overoptimization is read off a curve: as a policy moves away from its initial (reference) policy,
measured by ``d = sqrt(KL(pi || pi_ref))``, the proxy reward it was optimised for keeps rising
while the true (gold) reward peaks and falls (Gao et al. 2022, "Scaling Laws for Reward Model
Overoptimization"). Direct alignment algorithms such as DPO show the same along training steps
and across beta (Rafailov et al. 2024, "Scaling Laws for Reward Model Overoptimization in Direct
Alignment Algorithms"). For a checkpoint, KL has no closed form: it is estimated from the policy's
own samples, ``KL(pi || pi_ref) = E_{x, y ~ pi}[log pi(y|x) - log pi_ref(y|x)]`` (the "k1"
estimator of Schulman 2020, "Approximating KL Divergence").

- :func:`kl_estimate`: the Monte-Carlo estimate and its standard error from per-sample log-probs.
- :func:`checkpoint_curve`: sample every checkpoint (:func:`rmlab.sample`), score the samples under
  the reference, a proxy and a gold reward; one row per checkpoint.
- :func:`curve_from_samples`: the same summary from a saved samples frame, e.g. to score it with
  another proxy without sampling again.
"""

from __future__ import annotations

import inspect
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from rmlab.engine.precision import autocast_dtype
from rmlab.engine.reward_model import score_sequences
from rmlab.engine.sampling import (
    SAMPLE_COLUMNS,
    SamplingInterrupted,
    check_prompt_context,
    check_prompts,
    check_settings,
    encode_prompts,
    engine_logprobs,
    sample,
)
from rmlab.errors import ArgumentError, DataError, ModelError, TokenizerError
from rmlab.io.models import (
    check_context,
    check_same_tokenizer,
    check_vocab_covers,
    is_causal_lm,
    load_causal_lm,
    load_reward_model,
    load_tokenizer,
    padding_id,
    reward_label,
)
from rmlab.io.tokenize import encode_responses

#: Columns every samples frame of :func:`checkpoint_curve` has (beside the label columns).
CURVE_SAMPLE_COLUMNS = ("checkpoint",) + SAMPLE_COLUMNS + ("ref_logp", "log_ratio")


# --------------------------------------------------------------------------------------------------
# estimates
# --------------------------------------------------------------------------------------------------
def _as_values(values, name: str) -> np.ndarray:
    try:
        out = np.asarray(values, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise DataError(f"{name} must be numbers (one per sample).") from None
    bad = np.flatnonzero(~np.isfinite(out))
    if len(bad):
        raise DataError(f"{name}[{bad[0]}] is {out[bad[0]]}; every value must be finite.")
    return out


def mean_se(values, groups=None) -> tuple[float, float, int]:
    """Mean over groups of the per-group means, and its standard error.

    With two groups or more the standard error is the spread of the group means over the square
    root of their number (prompts treated as a sample of the prompt distribution, within- and
    between-prompt variation both included); with one group it is the spread of the values over
    the square root of their number. Returns ``(mean, se, groups)``; ``se`` is NaN with one value.
    """
    v = np.asarray(values, dtype=np.float64)
    if groups is None:
        groups = np.zeros(len(v), dtype=np.int64)
    means = pd.Series(v).groupby(np.asarray(groups), sort=False).mean().to_numpy()
    if len(means) >= 2:
        return float(means.mean()), float(means.std(ddof=1) / math.sqrt(len(means))), len(means)
    se = float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) >= 2 else float("nan")
    return float(v.mean()), se, 1


def kl_estimate(policy_logp, reference_logp, groups=None) -> pd.Series:
    """Monte-Carlo estimate of ``KL(pi || pi_ref)`` from samples of the policy, with its standard error.

    ``KL(pi || pi_ref) = E_{y ~ pi}[log pi(y) - log pi_ref(y)]``, estimated by the mean log-ratio of
    samples drawn from ``pi`` (the "k1" estimator, Schulman 2020, "Approximating KL Divergence"; the
    KL axis of Gao et al. 2022, "Scaling Laws for Reward Model Overoptimization"). With several
    prompts (``groups``) the log-ratios are averaged per prompt, then over prompts, and the standard
    error is taken across prompts; with one prompt, across samples.

    The k1 estimator is unbiased, but a single estimate can be negative (the true KL never is): the
    log-ratio is negative on samples the reference likes more than the policy does, and a finite
    sample can hold mostly those, especially when the policy is close to the reference. Its variance
    grows with the KL; read the estimate together with ``kl_se``.

    Args:
        policy_logp: log-prob of each sample under the policy that drew it (``rmlab.sample``'s
            ``logp``, temperature 1: samples drawn at another temperature or with top-p are not
            samples of ``pi``).
        reference_logp: log-prob of the same samples under the reference.
        groups: the prompt of each sample (e.g. ``prompt_index``); all one prompt if None.

    Returns:
        A Series with ``kl``, ``kl_se``, ``n_samples`` and ``prompts``.

    Raises:
        DataError: lengths differ, non-finite values, or fewer than 2 samples (no standard error).

    Example:
        >>> import rmlab
        >>> est = rmlab.kl_estimate([-1.0, -2.0, -1.5], [-1.2, -2.5, -1.4])
        >>> round(float(est["kl"]), 3), round(float(est["kl_se"]), 3)
        (0.2, 0.173)
    """
    lp = _as_values(policy_logp, "policy_logp")
    ref = _as_values(reference_logp, "reference_logp")
    if len(lp) != len(ref):
        raise DataError(f"policy_logp has {len(lp)} values but reference_logp has {len(ref)}; pass one per sample.")
    if groups is not None and len(np.asarray(groups).reshape(-1)) != len(lp):
        raise DataError(f"groups has {len(np.asarray(groups).reshape(-1))} values for {len(lp)} samples.")
    if len(lp) < 2:
        raise DataError(
            f"A KL estimate needs at least 2 samples (got {len(lp)}): its standard error comes from "
            "their spread. Draw more samples (n >= 2, or several prompts)."
        )
    kl, se, prompts = mean_se(lp - ref, None if groups is None else np.asarray(groups).reshape(-1))
    return pd.Series({"kl": kl, "kl_se": se, "n_samples": len(lp), "prompts": prompts})


# --------------------------------------------------------------------------------------------------
# proxy / gold scorers
# --------------------------------------------------------------------------------------------------
class _Scorer:
    """A reward to put on every sample: a column, a reward model, or a callable."""

    def __init__(self, role: str, kind: str, value, tokenizer=None, label: int = 0):
        self.role, self.kind, self.value, self.tokenizer, self.label = role, kind, value, tokenizer, label

    def __call__(self, samples: pd.DataFrame, *, fmt: str, batch_tokens, dtype, progress, chat_template_kwargs) -> np.ndarray:
        n = len(samples)
        if self.kind == "column":
            out = samples[self.value].to_numpy()
        elif self.kind == "callable":
            completions = list(samples["completion"])
            if self.takes_prompts:
                out = self.value(list(samples["prompt"]), completions)
            else:
                out = self.value(completions)
        else:
            out = _reward_model_scores(
                self.value, self.tokenizer, self.label, list(samples["prompt"]), list(samples["completion"]),
                fmt=fmt, batch_tokens=batch_tokens, dtype=dtype, progress=progress,
                chat_template_kwargs=chat_template_kwargs, role=self.role,
            )
        try:
            values = np.asarray(out, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError):
            raise DataError(f"The {self.role} scorer must return numbers, one per completion.") from None
        if len(values) != n:
            raise DataError(f"The {self.role} scorer returned {len(values)} values for {n} completions; return one per completion.")
        return values

    @property
    def takes_prompts(self) -> bool:
        try:
            params = inspect.signature(self.value).parameters.values()
        except (TypeError, ValueError):
            return False
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        return len(positional) >= 2


def _resolve_scorer(spec, role: str, *, columns, tokenizer, reward_tokenizer, device, dtype, trust_remote_code) -> _Scorer | None:
    """Check a proxy/gold specification and load its reward model now, before any sampling."""
    if spec is None:
        return None
    if isinstance(spec, str) and spec in columns:
        return _Scorer(role, "column", spec)
    if isinstance(spec, torch.nn.Module) or isinstance(spec, (str, os.PathLike)):
        if isinstance(spec, torch.nn.Module) and is_causal_lm(spec):
            raise ModelError(
                f"{role}= is a causal LM ({type(spec).__name__}), not a reward model: pass a sequence "
                "classifier, a callable on completions, or a column name."
            )
        if isinstance(spec, (str, os.PathLike)) and str(spec).startswith((".", "/", "~")) and not Path(spec).expanduser().exists():
            raise DataError(
                f"{role}={str(spec)!r} is neither a column of the samples ({', '.join(columns)}) nor an "
                "existing reward-model folder."
            )
        model = load_reward_model(spec, role=f"{role} reward model", device=device, dtype=dtype, trust_remote_code=trust_remote_code)
        try:
            label = reward_label(model, None)
        except ModelError as err:
            raise ModelError(f"{err} (For the {role}, wrap the model in a callable that returns that output.)") from None
        rtok = reward_tokenizer
        if rtok is None:
            try:
                rtok = load_tokenizer(None, spec, role=f"{role} reward model", trust_remote_code=trust_remote_code)
            except TokenizerError:
                rtok = tokenizer  # a reward model built on the policy: the policy's tokenizer
        if rtok is None:
            raise TokenizerError(f"No tokenizer for the {role} reward model: pass reward_tokenizer=... .")
        rows = model.get_input_embeddings().weight.shape[0]
        if len(rtok) > rows:
            raise TokenizerError(
                f"The tokenizer used for the {role} reward model has {len(rtok)} tokens but the model's "
                f"embedding only {rows}: pass reward_tokenizer=<the tokenizer it was trained with>."
            )
        return _Scorer(role, "reward_model", model, tokenizer=rtok, label=label)
    if callable(spec):
        return _Scorer(role, "callable", spec)
    if isinstance(spec, (list, tuple)):
        raise ArgumentError(
            f"{role}= got a list; pass one reward model, or a callable that combines several "
            "(e.g. their mean or minimum) on the completions."
        )
    raise ArgumentError(
        f"{role}={spec!r} must be a reward model (object or path), a callable on completions (or on "
        "prompts, completions), or the name of a column of the samples."
    )


def _reward_model_scores(model, tokenizer, label, prompts, completions, *, fmt, batch_tokens, dtype, progress,
                         chat_template_kwargs, role) -> np.ndarray:
    """Scores of prompt/completion rows, tokenised and pooled exactly as :func:`rmlab.reward_scores`
    (TRL's RewardTrainer: EOS appended to plain text, chat template for conversations); unlike it,
    empty completions (a sample that stopped at once) are scored too."""
    responses = completions if fmt == "text" else [[{"role": "assistant", "content": c}] for c in completions]
    frame = pd.DataFrame({"prompt": prompts, "response": responses})
    frame.attrs["format"] = fmt
    seqs = encode_responses(frame, tokenizer, add_eos=None, chat_template_kwargs=chat_template_kwargs)
    check_context([(f"Row {i}", len(s.ids)) for i, s in enumerate(seqs)], model, f"{role} reward model", None)
    return score_sequences(
        model, [s.ids for s in seqs], pad_id=padding_id(tokenizer, model, role=f"{role} reward model"),
        label=label, batch_tokens=batch_tokens, autocast_dtype=autocast_dtype(model, dtype), progress=progress,
        desc=f"{role} scores",
    )


# --------------------------------------------------------------------------------------------------
# checkpoints and their labels
# --------------------------------------------------------------------------------------------------
_NUMBER = r"(-?\d+(?:\.\d+)?(?:[eE]-?\d+)?)"


def _number(text: str):
    value = float(text)
    return int(value) if value.is_integer() and re.fullmatch(r"-?\d+", text) else value


def _parse_label(label, label_names: Sequence[str]) -> tuple[str, dict]:
    """``(checkpoint string, {label name: value})`` of one checkpoint label."""
    if isinstance(label, tuple):
        if len(label) > len(label_names):
            raise ArgumentError(
                f"Checkpoint label {label!r} has {len(label)} parts but label_names={tuple(label_names)!r} "
                f"names {len(label_names)}; pass label_names=... with one name per part."
            )
        fields = dict(zip(label_names, label))
        return "/".join(f"{k}={v}" for k, v in fields.items()), fields
    if isinstance(label, (int, float, np.integer, np.floating)) and not isinstance(label, bool):
        return f"{label_names[0]}={label}", {label_names[0]: label}
    text = str(label)
    fields = {}
    for name in label_names:
        match = re.search(rf"{re.escape(name)}[_=-]?{_NUMBER}", text)
        if match:
            fields[name] = _number(match.group(1))
    return text, fields


def _label_of(item, i: int) -> str:
    if isinstance(item, (str, os.PathLike)):
        return str(item)
    return getattr(item, "name_or_path", "") or f"checkpoint {i}"


def _checkpoint_items(checkpoints, label_names) -> list[tuple[str, dict, object]]:
    if isinstance(label_names, str) or not label_names or not all(isinstance(x, str) for x in label_names):
        raise ArgumentError(f"label_names={label_names!r} must be a non-empty tuple of column names, e.g. ('beta', 'step').")
    raw: list[tuple[object, object]] = []
    if isinstance(checkpoints, Mapping):
        for key, value in checkpoints.items():
            if isinstance(value, Mapping):
                raw.extend(((key, inner), v) for inner, v in value.items())
            else:
                raw.append((key, value))
    elif isinstance(checkpoints, (list, tuple)):
        raw = [(_label_of(item, i), item) for i, item in enumerate(checkpoints)]
    else:
        raise ArgumentError(
            "checkpoints must be a dict {label: model or path} (labels may be (beta, step) tuples or a "
            "nested {beta: {step: path}} dict such as a toy world's .checkpoints) or a list of models/paths; "
            f"got {type(checkpoints).__name__}."
        )
    if not raw:
        raise ArgumentError("checkpoints is empty: pass at least one policy checkpoint.")
    items, seen = [], set()
    for label, spec in raw:
        name, fields = _parse_label(label, tuple(label_names))
        if name in seen:
            raise ArgumentError(f"Two checkpoints have the label {name!r}; give each its own label.")
        seen.add(name)
        if isinstance(spec, (str, os.PathLike)):
            local = isinstance(spec, os.PathLike) or str(spec).startswith((".", "/", "~"))
            if local and not Path(spec).expanduser().exists():
                raise DataError(f"Checkpoint {name!r}: the folder {str(spec)!r} does not exist.")
        elif not isinstance(spec, torch.nn.Module):
            raise ArgumentError(
                f"Checkpoint {name!r} is a {type(spec).__name__}; pass a causal LM or a hub name / local path."
            )
        elif not is_causal_lm(spec):
            raise ModelError(f"Checkpoint {name!r} is a {type(spec).__name__}, not a causal language model.")
        items.append((name, fields, spec))
    return items


def _check_checkpoints(items, tok, trust_remote_code: bool) -> None:
    """Every checkpoint fits the reference's tokenizer, checked before the first one samples: model
    objects by their vocabulary, folders by the tokenizer saved beside them (when there is one)."""
    for name, _, spec in items:
        if isinstance(spec, torch.nn.Module):
            check_vocab_covers(spec, tok, role=f"checkpoint {name!r}")
        elif Path(spec).expanduser().is_dir():
            try:
                saved = load_tokenizer(None, Path(spec).expanduser(), role=f"checkpoint {name!r}",
                                       trust_remote_code=trust_remote_code)
            except TokenizerError:
                continue  # no tokenizer saved beside the weights: the reference's is used
            check_same_tokenizer(tok, saved, names=("reference", f"checkpoint {name!r}"))


# --------------------------------------------------------------------------------------------------
# the curve
# --------------------------------------------------------------------------------------------------
def _summarise(samples: pd.DataFrame, label_cols: list[str], scored: list[str], n_samples) -> pd.DataFrame:
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


def _score(samples, scorers, *, fmt, batch_tokens, dtype, progress, chat_template_kwargs) -> list[str]:
    scored = []
    for col, scorer in scorers.items():
        if scorer is None:
            continue
        values = scorer(samples, fmt=fmt, batch_tokens=batch_tokens, dtype=dtype, progress=progress,
                        chat_template_kwargs=chat_template_kwargs)
        if not np.isfinite(values).all():
            raise DataError(f"The {col} scores include non-finite values (row {int(np.flatnonzero(~np.isfinite(values))[0])}).")
        samples[col] = values
        scored.append(col)
    return scored


def curve_from_samples(
    samples: pd.DataFrame,
    *,
    proxy=None,
    gold=None,
    tokenizer=None,
    reward_tokenizer=None,
    chat_template_kwargs: dict | None = None,
    batch_tokens: int | None = None,
    device="auto",
    dtype="auto",
    progress: bool = True,
    return_samples: bool = False,
    trust_remote_code: bool = False,
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
        reward_tokenizer, chat_template_kwargs, batch_tokens, device, dtype, progress,
        return_samples, trust_remote_code: as in :func:`checkpoint_curve`.

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
    common = dict(columns=list(samples.columns), tokenizer=tokenizer, reward_tokenizer=reward_tokenizer,
                  device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    scorers = {"proxy": _resolve_scorer(proxy, "proxy", **common), "gold": _resolve_scorer(gold, "gold", **common)}
    _, fmt = check_prompts(list(samples["prompt"].iloc[:1]))
    scored = _score(samples, scorers, fmt=fmt, batch_tokens=batch_tokens, dtype=dtype, progress=progress,
                    chat_template_kwargs=chat_template_kwargs)
    label_cols = [c for c in samples.attrs.get("label_columns", []) if c in samples.columns]
    curve = _summarise(samples, label_cols, scored, None)
    return (curve, samples) if return_samples else curve


def checkpoint_curve(
    checkpoints,
    reference,
    prompts,
    *,
    proxy=None,
    gold=None,
    n_samples: int = 16,
    max_new_tokens: int = 64,
    tokenizer=None,
    seed: int = 0,
    label_names: Sequence[str] = ("beta", "step"),
    reward_tokenizer=None,
    batch_size: int | None = None,
    batch_tokens: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    chat_template_kwargs: dict | None = None,
    device="auto",
    dtype="auto",
    progress: bool = True,
    return_samples: bool = False,
    trust_remote_code: bool = False,
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
        proxy, gold: the rewards to average over the samples, each either
            a reward model (``AutoModelForSequenceClassification`` object or path, one output),
            scored on prompt + completion exactly as :func:`rmlab.reward_scores` tokenises
            prompt/completion rows (its own tokenizer, else ``reward_tokenizer``, else the
            policy's);
            a callable, called with the list of completion texts when it takes one positional
            parameter (a toy world's ``.gold``), or with ``(prompts, completions)`` when it takes
            two; or the name of a column of the samples (e.g. ``"n_tokens"``).
        n_samples: completions per prompt and checkpoint.
        max_new_tokens: longest completion in tokens.
        tokenizer: the policies' tokenizer (loaded from the reference's path if None).
        seed: sampling seed (the same for every checkpoint).
        label_names: names of the label parts (default ``("beta", "step")``).
        reward_tokenizer: tokenizer for reward models that have none saved with them.
        batch_size, batch_tokens, cache_dir, chat_template_kwargs, device, dtype, progress,
            trust_remote_code: as in :func:`rmlab.sample`; with ``cache_dir`` the samples of every
            checkpoint are kept on disk and an interrupted curve resumes.
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
        batch_size=batch_size, batch_tokens=batch_tokens, backend="hf",
    )
    items = _checkpoint_items(checkpoints, label_names)
    prompt_list, fmt = check_prompts(prompts)
    if n_samples * len(prompt_list) < 2:
        raise ArgumentError(
            f"n_samples={n_samples} with {len(prompt_list)} prompt gives 1 sample per checkpoint; a KL "
            "estimate and its standard error need at least 2. Raise n_samples or add prompts."
        )
    ref_model = load_causal_lm(reference, role="reference", device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    source = reference
    if tokenizer is None and not (isinstance(reference, (str, os.PathLike)) or getattr(reference, "name_or_path", "")):
        source = items[0][2]
    tok = load_tokenizer(tokenizer, source, role="reference", trust_remote_code=trust_remote_code)
    check_vocab_covers(ref_model, tok, role="reference")
    prompt_ids = encode_prompts(prompt_list, fmt, tok, chat_template_kwargs)
    check_prompt_context(prompt_ids, ref_model, max_new_tokens, role="reference")
    label_cols = [name for name in label_names if any(name in fields for _, fields, _ in items)]
    columns = list(CURVE_SAMPLE_COLUMNS) + label_cols
    common = dict(columns=columns, tokenizer=tok, reward_tokenizer=reward_tokenizer, device=device, dtype=dtype,
                  trust_remote_code=trust_remote_code)
    scorers = {"proxy": _resolve_scorer(proxy, "proxy", **common), "gold": _resolve_scorer(gold, "gold", **common)}
    pad_id = padding_id(tok, ref_model)
    _check_checkpoints(items, tok, trust_remote_code)

    frames: list[pd.DataFrame] = []
    bar = tqdm(items, desc="checkpoints", unit="ckpt", disable=not progress or len(items) < 2, leave=False)
    try:
        for name, fields, spec in bar:
            policy = load_causal_lm(spec, role=f"checkpoint {name!r}", device=device, dtype=dtype,
                                    trust_remote_code=trust_remote_code)
            check_vocab_covers(policy, tok, role=f"checkpoint {name!r}")
            frame = sample(
                policy, prompt_list, n=n_samples, max_new_tokens=max_new_tokens, seed=seed, tokenizer=tok,
                batch_size=batch_size, batch_tokens=batch_tokens, cache_dir=cache_dir,
                chat_template_kwargs=chat_template_kwargs, progress=progress, dtype=dtype,
            )
            ref = engine_logprobs(
                ref_model, prompt_ids, frame["prompt_index"], frame["tokens"], pad_id=pad_id, dtype=dtype,
                batch_tokens=batch_tokens,
            )
            frame["ref_logp"] = [float(v.astype(np.float64).sum()) for v in ref]
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
    scored = _score(samples, scorers, fmt=fmt, batch_tokens=batch_tokens, dtype=dtype, progress=progress,
                    chat_template_kwargs=chat_template_kwargs)
    curve = _summarise(samples, label_cols, scored, n_samples)
    return (curve, samples) if return_samples else curve


__all__ = ["checkpoint_curve", "curve_from_samples", "kl_estimate", "mean_se"]
