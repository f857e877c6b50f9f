"""Scores of explicit reward models (sequence classifiers with one output) on pairs or texts.

A reward model trained with the Bradley-Terry loss (Ouyang et al. 2022, InstructGPT; TRL's
``RewardTrainer``) scores a whole prompt+response; ``P(chosen > rejected) = sigmoid(r_c - r_r)``.
Inputs are tokenised like the policy's (EOS appended to plain text, chat template applied to
conversations), which is also how TRL's ``RewardTrainer`` prepares them.
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm
from transformers import AutoModelForSequenceClassification, PreTrainedModel

from rmlab.engine.batching import default_batch_tokens, length_batches, pad_right
from rmlab.errors import ModelError
from rmlab.io.models import load_tokenizer, model_device, resolve_device, resolve_dtype
from rmlab.io.pairs import load_pairs
from rmlab.io.tokenize import encode_pairs


def load_reward_model(model, *, device="auto", dtype="auto", trust_remote_code: bool = False):
    """Return a sequence-classification reward model with a single score, loading it if a path.

    Raises:
        ModelError: a causal LM or a classifier with more than one output was given.
    """
    if isinstance(model, (str, os.PathLike)):
        target = resolve_device(device)
        try:
            model = AutoModelForSequenceClassification.from_pretrained(
                str(model), dtype=resolve_dtype(dtype, target), trust_remote_code=trust_remote_code,
                use_safetensors=True,
            ).to(target)
        except (OSError, ValueError) as err:
            raise ModelError(f"Could not load the reward model {str(model)!r}: {err}") from err
    elif device not in (None, "auto"):
        model = model.to(resolve_device(device))
    name = type(model).__name__
    if not isinstance(model, PreTrainedModel) or not name.endswith("ForSequenceClassification"):
        raise ModelError(
            f"The reward model is a {name}, not a sequence classifier (AutoModelForSequenceClassification "
            "with num_labels=1). A causal LM's implicit reward is computed by rmlab.implicit_rewards."
        )
    if model.config.num_labels != 1:
        raise ModelError(
            f"The reward model has {model.config.num_labels} outputs; a reward model has one score "
            "(num_labels=1)."
        )
    return model.eval()


def score_ids(model, sequences, *, pad_id: int, batch_tokens: int | None = None, progress=True) -> np.ndarray:
    """One scalar score per id list, in length-bucketed batches (right padding, last real token)."""
    device = model_device(model)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = pad_id  # needed to find the last real token of each row
    pad_id = model.config.pad_token_id
    budget = batch_tokens or default_batch_tokens(device)
    batches = length_batches([len(s) for s in sequences], budget)
    out = np.empty(len(sequences), dtype=np.float64)
    with torch.inference_mode():
        for batch in tqdm(batches, desc="reward scores", disable=not progress, leave=False):
            ids, mask = pad_right([sequences[i] for i in batch], pad_id)
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            out[batch] = logits[:, 0].float().cpu().numpy()
    return out


def reward_scores(
    reward_model,
    data,
    *,
    tokenizer=None,
    max_length: int | None = None,
    add_eos: bool = True,
    batch_tokens: int | None = None,
    device="auto",
    dtype="auto",
    progress: bool = True,
) -> pd.DataFrame:
    """Score preference pairs with an explicit reward model.

    Follows the Bradley-Terry reading of reward models (Ouyang et al. 2022): ``margin = r(x, y_c) -
    r(x, y_r)``, ``prob_chosen = sigmoid(margin)``, ``correct = margin > 0``.

    Args:
        reward_model: an ``AutoModelForSequenceClassification`` with one label, or a name/path.
        data: preference pairs in any form :func:`rmlab.load_pairs` accepts.
        tokenizer: the reward model's tokenizer (loaded from its path if None).
        max_length, add_eos, batch_tokens, device, dtype, progress: as in
            :func:`rmlab.implicit_rewards`.

    Returns:
        One row per pair: ``pair``, ``score_chosen``, ``score_rejected``, ``margin``, ``correct``,
        ``prob_chosen``, ``truncated``, then the input's columns.
    """
    pairs = load_pairs(data)
    model = load_reward_model(reward_model, device=device, dtype=dtype)
    tok = load_tokenizer(tokenizer, reward_model, role="reward model")
    encoded = encode_pairs(pairs, tok, max_length=max_length, add_eos=add_eos)
    seqs = [list(s.ids) for p in encoded for s in (p.chosen, p.rejected)]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    scores = score_ids(model, seqs, pad_id=pad, batch_tokens=batch_tokens, progress=progress)
    frame = pd.DataFrame({"pair": np.arange(len(encoded)), "score_chosen": scores[0::2], "score_rejected": scores[1::2]})
    frame["margin"] = frame["score_chosen"] - frame["score_rejected"]
    frame["correct"] = frame["margin"] > 0
    frame["prob_chosen"] = 1.0 / (1.0 + np.exp(-frame["margin"]))
    frame["truncated"] = [p.truncated for p in encoded]
    return pd.concat([frame, pairs.reset_index(drop=True)], axis=1)
