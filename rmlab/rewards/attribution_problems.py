"""What an attribution explains: a reward as a function of the input-token embeddings.

:class:`AttributionProblem` holds, for a reward model (its pooled score; Ouyang et al. 2022) or a
DPO policy with its reference (the implicit reward ``beta * sum_t log(pi/pi_ref)``; Rafailov et al.
2023), the sequences, the hooked embedding layers and a forward that maps replaced embeddings to
the reward, so that :func:`rmlab.attribute_reward` can run any captum method (Kokhlikyan et al.
2020) on it. The input checks of :func:`rmlab.attribute_reward` that depend on the problem live
here too.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from rmlab.engine.batching import batch_budget
from rmlab.engine.logprobs import logprobs_with_grad
from rmlab.engine.pairs import prepare_pair_inputs
from rmlab.engine.precision import autocast
from rmlab.engine.reward_model import pad_token, prepare_reward_inputs
from rmlab.errors import ArgumentError, ModelError
from rmlab.io.models import check_same_device, is_causal_lm, is_reward_model, model_device
from rmlab.io.tokenize import EncodedSequence
from rmlab.options import Options


# --------------------------------------------------------------------------------------------------
# the function being explained
# --------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def embedding_input(layer: torch.nn.Module, ids: torch.Tensor, calls: list):
    """While active, ``layer`` (an input-embedding module) embeds ``ids`` instead of what it is given.

    The model still runs on its own input ids (attention mask, pooling position, labels all come
    from them); only the token embeddings change. A call whose input has another shape than ``ids``
    (e.g. a one-sequence check inside the engine) is left alone; ``calls`` counts substitutions so
    the caller can verify the layer was really used.
    """

    def swap(_module, args, kwargs):
        if args and torch.is_tensor(args[0]) and args[0].shape == ids.shape:
            calls.append(1)
            return (ids.to(args[0].device),) + tuple(args[1:]), kwargs
        for key in ("input", "input_ids"):
            value = kwargs.get(key)
            if torch.is_tensor(value) and value.shape == ids.shape:
                calls.append(1)
                return args, {**kwargs, key: ids.to(value.device)}
        return None

    handle = layer.register_forward_pre_hook(swap, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def check_used(calls: list, layers: Sequence[torch.nn.Module]) -> None:
    if not calls:
        names = ", ".join(type(layer).__name__ for layer in layers)
        raise ModelError(
            f"The model's input-embedding layer ({names}, from get_input_embeddings()) was not called "
            "on the input ids, so token embeddings cannot be swapped or interpolated. attribute_reward "
            "needs a model that embeds input_ids through get_input_embeddings()."
        )


@dataclass
class AttributionProblem:
    """Everything :func:`attribute_reward` needs, validated and tokenised; no model has run yet."""

    kind: str  # "pairs" or "responses"
    sequences: list[EncodedSequence]
    tokenizer: object
    pad_id: int
    layers: list[torch.nn.Module]  # input-embedding layers (policy and reference for DPO)
    models: list[torch.nn.Module]
    device: torch.device
    budget: int
    forward_for: Callable[[EncodedSequence], Callable[[torch.Tensor], torch.Tensor]]
    context: Callable[[], contextlib.AbstractContextManager]
    defined: Callable[[EncodedSequence], bool]
    vocab: int
    label: int | None
    model_kind: str


def reward_model_problem(model, data, *, label, options: Options) -> AttributionProblem:
    """Load and tokenise as :func:`rmlab.reward_scores` does, without running anything."""
    inputs = prepare_reward_inputs(model, data, label=label, options=options)
    rm = inputs.model
    layer = rm.get_input_embeddings()
    dev = model_device(rm)

    def forward_for(seq: EncodedSequence):
        ids = torch.tensor([list(seq.ids)], dtype=torch.long, device=dev)

        def forward(embed_ids: torch.Tensor) -> torch.Tensor:
            n = embed_ids.shape[0]
            batch = ids.repeat(n, 1)
            calls: list = []
            with embedding_input(layer, embed_ids, calls), autocast(dev, inputs.autocast_dtype):
                logits = rm(input_ids=batch, attention_mask=torch.ones_like(batch)).logits
            check_used(calls, [layer])
            return logits[:, inputs.label].float()

        return forward

    return AttributionProblem(
        kind=inputs.kind,
        sequences=inputs.sequences,
        tokenizer=inputs.tokenizer,
        pad_id=inputs.pad_id,
        layers=[layer],
        models=[rm],
        device=dev,
        budget=batch_budget(inputs.batch_tokens, dev),
        forward_for=forward_for,
        context=lambda: pad_token(rm, inputs.pad_id),
        defined=lambda seq: True,
        vocab=int(layer.weight.shape[0]),
        label=inputs.label,
        model_kind="reward_model",
    )


def dpo_problem(policy, reference, pairs: pd.DataFrame, *, beta, options: Options) -> AttributionProblem:
    """Load and tokenise as :func:`rmlab.implicit_rewards` does, without running anything."""
    if options.add_eos is None:  # implicit_rewards' default (TRL's DPOTrainer)
        options = options.replace(add_eos=True)
    inputs = prepare_pair_inputs(policy, reference, pairs, options=options)
    policy_model, ref_model, tok, pad_id = inputs.policy, inputs.reference, inputs.tokenizer, inputs.pad_id
    if ref_model is not None:  # both models see the same interpolated embeddings in one forward
        check_same_device([policy_model, ref_model], ["policy", "reference"])
    encoded = inputs.encoded

    models = [policy_model] + ([ref_model] if ref_model is not None else [])
    layers: list[torch.nn.Module] = []
    for m in models:
        layer = m.get_input_embeddings()
        if all(layer is not other for other in layers):  # one module used twice is hooked once
            layers.append(layer)
    dev = model_device(policy_model)

    casts = [inputs.autocast_dtype(m) for m in models]

    def forward_for(seq: EncodedSequence):
        def forward(embed_ids: torch.Tensor) -> torch.Tensor:
            n = embed_ids.shape[0]
            batch = [seq] * n
            calls: list = []
            sums = []
            with contextlib.ExitStack() as stack:
                for layer in layers:
                    stack.enter_context(embedding_input(layer, embed_ids, calls))
                for m, cast in zip(models, casts):
                    with autocast(model_device(m), cast):
                        logps = logprobs_with_grad(m, batch, pad_id=pad_id)
                    sums.append(torch.stack(logps).float().sum(dim=1).to(dev))
            check_used(calls, layers)
            value = sums[0] - sums[1] if len(sums) == 2 else sums[0]
            return beta * value

        return forward

    return AttributionProblem(
        kind="pairs",
        sequences=[s for p in encoded for s in (p.chosen, p.rejected)],
        tokenizer=tok,
        pad_id=int(pad_id),
        layers=layers,
        models=models,
        device=dev,
        budget=batch_budget(options.batch_tokens, dev),
        forward_for=forward_for,
        context=contextlib.nullcontext,
        defined=lambda seq: seq.n_response > 0,  # implicit_rewards: NaN for a response cut to nothing
        vocab=min(int(layer.weight.shape[0]) for layer in layers),
        label=None,
        model_kind="dpo" if ref_model is not None else "dpo_reference_free",
    )


# --------------------------------------------------------------------------------------------------
# checks
# --------------------------------------------------------------------------------------------------
def declared_kind(model, trust_remote_code: bool) -> str | None:
    """``"reward_model"`` / ``"causal_lm"`` for a model object, or from a path's config; else None."""
    if is_reward_model(model):
        return "reward_model"
    if is_causal_lm(model):
        return "causal_lm"
    if isinstance(model, (str, os.PathLike)):
        try:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(str(model), trust_remote_code=trust_remote_code)
        except Exception:  # noqa: BLE001 - the loader reports a path that does not load
            return None
        names = list(getattr(config, "architectures", None) or [])
        if any(n.endswith("ForSequenceClassification") for n in names):
            return "reward_model"
        if any(n.endswith(("ForCausalLM", "LMHeadModel")) for n in names):
            return "causal_lm"
    return None


