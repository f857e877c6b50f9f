"""Gradient similarity across pairs: how a DPO step on one pair moves another pair's log-probs.

Extends the per-pair gradient entanglement of Yuan et al. 2024 ("A Common Pitfall of Margin-based
Language Model Alignment: Gradient Entanglement") across pairs, with gradients optionally projected
at random as in TRAK (Park et al. 2023) and LESS (Xia et al. 2024): :func:`gradient_similarity`
gives one row per ordered pair of pairs, :func:`similarity_matrix` one column of it as a table.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from rmlab.diagnostics.pair_gradients import (
    check_method,
    check_projection,
    check_weighting,
    gradient_pass,
    loss_weights,
    pair_reference,
    prepared_pairs,
    reference_sums,
)
from rmlab.engine.pairs import check_beta
from rmlab.engine.param_selection import ModelState, check_flat_budget
from rmlab.engine.projection import RandomProjection
from rmlab.errors import DataError
from rmlab.options import LOADING, RUNNING, TOKENIZING, Options, with_options

#: Largest exact (unprojected) gradient store :func:`gradient_similarity` accepts.
EXACT_SIMILARITY_BYTES = 2 << 30


@with_options(*TOKENIZING, *RUNNING, *LOADING)
def gradient_similarity(
    policy,
    data,
    *,
    reference=None,
    beta: float = 0.1,
    params=None,
    projection_dim: int | None = None,
    seed: int = 0,
    loss_weight: str = "auto",
    method: str = "auto",
    options: Options,
) -> pd.DataFrame:
    """Pair-by-pair gradient similarity: how a DPO step on pair ``a`` moves pair ``b``'s log-probs.

    Extends the per-pair analysis of Yuan et al. 2024 (gradient entanglement) across pairs, with
    gradients optionally randomly projected as in TRAK (Park et al. 2023) and LESS (Xia et al. 2024).
    An SGD step of learning rate ``eta`` on pair ``a``'s loss alone moves ``theta`` by
    ``eta * u_a`` with ``u_a = c_a (g_w,a - g_l,a)`` (``c_a`` as in :func:`gradient_entanglement`); to
    first order it changes pair ``b``'s chosen log-prob by ``eta * <u_a, g_w,b>``.

    Arguments as in :func:`gradient_entanglement` (the options flat or as ``options=``, an
    :class:`rmlab.Options`). Without ``projection_dim`` the exact gradients of
    all pairs are held in memory (two float32 vectors of the selected size per pair, at most 2 GiB:
    choose fewer parameters with ``params=`` or pass ``projection_dim=``); with it, their projections.

    Returns:
        A long frame of ``N * N`` rows, one per ordered pair ``(a, b)`` (``b`` fastest):

        - ``pair_a``, ``pair_b``;
        - ``inner`` = ``<c_a (g_w,a - g_l,a), g_w,b>``: first-order change of ``lp(y_w,b)`` per unit
          learning rate when stepping on pair ``a``. The diagonal is ``pred_delta_chosen / lr`` of
          :func:`gradient_entanglement` (same projection seed);
        - ``inner_rejected`` = ``<c_a (g_w,a - g_l,a), g_l,b>``: the same for ``lp(y_l,b)`` (diagonal:
          ``pred_delta_rejected / lr``);
        - ``inner_margin`` = ``inner - inner_rejected``: the change of ``b``'s log-prob margin
          ``lp(y_w,b) - lp(y_l,b)``; ``inner_margin / loss_weight_a`` is symmetric in ``(a, b)``
          (``<d_a, d_b>``, ``d = g_w - g_l``) and its diagonal is ``>= 0``;
        - ``cosine`` = ``cos(g_w,a - g_l,a, g_w,b)``: the direction alone (independent of ``c_a``);
        - ``loss_weight_a`` = ``c_a``.

        :func:`similarity_matrix` turns a column into an ``N x N`` table. ``frame.attrs`` records
        the settings, as :func:`gradient_entanglement`.
    """
    beta = check_beta(beta)
    k = check_projection(projection_dim, seed)
    reference = pair_reference(policy, reference)
    weighting = check_weighting(loss_weight, reference)
    check_method(method)
    progress = options.progress
    with prepared_pairs(policy, reference, data, params, options) as (inputs, selection):
        n = len(inputs.encoded)
        model = inputs.policy
        dev = next(model.parameters()).device
        if k is None:
            check_flat_budget(
                2 * n, selection, "gradient_similarity without projection_dim",
                "Pass projection_dim= (e.g. 2048) or select fewer parameters with params=.",
                EXACT_SIMILARITY_BYTES,
            )
        ref = reference_sums(inputs, progress)
        projection = RandomProjection(selection.sizes, k, seed=int(seed), device=dev) if k is not None else None
        width = k if k is not None else selection.numel
        g_w = torch.zeros(n, width, dtype=torch.float32, device=dev)
        g_l = torch.zeros(n, width, dtype=torch.float32, device=dev)
        weight = np.full(n, np.nan)

        def store(batch, vectors):
            rows = torch.as_tensor(batch, device=dev)
            g_w[rows] = vectors[0::2].to(dev)
            g_l[rows] = vectors[1::2].to(dev)

        def consume(batch, grads):
            lps = grads.logps.numpy().reshape(-1, 2)
            weight[np.asarray(batch)] = loss_weights(lps, ref[np.asarray(batch)], beta, weighting)[1]
            if projection is None:
                store(batch, grads.flat())

        with ModelState(model).analysing(selection):
            used = gradient_pass(
                inputs, selection, method=method, progress=progress, consume=consume,
                projection=projection, consume_projected=store,
            )

    d = (g_w - g_l).double()
    c = torch.as_tensor(weight, dtype=torch.float64, device=dev)
    to_chosen = (d @ g_w.double().T).cpu().numpy()
    to_rejected = (d @ g_l.double().T).cpu().numpy()
    norms_d = d.norm(dim=1).cpu().numpy()
    norms_w = g_w.double().norm(dim=1).cpu().numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        cosine = to_chosen / np.outer(norms_d, norms_w)
    c = c.cpu().numpy()[:, None]
    frame = pd.DataFrame(
        {
            "pair_a": np.repeat(np.arange(n), n),
            "pair_b": np.tile(np.arange(n), n),
            "inner": (c * to_chosen).ravel(),
            "inner_rejected": (c * to_rejected).ravel(),
            "inner_margin": (c * (to_chosen - to_rejected)).ravel(),
            "cosine": cosine.ravel(),
            "loss_weight_a": np.repeat(c[:, 0], n),
        }
    )
    frame.attrs.update(
        beta=beta, loss_weight=weighting, params=selection.describe(), num_params=selection.numel,
        projection_dim=k, seed=int(seed) if k is not None else None, projected=k is not None, method=used,
        pairs=n,
    )
    return frame


def similarity_matrix(frame: pd.DataFrame, values: str = "inner") -> pd.DataFrame:
    """One column of a :func:`gradient_similarity` frame as an ``N x N`` table (rows ``pair_a``)."""
    needed = {"pair_a", "pair_b", values}
    if not needed <= set(frame.columns):
        raise DataError(
            f"similarity_matrix needs a frame from rmlab.gradient_similarity with column {values!r}; "
            f"it has {list(frame.columns)}."
        )
    return frame.pivot(index="pair_a", columns="pair_b", values=values)
