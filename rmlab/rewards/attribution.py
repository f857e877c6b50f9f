"""Which input tokens a reward comes from: captum attributions of a reward to every input token.

Two kinds of reward are explained the same way, with the same output columns:

- an explicit reward model (a sequence classifier; Ouyang et al. 2022): the reward of a sequence is
  the model's score of prompt+response, pooled exactly as :func:`rmlab.reward_scores` pools it;
- a DPO policy with its reference model (Rafailov et al. 2023, "Direct Preference Optimization:
  Your Language Model is Secretly a Reward Model"): the implicit reward
  ``beta * sum_t [log pi(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t)]`` over the response tokens,
  tokenised exactly as :func:`rmlab.implicit_rewards`.

Three attribution methods from captum (Kokhlikyan et al. 2020):

- ``"integrated_gradients"``: integrated gradients (Sundararajan et al. 2017, "Axiomatic Attribution
  for Deep Networks") on the output of the input-embedding layer (captum's
  ``LayerIntegratedGradients``), summed over the embedding dimension; the attributions of a sequence
  sum to ``f(input) - f(baseline)`` up to the reported convergence ``delta``;
- ``"feature_ablation"``: occlusion of one token at a time (Zeiler & Fergus 2014; captum's
  ``FeatureAblation``): ``f(input) - f(input with token t replaced by the baseline token)``;
- ``"shapley"``: Shapley values estimated from sampled permutations of the tokens (Castro et al.
  2009, "Polynomial calculation of the Shapley value based on sampling"; Strumbelj & Kononenko
  2010; captum's ``ShapleyValueSampling``); each permutation telescopes, so the attributions sum
  exactly to ``f(input) - f(baseline)``.

How a token is "removed": its *embedding* is replaced by the embedding of a baseline token (by
default the padding token, as in captum's BERT tutorials), while the sequence keeps its ids for
everything else the model derives from them (length, attention mask, the position a causal reward
model pools at, the response tokens whose log-probs are scored). So the three methods explain one
and the same function of the token embeddings, and the path integrated gradients follows ends
exactly at the input ablation and Shapley sampling start from. Special tokens the tokenizer or the
chat template adds (BOS/CLS, EOS/SEP, ``<|im_start|>``...) keep their id in the baseline by default
(the standard practice for BERT-style baselines: ``[CLS] [PAD] ... [PAD] [SEP]``), so their
attribution is 0 and their effect is part of the baseline value.
"""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from rmlab.engine.pairs import check_beta
from rmlab.errors import ArgumentError, check_choice
from rmlab.options import LOADING, TOKENIZING, Options, with_options
from rmlab.io.pairs import load_pairs
from rmlab.io.responses import load_scoring_data
from rmlab.io.tokenize import EncodedSequence, decode_tokens
from rmlab.rewards.attribution_problems import (
    AttributionProblem,
    baseline_id,
    check_baseline,
    check_positive_int,
    declared_kind,
    dpo_problem,
    reward_model_problem,
    special_ids,
)

#: Attribution methods, by name.
METHODS = ("integrated_gradients", "feature_ablation", "shapley")
#: What is explained: each sequence's reward, or the pair's margin.
TARGETS = ("score", "margin")

def list_methods() -> list[str]:
    """Names :func:`attribute_reward` accepts for ``method``."""
    return list(METHODS)


