"""Gradient entanglement: how one margin-loss step moves the chosen and the rejected log-prob.

Follows Yuan et al. 2024, "A Common Pitfall of Margin-based Language Model Alignment: Gradient
Entanglement" (official code: HumainLab/Understand_MarginPO). With ``g_w = grad_theta lp(y_w)`` and
``g_l = grad_theta lp(y_l)`` the gradients of the summed response log-probs, a gradient step of
learning rate ``eta`` on a margin loss ``L(m)``, ``m = beta * [(lp(y_w) - ref_w) - (lp(y_l) - ref_l)]``
(DPO: ``L = -log sigmoid(m)``), moves ``theta`` by ``eta * c * (g_w - g_l)`` with ``c = -dL/dlp(y_w) =
beta * sigmoid(-m)`` and changes, to first order,

    d lp(y_w) = eta * c * (|g_w|^2 - <g_w, g_l>)
    d lp(y_l) = eta * c * (<g_w, g_l> - |g_l|^2)

so the chosen log-prob *falls* when ``<g_w, g_l> > |g_w|^2`` and the rejected one *rises* when
``<g_w, g_l> > |g_l|^2``, although the margin always grows (``|g_w - g_l|^2 >= 0``).

- :func:`gradient_entanglement` (here): per pair the two squared norms, the inner product, the
  cosine, the loss weight, the predicted changes and flags, and on request the realised changes
  after an actual step on that pair alone; :func:`predict_entanglement` re-predicts a computed frame
  for another ``beta`` or learning rate without a model.
- :func:`token_entanglement` (:mod:`rmlab.diagnostics.entanglement_by_token`): per response token,
  its share of the inner products (``grad log pi(y_t)`` against the other response's and its own
  response's gradient).
- :func:`gradient_similarity` (:mod:`rmlab.diagnostics.similarity`): pair by pair, how a step on
  pair ``a`` changes pair ``b``'s log-probs (exact gradients, or random projections as in TRAK, Park
  et al. 2023, and LESS, Xia et al. 2024).

The run they share (checks, inputs, loss weights, per-pair gradients) is
:mod:`rmlab.diagnostics.pair_gradients`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from rmlab.diagnostics.entanglement_by_token import token_entanglement
from rmlab.diagnostics.pair_gradients import (
    check_lr,
    check_method,
    check_projection,
    check_weighting,
    gradient_pass,
    loss_weights,
    pair_logps_now,
    pair_reference,
    prepared_pairs,
    reference_sums,
)
from rmlab.diagnostics.pair_frames import pair_columns
from rmlab.diagnostics.similarity import EXACT_SIMILARITY_BYTES, gradient_similarity, similarity_matrix
from rmlab.engine.pairs import check_beta
from rmlab.engine.param_selection import ModelState, add_to_parameters, restore_parameters, save_parameters
from rmlab.engine.projection import RandomProjection
from rmlab.errors import ArgumentError, DataError
from rmlab.options import LOADING, RUNNING, TOKENIZING, Options, with_options


@with_options(*TOKENIZING, *RUNNING, *LOADING)
def gradient_entanglement(
    policy,
    data,
    *,
    reference=None,
    beta: float = 0.1,
    params=None,
    projection_dim: int | None = None,
    seed: int = 0,
    lr: float = 1e-4,
    realised: bool = False,
    loss_weight: str = "auto",
    method: str = "auto",
    options: Options,
) -> pd.DataFrame:
    """Gradient entanglement per preference pair: do the chosen and rejected gradients fight?

    Follows Yuan et al. 2024 ("A Common Pitfall of Margin-based Language Model Alignment: Gradient
    Entanglement"). For each pair, ``g_w`` and ``g_l`` are the gradients, with respect to the selected
    parameters, of the summed response log-probs ``lp(y_w)`` and ``lp(y_l)`` (tokenised as TRL's
    ``DPOTrainer`` and scored as :func:`rmlab.implicit_rewards`). One SGD step of learning rate ``lr``
    on the pair's loss ``-log sigmoid(margin)`` alone moves ``theta`` by ``+lr * c * (g_w - g_l)``, with
    the loss weight ``c = -dloss/dlp(y_w) = beta * sigmoid(-margin)``; to first order it changes

    - ``lp(y_w)`` by ``pred_delta_chosen = lr * c * (|g_w|^2 - <g_w, g_l>)``,
    - ``lp(y_l)`` by ``pred_delta_rejected = lr * c * (<g_w, g_l> - |g_l|^2)``,

    so the chosen log-prob falls iff ``<g_w, g_l> > |g_w|^2`` (``chosen_falls``) and the rejected one
    rises iff ``<g_w, g_l> > |g_l|^2`` (``rejected_rises``), while their difference always grows.

    Args:
        policy: the model to analyse (a ``PreTrainedModel``, a hub name / local path, or an
            :class:`rmlab.ModelPair`, whose reference is then the one used).
        data: preference pairs, as for :func:`rmlab.implicit_rewards`.
        reference: the DPO reference model. With it, ``c = beta * sigmoid(-margin)`` (DPO's weight).
            Without it (``reference=None``), ``c = 1``: the plain margin loss ``-(lp(y_w) - lp(y_l))``,
            whose step is the direction every margin loss shares; the predicted changes are then per
            unit of loss weight.
        beta: DPO's KL coefficient (> 0).
        params: which parameters ``theta`` are: None = every parameter that requires grad (for a
            peft / LoRA model exactly the adapters, as the official code); a regular expression over
            ``named_parameters()`` names, e.g. ``r"transformer\\.h\\.2\\.|lm_head"``; a list of them; a
            callable ``(name, param) -> bool``; or ``"last:k"`` (every parameter of the last ``k``
            transformer blocks). Tied tensors (``lm_head`` / ``wte``) count once.
        projection_dim: if given, each gradient is first projected to this many dimensions with a
            seeded random Rademacher matrix scaled by ``1/sqrt(k)`` (as TRAK / LESS), and the norms,
            inner products, cosines and predicted changes are those of the projected vectors (unbiased
            estimates of the exact ones, error ``~ sqrt(2/k) |g_w| |g_l|``). Realised steps always use
            the exact gradients.
        seed: seed of the projection (same seed, same device type: same numbers).
        lr: learning rate of the single SGD step (> 0). Predicted changes scale linearly with it.
        realised: also take that step on each pair alone, recompute both log-probs and report the
            true changes; the selected parameters are restored bit for bit after each pair (also on
            an exception or a KeyboardInterrupt). For small ``lr`` they match the prediction.
        loss_weight: ``"auto"`` (DPO with a reference, 1 without), ``"dpo"`` (needs a reference) or
            ``"none"`` (``c = 1``).
        method: per-example gradients by ``"vmap"`` (``torch.func``), ``"loop"`` (a backward pass
            per response) or ``"auto"`` (vmap, checked once per model against the loop; the loop
            where vmap cannot run the model).
        tokenizer, max_length, truncation_mode, add_eos, chat_template_kwargs, batch_tokens, progress,
            runner, device, dtype, trust_remote_code, revision, use_safetensors: as in
            :func:`rmlab.implicit_rewards` (see :class:`rmlab.Options`).
        options: all of those as one :class:`rmlab.Options` (flat keywords override its fields).

    Returns:
        One row per pair: ``pair``, ``logps_chosen``, ``logps_rejected`` (equal to
        :func:`rmlab.implicit_rewards`'), ``ref_logps_chosen``, ``ref_logps_rejected``, ``margin`` (the
        implicit-reward margin; NaN without a reference), ``loss_weight`` (``c``), ``grad_sq_chosen``
        (``|g_w|^2``), ``grad_sq_rejected`` (``|g_l|^2``), ``grad_inner`` (``<g_w, g_l>``),
        ``grad_cosine``, ``pred_delta_chosen``, ``pred_delta_rejected``, ``chosen_falls``,
        ``rejected_rises``, with ``realised=True`` ``real_delta_chosen`` and ``real_delta_rejected``
        (log-prob after the step minus before), then ``tokens_chosen``, ``tokens_rejected``,
        ``prompt_tokens``, ``truncated`` and the input columns. ``frame.attrs`` records ``beta``,
        ``lr``, ``loss_weight``, ``params`` (a description), ``num_params``, ``projection_dim``,
        ``seed``, ``projected`` and ``method``.

    Example:
        >>> import rmlab
        >>> from rmlab.toy import tiny_causal_lm, tiny_tokenizer
        >>> models = rmlab.ModelPair(tiny_causal_lm("gpt2", seed=1), tiny_causal_lm("gpt2"), tokenizer=tiny_tokenizer())
        >>> data = [{"prompt": "Review:", "chosen": " great film", "rejected": " dull film"}]
        >>> frame = rmlab.gradient_entanglement(models, data, progress=False)  # the pair's reference
        >>> bool(frame["grad_sq_chosen"].iloc[0] > 0)
        True
    """
    beta = check_beta(beta)
    lr = check_lr(lr)
    k = check_projection(projection_dim, seed)
    reference = pair_reference(policy, reference)
    weighting = check_weighting(loss_weight, reference)
    check_method(method)
    if not isinstance(realised, bool):
        raise ArgumentError(f"realised={realised!r} must be True or False.")
    progress = options.progress
    with prepared_pairs(policy, reference, data, params, options) as (inputs, selection):
        n = len(inputs.encoded)
        ref = reference_sums(inputs, progress)
        model = inputs.policy
        projection = (
            RandomProjection(selection.sizes, k, seed=int(seed), device=next(model.parameters()).device)
            if k is not None else None
        )
        logps = np.full((n, 2), np.nan)
        margin = np.full(n, np.nan)
        weight = np.full(n, np.nan)
        stats = np.full((n, 3), np.nan)  # |g_w|^2, |g_l|^2, <g_w, g_l>
        real = np.full((n, 2), np.nan)
        saved = save_parameters(selection) if realised else None

        def consume(batch, grads):
            rows = np.asarray(batch)
            lps = grads.logps.numpy().reshape(-1, 2)
            logps[rows] = lps
            margin[rows], weight[rows] = loss_weights(lps, ref[rows], beta, weighting)
            if projection is None:
                stats[rows] = grads.pair_gram()
            if not realised:
                return
            for j, i in enumerate(batch):
                if not np.isfinite(weight[i]):
                    continue
                scale = lr * float(weight[i])
                step = [(w.float() - l.float()).mul_(scale) for w, l in zip(grads.row(2 * j), grads.row(2 * j + 1))]
                before = pair_logps_now(inputs, i)
                try:
                    add_to_parameters(selection, step)
                    after = pair_logps_now(inputs, i)
                finally:
                    restore_parameters(selection, saved)
                real[i] = after - before

        def consume_projected(indices, vectors):
            v = vectors.double()
            a, b = v[0::2], v[1::2]
            stats[np.asarray(indices)] = torch.stack([(a * a).sum(1), (b * b).sum(1), (a * b).sum(1)], dim=1).cpu().numpy()

        state = ModelState(model)
        with state.analysing(selection):
            try:
                used = gradient_pass(
                    inputs, selection, method=method, progress=progress, consume=consume,
                    projection=projection, consume_projected=consume_projected,
                )
            finally:
                if saved is not None:
                    restore_parameters(selection, saved)

    sq_w, sq_l, inner = stats[:, 0], stats[:, 1], stats[:, 2]
    with np.errstate(invalid="ignore", divide="ignore"):
        cosine = inner / np.sqrt(sq_w * sq_l)
    frame = pd.DataFrame(
        {
            "pair": np.arange(n),
            "logps_chosen": logps[:, 0],
            "logps_rejected": logps[:, 1],
            "ref_logps_chosen": ref[:, 0],
            "ref_logps_rejected": ref[:, 1],
            "margin": margin,
            "loss_weight": weight,
            "grad_sq_chosen": sq_w,
            "grad_sq_rejected": sq_l,
            "grad_inner": inner,
            "grad_cosine": cosine,
            "pred_delta_chosen": lr * weight * (sq_w - inner),
            "pred_delta_rejected": lr * weight * (inner - sq_l),
            "chosen_falls": inner > sq_w,
            "rejected_rises": inner > sq_l,
        }
    )
    if realised:
        frame["real_delta_chosen"] = real[:, 0]
        frame["real_delta_rejected"] = real[:, 1]
    frame = pair_columns(frame, inputs, prompt_tokens=True)
    frame.attrs.update(
        beta=beta, lr=lr, loss_weight=weighting, params=selection.describe(), num_params=selection.numel,
        projection_dim=k, seed=int(seed) if k is not None else None, projected=k is not None, method=used,
        realised=realised, format=inputs.pairs.attrs.get("format"),
        note=(
            "norms and inner products of gradients randomly projected to "
            f"{k} dimensions (Rademacher, seed {seed}); realised steps use exact gradients"
            if k is not None else "exact gradients"
        ) + ("" if weighting == "dpo" else "; loss weight c = 1 (plain margin loss)"),
    )
    return frame


# --------------------------------------------------------------------------------------------------
# re-predicting a computed frame for another beta or learning rate (no model needed)
# --------------------------------------------------------------------------------------------------
def predict_entanglement(frame: pd.DataFrame, *, beta: float | None = None, lr: float | None = None) -> pd.DataFrame:
    """The first-order changes of a :func:`gradient_entanglement` frame at another ``beta`` or ``lr``.

    Yuan et al. 2024: the gradients ``g_w``, ``g_l`` (and so ``|g_w|^2``, ``|g_l|^2``, ``<g_w, g_l>``)
    are those of the log-probs and do not depend on ``beta`` or the learning rate; only the loss weight
    ``c = beta * sigmoid(-margin)`` (DPO, with ``margin = beta * ((lp_w - ref_w) - (lp_l - ref_l))``)
    and the step size do. So the predicted changes for any ``beta`` and ``lr`` follow from the frame
    alone, exactly as :func:`gradient_entanglement` would compute them, without touching a model:

    - ``pred_delta_chosen = lr * c * (|g_w|^2 - <g_w, g_l>)``,
    - ``pred_delta_rejected = lr * c * (<g_w, g_l> - |g_l|^2)``.

    ``chosen_falls`` and ``rejected_rises`` (signs) do not change; the magnitudes do.

    Args:
        frame: from :func:`gradient_entanglement` (its ``attrs`` give the original ``beta``, ``lr``
            and ``loss_weight``).
        beta: the new KL coefficient (> 0); None keeps the frame's.
        lr: the new learning rate (> 0); None keeps the frame's.

    Returns:
        A copy of the frame with ``margin``, ``loss_weight``, ``pred_delta_chosen`` and
        ``pred_delta_rejected`` recomputed and ``attrs`` ``beta`` / ``lr`` updated. Realised changes
        (``real_delta_*``) were measured at the frame's own settings: they are kept when ``beta`` and
        ``lr`` are unchanged and dropped otherwise.
    """
    needed = ["logps_chosen", "logps_rejected", "ref_logps_chosen", "ref_logps_rejected",
              "grad_sq_chosen", "grad_sq_rejected", "grad_inner"]
    missing = [c for c in needed if c not in frame.columns]
    if missing or "loss_weight" not in frame.attrs:
        raise DataError(
            f"predict_entanglement needs a frame from rmlab.gradient_entanglement; this one lacks "
            f"{missing or 'its attrs (beta, lr, loss_weight)'}. Recompute it with gradient_entanglement."
        )
    beta = check_beta(frame.attrs["beta"] if beta is None else beta)
    lr = check_lr(frame.attrs["lr"] if lr is None else lr)
    logps = frame[["logps_chosen", "logps_rejected"]].to_numpy(np.float64)
    ref = frame[["ref_logps_chosen", "ref_logps_rejected"]].to_numpy(np.float64)
    margin, weight = loss_weights(logps, ref, beta, frame.attrs["loss_weight"])
    sq_w, sq_l, inner = (frame[c].to_numpy(np.float64) for c in ("grad_sq_chosen", "grad_sq_rejected", "grad_inner"))
    out = frame.copy()
    if (beta, lr) != (frame.attrs["beta"], frame.attrs["lr"]):
        out = out.drop(columns=[c for c in ("real_delta_chosen", "real_delta_rejected") if c in out.columns])
    out["margin"] = margin
    out["loss_weight"] = weight
    out["pred_delta_chosen"] = lr * weight * (sq_w - inner)
    out["pred_delta_rejected"] = lr * weight * (inner - sq_l)
    out.attrs = {**frame.attrs, "beta": beta, "lr": lr}
    return out


__all__ = [
    "EXACT_SIMILARITY_BYTES",
    "gradient_entanglement",
    "gradient_similarity",
    "predict_entanglement",
    "similarity_matrix",
    "token_entanglement",
]
