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

- :func:`gradient_entanglement`: per pair the two squared norms, the inner product, the cosine, the
  loss weight, the predicted changes and flags, and on request the realised changes after an actual
  step on that pair alone.
- :func:`token_entanglement`: per response token, its share of the inner products (``grad log
  pi(y_t)`` against the other response's and its own response's gradient).
- :func:`gradient_similarity`: pair by pair, how a step on pair ``a`` changes pair ``b``'s log-probs
  (exact gradients, or random projections as in TRAK, Park et al. 2023, and LESS, Xia et al. 2024).
"""

from __future__ import annotations

import contextlib
import math
import numbers

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from rmlab.engine.grads import (
    GRAD_BYTES,
    ModelState,
    ParamSelection,
    RandomProjection,
    SequenceGradients,
    add_to_parameters,
    check_flat_budget,
    gradient_batches,
    restore_parameters,
    save_parameters,
    select_parameters,
)
from rmlab.engine.token_grads import token_gradient_products
from rmlab.engine.logprobs import logprobs_with_grad
from rmlab.engine.pairs import PairInputs, check_beta, prepare_pair_inputs, run_logprobs
from rmlab.engine.precision import autocast
from rmlab.errors import ArgumentError, DataError, check_choice
from rmlab.io.tokenize import decode_tokens

_SIDES = ("chosen", "rejected")
_WEIGHTINGS = ("auto", "dpo", "none")
#: Largest exact (unprojected) gradient store :func:`gradient_similarity` accepts.
EXACT_SIMILARITY_BYTES = 2 << 30


# --------------------------------------------------------------------------------------------------
# argument checks (all before any model runs)
# --------------------------------------------------------------------------------------------------
def _check_lr(lr) -> float:
    try:
        value = float(lr)
    except (TypeError, ValueError):
        value = float("nan")
    if isinstance(lr, bool) or not math.isfinite(value) or value <= 0:
        raise ArgumentError(f"lr={lr!r} must be a finite number > 0 (the learning rate of the SGD step, e.g. 1e-4).")
    return value


def _check_projection(projection_dim, seed) -> int | None:
    if projection_dim is None:
        return None
    if isinstance(projection_dim, bool) or not isinstance(projection_dim, numbers.Integral) or projection_dim < 1:
        raise ArgumentError(
            f"projection_dim={projection_dim!r} must be a positive integer (e.g. 2048) or None for exact gradients."
        )
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ArgumentError(f"seed={seed!r} must be an integer (it seeds the random projection).")
    return int(projection_dim)


def _check_weighting(loss_weight, reference) -> str:
    check_choice("loss_weight", loss_weight, _WEIGHTINGS)
    if loss_weight == "dpo" and reference is None:
        raise ArgumentError(
            "loss_weight='dpo' weights each pair by beta * sigmoid(-margin), and the DPO margin needs the "
            "reference model: pass reference= (usually the SFT model), or loss_weight='none' for c = 1."
        )
    if loss_weight == "auto":
        return "dpo" if reference is not None else "none"
    return loss_weight


def _check_method(method) -> None:
    check_choice("method", method, ("auto", "vmap", "loop"))


# --------------------------------------------------------------------------------------------------
# the shared run: validation, model state, per-pair gradients
# --------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _prepared(policy, reference, data, params, **options):
    """Validate and tokenise; yield ``(inputs, selection)``; restore both models' flags on exit."""
    states = [ModelState(m) for m in (policy, reference) if isinstance(m, torch.nn.Module)]
    try:
        inputs = prepare_pair_inputs(policy, reference, data, **options)
        selection = select_parameters(inputs.policy, params)
        yield inputs, selection
    finally:
        for state in reversed(states):
            state.restore()


def _vocab_size(model) -> int:
    head = model.get_output_embeddings()
    weight = getattr(head, "weight", None)
    return int(weight.shape[0]) if weight is not None else int(model.config.vocab_size)