# --------------------------------------------------------------------------------------------------
# the public function
# --------------------------------------------------------------------------------------------------
@with_options(*TOKENIZING, "batch_tokens", "progress", *LOADING, defaults={"add_eos": None})
def attribute_reward(
    model,
    data,
    *,
    reference=None,
    target: str = "score",
    method: str = "integrated_gradients",
    beta: float = 0.1,
    reference_free: bool = False,
    label=None,
    n_steps: int = 50,
    n_samples: int = 25,
    baseline=None,
    keep_special: bool = True,
    seed: int | None = 0,
    options: Options,
) -> pd.DataFrame:
    """Attribute a reward to every input token with captum: integrated gradients, ablation or Shapley.

    The reward explained is the score of an explicit reward model (Bradley-Terry reward models,
    Ouyang et al. 2022), or, when ``reference=`` is given, the implicit DPO reward of a policy
    ``beta * (log pi(y|x) - log pi_ref(y|x))`` summed over response tokens (Rafailov et al. 2023).
    Methods (captum, Kokhlikyan et al. 2020): integrated gradients on the input-embedding layer
    (Sundararajan et al. 2017), feature ablation (occlusion, Zeiler & Fergus 2014) and Shapley value
    sampling (Castro et al. 2009), each token one feature.

    A token is removed by giving it the *embedding* of a baseline token while the model keeps the
    real ids for everything else (attention mask, the pooling position of a causal reward model, the
    response tokens whose log-probs are scored). Integrated gradients interpolates the token
    embeddings on the straight line from the baseline's to the input's; for a DPO policy the policy's
    and the reference's embedding layers are interpolated together, with the same coefficient, by
    captum's multi-layer ``LayerIntegratedGradients`` (both models see the same interpolated
    sequence), and a token's attribution is the sum over both layers. The baseline sequence has the
    padding token at every position except special tokens (BOS/CLS, EOS/SEP, chat-template markers),
    which keep their id (``keep_special=True``), so those get attribution 0.

    With ``target="margin"`` (pairs only) the explained quantity is ``r(chosen) - r(rejected)``:
    chosen tokens carry the attributions of ``r(chosen)``, rejected tokens the negated attributions
    of ``r(rejected)``, and all of a pair's attributions sum to ``margin - baseline margin`` (up to
    the integrated-gradients ``delta``). The two sides are attributed separately, which for
    integrated gradients and ablation is exactly the attribution of the margin (their inputs are
    disjoint); for Shapley sampling it samples permutations of each side's tokens.

    Args:
        model: an explicit reward model (``AutoModelForSequenceClassification``) or, with
            ``reference``, a DPO policy (``AutoModelForCausalLM``); an object or a hub name / path.
        data: preference pairs (as :func:`rmlab.load_pairs` reads them) or, for a reward model, single
            texts (as :func:`rmlab.reward_scores` reads them). Tokenised exactly as
            :func:`rmlab.reward_scores` (reward model) or :func:`rmlab.implicit_rewards` (DPO).
        reference: the DPO reference model; None for a reward model.
        tokenizer: the model's tokenizer (loaded from the model's path if None).
        target: ``"score"`` (each sequence's reward) or ``"margin"`` (pairs: chosen minus rejected).
        method: ``"integrated_gradients"``, ``"feature_ablation"`` or ``"shapley"``
            (:func:`list_methods`).
        beta: DPO's KL coefficient (> 0); DPO only.
        reference_free: explain ``beta * log pi(y|x)`` of a causal LM without a reference (as
            :func:`rmlab.implicit_rewards`).
        label: which output of a multi-output reward head is the reward (index or name).
        n_steps: integration steps of integrated gradients (Gauss-Legendre, captum's default rule).
        n_samples: permutations sampled per sequence by Shapley sampling.
        baseline: the baseline token, an id or a token string; None = the padding token (the reward
            model's ``pad_token_id``, else the tokenizer's pad, else EOS).
        keep_special: keep special tokens in the baseline sequence (attribution 0); False replaces
            every position.
        seed: seed of the Shapley permutations (the global torch RNG is left untouched); None uses
            the global RNG.
        max_length, truncation_mode, add_eos: as in :func:`rmlab.reward_scores` /
            :func:`rmlab.implicit_rewards` (``add_eos=None``: their respective defaults).
        batch_tokens: token budget per forward pass (default 2048 on CPU, 32768 on CUDA); bounds
            captum's ``internal_batch_size`` (integrated gradients) and ``perturbations_per_eval``.
        device, dtype, progress: as in :func:`rmlab.implicit_rewards`; the progress bar counts
            sequences.
        tokenizer, chat_template_kwargs, trust_remote_code, revision, use_safetensors: see
            :class:`rmlab.Options`; ``options``: all of these as one :class:`rmlab.Options` (its
            ``runner`` and cache settings do not apply: gradients are taken in this process and
            nothing is cached).

    Returns:
        One row per input token of every sequence (prompt and response): ``pair`` (or ``row`` for
        single texts), ``side`` ("chosen"/"rejected"/"response"), ``position`` (index in the
        prompt+response ids), ``token_id``, ``token`` (decoded), ``in_response``, ``attribution``,
        then per sequence, repeated on its rows: ``target_value`` (the reward explained; for
        ``target="margin"`` the signed contribution, ``-r(rejected)`` on the rejected side),
        ``baseline_value`` (the same for the baseline sequence), ``delta`` (integrated gradients'
        convergence delta, ``sum(attribution) - (target_value - baseline_value)``; NaN for the other
        methods) and ``baseline_id`` (the token the baseline puts at that position). ``attrs`` holds
        the settings (``method``, ``target``, ``n_steps``, ``n_samples``, ``beta``, ...). A DPO
        response truncated to nothing has NaN values (as in :func:`rmlab.implicit_rewards`).

    Raises:
        ArgumentError: an unknown method or target, ``target="margin"`` on single texts, a reward
            model given a ``reference``, a causal LM without one, ``n_steps``/``n_samples`` < 1,
            ``beta`` <= 0, a bad baseline; all before any model runs.

    Example:
        >>> import rmlab
        >>> from rmlab.toy import tiny_reward_model, tiny_tokenizer
        >>> rm, tok = tiny_reward_model("gpt2"), tiny_tokenizer()
        >>> frame = attribute_reward(rm, ["a great film"], tokenizer=tok, n_steps=8, progress=False)
        >>> list(frame.columns[:4])
        ['row', 'side', 'position', 'token_id']
    """
    # ---- every check on the arguments, before anything loads or runs
    check_choice("method", method, METHODS)
    check_choice("target", target, TARGETS)
    n_steps = check_positive_int("n_steps", n_steps, "integration steps of integrated gradients")
    n_samples = check_positive_int("n_samples", n_samples, "permutations sampled by Shapley sampling")
    baseline = check_baseline(baseline)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
        raise ArgumentError(f"seed={seed!r} must be an integer or None.")
    if reference is not None and reference_free:
        raise ArgumentError(
            "reference_free=True ignores the reference model; pass reference=None to make that explicit."
        )
    dpo = reference is not None or reference_free
    if dpo:
        beta = check_beta(beta)
        if label is not None:
            raise ArgumentError(
                "label= picks an output of a reward model's head; a DPO policy's implicit reward has none."
            )
        pairs = load_pairs(data)  # a DataError for data that are not pairs, before any model loads
    elif target == "margin":
        kind, _ = load_scoring_data(data)
        if kind != "pairs":
            raise ArgumentError(
                "target='margin' explains r(chosen) - r(rejected) and needs preference pairs "
                "(columns prompt, chosen, rejected); these data are single texts. Use target='score'."
            )
    kind_of_model = declared_kind(model, options.trust_remote_code)
    if dpo and kind_of_model == "reward_model":
        raise ArgumentError(
            "model is a reward model (a sequence classifier): its score is explained directly. "
            "Drop reference=/reference_free=, which are for a DPO policy (a causal LM)."
        )
    if not dpo and kind_of_model == "causal_lm":
        raise ArgumentError(
            "model is a causal language model: its reward is the implicit DPO reward "
            "beta * log(pi/pi_ref), which needs the reference model. Pass reference=<the SFT model "
            "the policy started from>, or reference_free=True to explain beta * log pi(y|x) alone; "
            "or pass a reward model (a sequence classifier)."
        )

    # ---- load and tokenise (validated by the shared loaders)
    if dpo:
        problem = dpo_problem(model, reference, pairs, beta=beta, options=options)
    else:
        problem = reward_model_problem(model, data, label=label, options=options)
    base_token = baseline_id(baseline, problem)
    special = special_ids(problem.tokenizer) if keep_special else set()

    # ---- attribute, one sequence at a time
    parts = []
    width = 2 if problem.kind == "pairs" else 1
    sides = ("chosen", "rejected") if width == 2 else ("response",)
    frozen = [(p, p.requires_grad) for m in problem.models for p in m.parameters()]
    try:
        for p, _ in frozen:  # gradients are taken w.r.t. embeddings only, never parameters
            p.requires_grad_(False)
        bar = tqdm(total=len(problem.sequences), desc=f"attribution ({method})", unit="seq", disable=not options.progress, leave=False)
        with problem.context(), bar:
            for k, seq in enumerate(problem.sequences):
                ids = np.asarray(seq.ids, dtype=np.int64)
                base_ids = np.array([t if t in special else base_token for t in ids.tolist()], dtype=np.int64)
                if problem.defined(seq):
                    attr, value, base_value, delta = _attribute_one(
                        problem, seq, base_ids, method=method, n_steps=n_steps, n_samples=n_samples, seed=seed,
                    )
                else:
                    attr = np.full(len(ids), np.nan)
                    value = base_value = delta = float("nan")
                side = sides[k % width]
                sign = -1.0 if (target == "margin" and side == "rejected") else 1.0
                parts.append(
                    pd.DataFrame(
                        {
                            "pair" if width == 2 else "row": k // width,
                            "side": side,
                            "position": np.arange(len(ids)),
                            "token_id": ids,
                            "in_response": np.arange(len(ids)) >= seq.start,
                            "attribution": sign * attr,
                            "target_value": sign * value,
                            "baseline_value": sign * base_value,
                            "delta": sign * delta,
                            "baseline_id": base_ids,
                        }
                    )
                )
                bar.update()
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)
    frame = pd.concat(parts, ignore_index=True)
    frame.insert(4, "token", decode_tokens(problem.tokenizer, frame["token_id"].to_numpy()))
    frame["side"] = pd.Categorical(frame["side"], categories=list(sides))
    frame.attrs.update(
        method=method,
        target=target,
        kind=problem.kind,
        model_kind=problem.model_kind,
        n_steps=n_steps if method == "integrated_gradients" else None,
        n_samples=n_samples if method == "shapley" else None,
        beta=beta if dpo else None,
        label=problem.label,
        baseline_token_id=base_token,
        keep_special=bool(keep_special),
        seed=seed if method == "shapley" else None,
    )
    return frame


