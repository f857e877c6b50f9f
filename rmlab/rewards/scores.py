"""Scores of explicit reward models (sequence classifiers) on preference pairs or single texts.

A reward model trained with the Bradley-Terry loss (Ouyang et al. 2022, InstructGPT; TRL's
``RewardTrainer``) scores a whole prompt+response; ``P(chosen > rejected) = sigmoid(r_c - r_r)``.
Inputs are tokenised as TRL's ``RewardTrainer`` prepares them: EOS appended to plain text (unless
the tokenizer closes texts itself, as encoders do), chat template applied to conversations.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from rmlab.cache import resolve_cache_dir
from rmlab.engine.reward_model import cached_scores, prepare_reward_inputs
from rmlab.options import CACHING, LOADING, RUNNING, TOKENIZING, Options, with_options


@with_options(*TOKENIZING, *RUNNING, *LOADING, *CACHING, defaults={"add_eos": None})
def reward_scores(reward_model, data, *, label=None, options: Options) -> pd.DataFrame:
    """Score preference pairs, or single texts, with an explicit reward model.

    Follows the Bradley-Terry reading of reward models (Ouyang et al. 2022): ``margin = r(x, y_c) -
    r(x, y_r)``, ``prob_chosen = sigmoid(margin)``, ``correct = margin > 0`` (strict, as TRL's
    ``RewardTrainer`` accuracy).

    Args:
        reward_model: an ``AutoModelForSequenceClassification`` or a hub name / local path.
        data: preference pairs (columns ``prompt``, ``chosen``, ``rejected``, in any form
            :func:`rmlab.load_pairs` accepts), or texts to score one by one: a list of strings or
            conversations, or rows with ``prompt`` + ``completion``/``response``, ``text`` or
            ``messages`` (see :func:`rmlab.io.responses.load_responses`).
        tokenizer: the reward model's tokenizer (loaded from its path if None).
        label: which output is the reward, for a head with several (index or ``id2label`` name).
        max_length, truncation_mode: truncate prompt+response to ``max_length`` tokens;
            affected rows get ``truncated=True``.
        add_eos: append EOS to plain text; ``None`` (default) appends it when the tokenizer has one
            and does not add it itself.
        batch_tokens: padded tokens per forward pass (default 2048 on CPU, 32768 on CUDA).
        device, dtype, progress: as in :func:`rmlab.implicit_rewards`.
        cache_dir: a folder (default: ``$RMLAB_CACHE_DIR`` if set; ``False``: none) for a resumable cache of the scores (``scores-<key>/``, parquet chunks
            written as batches finish, keyed by the reward model's weights, the tokenizer, the token
            ids scored, ``label``, the padding id, the device type and compute dtype; see
            :mod:`rmlab.cache`). An interrupted call resumes where it stopped; a repeated call runs
            no model. Delete the folder to clear it. None (default): no cache.
        overwrite_cache: delete this call's cache entry first and score everything afresh.
        chat_template_kwargs, trust_remote_code, revision, use_safetensors, runner: see
            :class:`rmlab.Options`.
        options: all of the above as one :class:`rmlab.Options` (flat keywords override it).

    Returns:
        For pairs, one row per pair: ``pair``, ``score_chosen``, ``score_rejected``, ``margin``,
        ``correct``, ``prob_chosen``, ``tokens_chosen``, ``tokens_rejected`` (response tokens),
        ``truncated``, then the input's columns. For texts, one row per text: ``row``, ``score``,
        ``tokens``, ``truncated``, then ``prompt``, ``response`` and the input's other columns.

    Example:
        >>> import rmlab
        >>> from rmlab.toy import tiny_reward_model, tiny_tokenizer
        >>> rm, tok = tiny_reward_model("gpt2"), tiny_tokenizer()
        >>> frame = rmlab.reward_scores(rm, ["a great film", "a dull film"], tokenizer=tok, progress=False)
        >>> list(frame.columns[:3])
        ['row', 'score', 'tokens']
    """
    cache_dir = resolve_cache_dir(options.cache_dir, options.overwrite_cache)
    inputs = prepare_reward_inputs(reward_model, data, label=label, options=options)
    if cache_dir is None:
        scores = inputs.runner.scores(
            inputs.model, [s.ids for s in inputs.sequences], pad_id=inputs.pad_id, label=inputs.label,
            batch_tokens=inputs.batch_tokens, autocast_dtype=inputs.autocast_dtype, progress=options.progress,
        )
    else:
        scores = cached_scores(inputs, cache_dir, overwrite=options.overwrite_cache, progress=options.progress)
    seqs = inputs.sequences
    if inputs.kind == "responses":
        frame = pd.DataFrame(
            {
                "row": np.arange(len(seqs)),
                "score": scores,
                "tokens": [s.n_response for s in seqs],
                "truncated": [s.truncated for s in seqs],
            }
        )
    else:
        frame = pd.DataFrame(
            {"pair": np.arange(len(seqs) // 2), "score_chosen": scores[0::2], "score_rejected": scores[1::2]}
        )
        frame["margin"] = frame["score_chosen"] - frame["score_rejected"]
        frame["correct"] = frame["margin"] > 0
        frame["prob_chosen"] = 1.0 / (1.0 + np.exp(-frame["margin"]))
        frame["tokens_chosen"] = [s.n_response for s in seqs[0::2]]
        frame["tokens_rejected"] = [s.n_response for s in seqs[1::2]]
        frame["truncated"] = [a.truncated or b.truncated for a, b in zip(seqs[0::2], seqs[1::2])]
    out = pd.concat([frame, inputs.frame.reset_index(drop=True)], axis=1)
    out.attrs.update(kind=inputs.kind, format=inputs.frame.attrs.get("format"))
    return out