def _reference_sums(inputs: PairInputs, progress: bool) -> np.ndarray:
    """``(N, 2)`` summed reference log-probs (NaN without a reference or for an empty response)."""
    n = len(inputs.encoded)
    if inputs.reference is None:
        return np.full((n, 2), np.nan)
    values = run_logprobs(inputs, inputs.reference, "reference", progress=progress)
    sums = [float(v.sum(dtype=np.float64)) if len(v) else np.nan for v in values]
    return np.asarray(sums, dtype=np.float64).reshape(n, 2)


def _loss_weights(logps: np.ndarray, ref: np.ndarray, beta: float, weighting: str) -> tuple[np.ndarray, np.ndarray]:
    """Implicit-reward margins and loss weights ``c`` for rows of ``(lp_w, lp_l)``."""
    if weighting == "dpo":
        margin = beta * ((logps[:, 0] - ref[:, 0]) - (logps[:, 1] - ref[:, 1]))
        with np.errstate(over="ignore"):
            return margin, beta / (1.0 + np.exp(margin))  # beta * sigmoid(-margin)
    margin = np.full(len(logps), np.nan)
    if ref is not None and not np.all(np.isnan(ref)):
        margin = beta * ((logps[:, 0] - ref[:, 0]) - (logps[:, 1] - ref[:, 1]))
    weight = np.where(np.isnan(logps).any(axis=1), np.nan, 1.0)
    return margin, weight


def _pair_logps_now(inputs: PairInputs, i: int) -> np.ndarray:
    """``(lp_w, lp_l)`` of pair ``i`` at the current weights (one no-grad forward of both)."""
    pair = inputs.encoded[i]
    model = inputs.policy
    device = next(model.parameters()).device
    with torch.no_grad(), autocast(device, inputs.autocast_dtype(model)):
        values = logprobs_with_grad(model, [pair.chosen, pair.rejected], pad_id=inputs.pad_id)
    return np.array([float(v.double().sum()) if v.numel() else np.nan for v in values])