def _attribute_one(problem: AttributionProblem, seq: EncodedSequence, base_ids: np.ndarray, *, method: str,
                   n_steps: int, n_samples: int, seed) -> tuple[np.ndarray, float, float, float]:
    """Per-token attributions, f(input), f(baseline) and the IG delta (NaN otherwise) of one sequence."""
    from captum.attr import FeatureAblation, LayerIntegratedGradients, ShapleyValueSampling

    forward = problem.forward_for(seq)
    inputs = torch.tensor([list(seq.ids)], dtype=torch.long, device=problem.device)
    baselines = torch.as_tensor(base_ids[None, :], dtype=torch.long, device=problem.device)
    length = inputs.shape[1]
    per_eval = max(1, problem.budget // max(length, 1))
    with torch.no_grad():
        value = float(forward(inputs)[0])
        base_value = float(forward(baselines)[0])
    delta = float("nan")
    if method == "integrated_gradients":
        layer = problem.layers if len(problem.layers) > 1 else problem.layers[0]
        with warnings.catch_warnings():  # captum warns that several layers must not feed each other:
            warnings.simplefilter("ignore", UserWarning)  # a policy's and a reference's embeddings don't
            ig = LayerIntegratedGradients(forward, layer)
        with torch.enable_grad():
            attributions, deltas = ig.attribute(
                inputs, baselines=baselines, n_steps=n_steps, internal_batch_size=max(per_eval, 1),
                return_convergence_delta=True,
            )
        tensors = attributions if isinstance(attributions, list) else [attributions]
        flat = []
        for t in tensors:
            flat.extend(t if isinstance(t, tuple) else (t,))
        attr = sum(t.detach().double().sum(dim=-1)[0] for t in flat)
        delta = float(deltas.reshape(-1)[0])
    else:
        mask = torch.arange(length, device=problem.device)[None, :]
        per_eval = min(per_eval, length)
        if method == "feature_ablation":
            attr = FeatureAblation(forward).attribute(
                inputs, baselines=baselines, feature_mask=mask, perturbations_per_eval=per_eval
            )[0]
        else:
            rng = torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext()
            with rng:
                if seed is not None:
                    torch.manual_seed(int(seed))
                attr = ShapleyValueSampling(forward).attribute(
                    inputs, baselines=baselines, feature_mask=mask, n_samples=n_samples,
                    perturbations_per_eval=per_eval,
                )[0]
    return attr.detach().double().cpu().numpy(), value, base_value, delta