def check_positive_int(name: str, value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ArgumentError(f"{name}={value!r} must be an integer >= 1 ({what}).")
    return int(value)


def check_baseline(baseline):
    if baseline is None:
        return None
    if isinstance(baseline, bool) or not isinstance(baseline, (int, np.integer, str)):
        raise ArgumentError(
            f"baseline={baseline!r} must be a token id (int), a token string, or None (the padding token)."
        )
    if isinstance(baseline, (int, np.integer)) and baseline < 0:
        raise ArgumentError(f"baseline={baseline!r} must be a token id >= 0.")
    return baseline


def baseline_id(baseline, problem: AttributionProblem) -> int:
    tok = problem.tokenizer
    if baseline is None:
        return problem.pad_id
    if isinstance(baseline, str):
        unk = getattr(tok, "unk_token_id", None)
        token_id = tok.convert_tokens_to_ids(baseline)
        if token_id is None or (token_id == unk and baseline != getattr(tok, "unk_token", None)):
            raise ArgumentError(
                f"baseline={baseline!r} is not a token of the tokenizer; pass a token id or one of its "
                f"tokens, e.g. {tok.pad_token or tok.eos_token!r}."
            )
        return int(token_id)
    if int(baseline) >= problem.vocab:
        raise ArgumentError(
            f"baseline={int(baseline)} is not a token id of the model (its embedding has {problem.vocab} rows)."
        )
    return int(baseline)


def special_ids(tokenizer) -> set[int]:
    """Ids of every special token: BOS/CLS, EOS/SEP, PAD, UNK, and added special tokens (chat markers)."""
    ids = {int(i) for i in getattr(tokenizer, "all_special_ids", []) or []}
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    ids.update(int(k) for k, v in decoder.items() if getattr(v, "special", False))
    return ids