def _gradient_pass(
    inputs: PairInputs,
    selection: ParamSelection,
    *,
    method: str,
    progress: bool,
    consume,
    projection: RandomProjection | None = None,
    consume_projected=None,
) -> str:
    """Per-pair gradients batch by batch; ``consume(pair_indices, grads)`` gets each batch's
    :class:`~rmlab.engine.grads.Gradients` (rows ``2j`` / ``2j + 1`` are the chosen / rejected
    response of ``pair_indices[j]``). With a ``projection``, flattened gradients are gathered over
    batches (up to the engine's gradient memory budget, so the random matrix is generated once per
    gathering, not once per batch) and ``consume_projected(pair_indices, vectors)`` gets their
    ``(2 m, k)`` projections. Returns the method used ("vmap" or "loop")."""
    sequences = inputs.sequences
    groups = [[2 * i, 2 * i + 1] for i in range(len(inputs.encoded))]
    model = inputs.policy
    device = next(model.parameters()).device
    batches = gradient_batches(
        sequences, groups, selection, vocab_size=_vocab_size(model), device=device,
        batch_tokens=inputs.batch_tokens,
    )
    engine = SequenceGradients(
        model, selection, pad_id=inputs.pad_id, method=method, autocast_dtype=inputs.autocast_dtype(model)
    )
    capacity = max(2, GRAD_BYTES.get(device.type, 1 << 30) // (4 * selection.numel))
    pending: list[tuple[list[int], torch.Tensor]] = []

    def flush():
        if pending:
            indices = [i for batch, _ in pending for i in batch]
            consume_projected(indices, projection(torch.cat([flat for _, flat in pending])))
            pending.clear()

    bar = tqdm(total=len(groups), desc="per-pair gradients", unit="pair", disable=not progress, leave=False)
    try:
        for batch in batches:
            members = [k for g in batch for k in groups[g]]
            grads = engine([sequences[k] for k in members])
            consume(batch, grads)
            if projection is not None:
                if sum(len(f) for _, f in pending) + 2 * len(batch) > capacity:
                    flush()
                pending.append((list(batch), grads.flat()))
            del grads
            bar.update(len(batch))
        if projection is not None:
            flush()
    finally:
        bar.close()
    return engine.method_used


def _pair_columns(frame: pd.DataFrame, inputs: PairInputs) -> pd.DataFrame:
    frame["tokens_chosen"] = [p.chosen.n_response for p in inputs.encoded]
    frame["tokens_rejected"] = [p.rejected.n_response for p in inputs.encoded]
    frame["prompt_tokens"] = [p.prompt_tokens for p in inputs.encoded]
    frame["truncated"] = [p.truncated for p in inputs.encoded]
    return pd.concat([frame, inputs.pairs.reset_index(drop=True)], axis=1)


# --------------------------------------------------------------------------------------------------
# gradient_entanglement
# --------------------------------------------------------------------------------------------------
def gradient_entanglement(
    policy,
    data,
    *,
    tokenizer=None,
    reference=None,
    beta: float = 0.1,
    params=None,
    projection_dim: int | None = None,
    seed: int = 0,
    lr: float = 1e-4,
    realised: bool = False,
    loss_weight: str = "auto",
    method: str = "auto",
    max_length: int | None = None,
    truncation_mode: str = "keep_start",
    add_eos: bool = True,
    batch_tokens: int | None = None,
    device="auto",
    dtype="auto",
    progress: bool = True,
    **kwargs,
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
        policy: the model to analyse (a ``PreTrainedModel``, or a hub name / local path).
        data: preference pairs, as for :func:`rmlab.implicit_rewards`.
        tokenizer: the tokenizer (loaded from the policy's path if None).
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
        max_length, truncation_mode, add_eos, batch_tokens, device, dtype, progress, **kwargs: as in
            :func:`rmlab.implicit_rewards`.

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
        >>> tok = tiny_tokenizer()
        >>> policy, ref = tiny_causal_lm("gpt2", seed=1), tiny_causal_lm("gpt2", seed=0)
        >>> pairs = [{"prompt": "Review:", "chosen": " great film", "rejected": " dull film"}]
        >>> frame = rmlab.gradient_entanglement(policy, pairs, reference=ref, tokenizer=tok, progress=False)
        >>> bool(frame["grad_sq_chosen"].iloc[0] > 0)
        True
    """
    beta = check_beta(beta)
    lr = _check_lr(lr)
    k = _check_projection(projection_dim, seed)
    weighting = _check_weighting(loss_weight, reference)
    _check_method(method)
    if not isinstance(realised, bool):
        raise ArgumentError(f"realised={realised!r} must be True or False.")
    with _prepared(
        policy, reference, data, params, tokenizer=tokenizer, max_length=max_length,
        truncation_mode=truncation_mode, add_eos=add_eos, batch_tokens=batch_tokens, device=device,
        dtype=dtype, **kwargs,
    ) as (inputs, selection):
        n = len(inputs.encoded)
        ref = _reference_sums(inputs, progress)
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
            margin[rows], weight[rows] = _loss_weights(lps, ref[rows], beta, weighting)
            if projection is None:
                stats[rows] = grads.pair_gram()
            if not realised:
                return
            for j, i in enumerate(batch):
                if not np.isfinite(weight[i]):
                    continue
                scale = lr * float(weight[i])
                step = [(w.float() - l.float()).mul_(scale) for w, l in zip(grads.row(2 * j), grads.row(2 * j + 1))]
                before = _pair_logps_now(inputs, i)
                try:
                    add_to_parameters(selection, step)
                    after = _pair_logps_now(inputs, i)
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
                used = _gradient_pass(
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
    frame = _pair_columns(frame, inputs)
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
# gradient_similarity
# --------------------------------------------------------------------------------------------------
def gradient_similarity(
    policy,
    data,
    *,
    tokenizer=None,
    reference=None,
    beta: float = 0.1,
    params=None,
    projection_dim: int | None = None,
    seed: int = 0,
    loss_weight: str = "auto",
    method: str = "auto",
    max_length: int | None = None,
    truncation_mode: str = "keep_start",
    add_eos: bool = True,
    batch_tokens: int | None = None,
    device="auto",
    dtype="auto",
    progress: bool = True,
    **kwargs,
) -> pd.DataFrame:
    """Pair-by-pair gradient similarity: how a DPO step on pair ``a`` moves pair ``b``'s log-probs.

    Extends the per-pair analysis of Yuan et al. 2024 (gradient entanglement) across pairs, with
    gradients optionally randomly projected as in TRAK (Park et al. 2023) and LESS (Xia et al. 2024).
    An SGD step of learning rate ``eta`` on pair ``a``'s loss alone moves ``theta`` by
    ``eta * u_a`` with ``u_a = c_a (g_w,a - g_l,a)`` (``c_a`` as in :func:`gradient_entanglement`); to
    first order it changes pair ``b``'s chosen log-prob by ``eta * <u_a, g_w,b>``.

    Arguments as in :func:`gradient_entanglement`. Without ``projection_dim`` the exact gradients of
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
    k = _check_projection(projection_dim, seed)
    weighting = _check_weighting(loss_weight, reference)
    _check_method(method)
    with _prepared(
        policy, reference, data, params, tokenizer=tokenizer, max_length=max_length,
        truncation_mode=truncation_mode, add_eos=add_eos, batch_tokens=batch_tokens, device=device,
        dtype=dtype, **kwargs,
    ) as (inputs, selection):
        n = len(inputs.encoded)
        model = inputs.policy
        dev = next(model.parameters()).device
        if k is None:
            check_flat_budget(
                2 * n, selection, "gradient_similarity without projection_dim",
                "Pass projection_dim= (e.g. 2048) or select fewer parameters with params=.",
                EXACT_SIMILARITY_BYTES,
            )
        ref = _reference_sums(inputs, progress)
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
            weight[np.asarray(batch)] = _loss_weights(lps, ref[np.asarray(batch)], beta, weighting)[1]
            if projection is None:
                store(batch, grads.flat())

        with ModelState(model).analysing(selection):
            used = _gradient_pass(
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


# --------------------------------------------------------------------------------------------------
# token_entanglement
# --------------------------------------------------------------------------------------------------
def token_entanglement(
    policy,
    data,
    *,
    tokenizer=None,
    params=None,
    max_length: int | None = None,
    truncation_mode: str = "keep_start",
    add_eos: bool = True,
    device="auto",
    dtype="auto",
    progress: bool = True,
    **kwargs,
) -> pd.DataFrame:
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
    over the response tokens (no projection). Arguments as in :func:`gradient_entanglement`.

    Returns:
        One row per response token: ``pair``, ``side``, ``position`` (0-based in the response),
        ``token_id``, ``token``, ``logp``, ``inner_other``, ``inner_own`` and ``grad_sq``
        (``|grad log pi(y_t)|^2``).
    """
    with _prepared(
        policy, None, data, params, tokenizer=tokenizer, max_length=max_length,
        truncation_mode=truncation_mode, add_eos=add_eos, device=device, dtype=dtype, **kwargs,
    ) as (inputs, selection):
        model = inputs.policy
        parts = []
        bar = tqdm(total=len(inputs.encoded), desc="token gradients", unit="pair", disable=not progress, leave=False)
        with ModelState(model).analysing(selection):
            try:
                for i, pair in enumerate(inputs.encoded):
                    sides = [side for side in _SIDES if getattr(pair, side).n_response > 0]
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
    frame["side"] = pd.Categorical(frame["side"], categories=list(_SIDES))
    frame.attrs.update(params=selection.describe(), num_params=selection.numel)
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
    lr = _check_lr(frame.attrs["lr"] if lr is None else lr)
    logps = frame[["logps_chosen", "logps_rejected"]].to_numpy(np.float64)
    ref = frame[["ref_logps_chosen", "ref_logps_rejected"]].to_numpy(np.float64)
    margin, weight = _loss_weights(logps, ref, beta, frame.attrs["loss_weight"])
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
