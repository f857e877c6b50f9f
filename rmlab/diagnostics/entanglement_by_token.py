"""Token-level gradient entanglement: each response token's share of the pair's gradient products.

Follows the token-level analysis of Yuan et al. 2024 ("A Common Pitfall of Margin-based Language
Model Alignment: Gradient Entanglement"): the inner product ``<g_w, g_l>`` and the squared norms of
:func:`rmlab.gradient_entanglement` split exactly over response tokens (:func:`token_entanglement`).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from rmlab.diagnostics.pair_frames import SIDES
from rmlab.diagnostics.pair_gradients import prepared_pairs
from rmlab.engine.param_selection import ModelState
from rmlab.engine.token_grads import token_gradient_products
from rmlab.io.tokenize import decode_tokens
from rmlab.options import LOADING, TOKENIZING, Options, with_options


@with_options(*TOKENIZING, *LOADING, "progress")
def token_entanglement(policy, data, *, params=None, options: Options) -> pd.DataFrame:
    """Token-level gradient entanglement: each response token's share of ``<g_w, g_l>`` and ``|g|^2``.

    Follows the token-level analysis of Yuan et al. 2024 (gradient entanglement). Since
    ``g_w = sum_t grad log pi(y_w,t | .)``, the pair-level quantities of :func:`gradient_entanglement`
    split exactly over tokens: for a chosen token ``t``, ``inner_other = <grad log pi(y_w,t), g_l>`` and
    ``inner_own = <grad log pi(y_w,t), g_w>``; for a rejected token, ``inner_other = <grad log
    pi(y_l,t), g_w>`` and ``inner_own = <grad log pi(y_l,t), g_l>``. Per pair, ``inner_other`` sums to
    ``grad_inner`` on either side and ``inner_own`` to ``grad_sq_chosen`` / ``grad_sq_rejected``. A
    chosen token with a large positive ``inner_other`` is one whose likelihood the rejected response
    drags along.

    Per-token gradients are exact: per pair one forward pass, then batched vector-Jacobian products
    over the response tokens (no projection). ``policy``, ``data`` and ``params`` as in
    :func:`gradient_entanglement`; the options (``tokenizer``, ``max_length``, ``truncation_mode``,
    ``add_eos``, ``chat_template_kwargs``, ``device``, ``dtype``, ``trust_remote_code``,
    ``revision``, ``use_safetensors``, ``progress``: see :class:`rmlab.Options`) flat or as
    ``options=``. Batching options do not apply: each pair runs alone.

    Returns:
        One row per response token: ``pair``, ``side``, ``position`` (0-based in the response),
        ``token_id``, ``token``, ``logp``, ``inner_other``, ``inner_own`` and ``grad_sq``
        (``|grad log pi(y_t)|^2``).
    """
    progress = options.progress
    with prepared_pairs(policy, None, data, params, options) as (inputs, selection):
        model = inputs.policy
        parts = []
        bar = tqdm(total=len(inputs.encoded), desc="token gradients", unit="pair", disable=not progress, leave=False)
        with ModelState(model).analysing(selection):
            try:
                for i, pair in enumerate(inputs.encoded):
                    sides = [side for side in SIDES if getattr(pair, side).n_response > 0]
                    if not sides:  # both responses truncated to nothing
                        bar.update(1)
                        continue
                    products, lps, squares, _ = token_gradient_products(
                        model, [getattr(pair, side) for side in sides], selection, pad_id=inputs.pad_id,
                        vectors=torch.stack, autocast_dtype=inputs.autocast_dtype(model),
                    )
                    for j, side in enumerate(sides):
                        seq = getattr(pair, side)
                        parts.append(
                            pd.DataFrame(
                                {
                                    "pair": i,
                                    "side": side,
                                    "position": np.arange(seq.n_response),
                                    "token_id": np.asarray(seq.response_ids, dtype=np.int64),
                                    "logp": lps[j],
                                    # a response truncated to nothing has gradient 0
                                    "inner_other": products[j][:, 1 - j] if len(sides) == 2 else 0.0,
                                    "inner_own": products[j][:, j],
                                    "grad_sq": squares[j],
                                }
                            )
                        )
                    bar.update(1)
            finally:
                bar.close()
    columns = ["pair", "side", "position", "token_id", "logp", "inner_other", "inner_own", "grad_sq"]
    frame = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=columns)
    frame.insert(4, "token", decode_tokens(inputs.tokenizer, frame["token_id"].to_numpy()) if len(frame) else [])
    frame["side"] = pd.Categorical(frame["side"], categories=list(SIDES))
    frame.attrs.update(params=selection.describe(), num_params=selection.numel)
    return frame
