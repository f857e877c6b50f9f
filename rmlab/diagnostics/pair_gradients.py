"""The shared run of the gradient analyses: argument checks, inputs, loss weights, per-pair gradients.

Gradient entanglement (Yuan et al. 2024, "A Common Pitfall of Margin-based Language Model
Alignment: Gradient Entanglement") and its cross-pair and per-token forms all start the same way:
validate and tokenise the pairs as TRL's ``DPOTrainer`` (:func:`prepared_pairs`), sum the reference
log-probs (:func:`reference_sums`), weight each pair by DPO's ``c = beta * sigmoid(-margin)``
(:func:`loss_weights`) and take the gradients of both responses' summed log-probs pair by pair
(:func:`gradient_pass`).
"""

from __future__ import annotations

import contextlib
import math
import numbers

import numpy as np
import torch
from tqdm.auto import tqdm

from rmlab.diagnostics.pair_frames import response_sums
from rmlab.engine.grads import GRAD_BYTES, SequenceGradients, gradient_batches
from rmlab.engine.logprobs import logprobs_with_grad
from rmlab.engine.model_pair import ModelPair
from rmlab.engine.pairs import PairInputs, prepare_pair_inputs, run_logprobs
from rmlab.engine.param_selection import ModelState, ParamSelection, select_parameters
from rmlab.engine.precision import autocast
from rmlab.engine.projection import RandomProjection
from rmlab.errors import ArgumentError, check_choice
from rmlab.options import Options

#: Accepted values of ``loss_weight``.
WEIGHTINGS = ("auto", "dpo", "none")


# --------------------------------------------------------------------------------------------------
# argument checks (all before any model runs)
# --------------------------------------------------------------------------------------------------
def check_lr(lr, *, allow_zero: bool = False, hint: str = "for the SGD step, e.g. 1e-4") -> float:
    """The learning rate as a float; :class:`ArgumentError` unless it is finite and > 0 (>= 0 with
    ``allow_zero``). ``hint`` says, in the message, what the rate is for."""
    try:
        value = float(lr)
    except (TypeError, ValueError):
        value = float("nan")
    if isinstance(lr, bool) or not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ArgumentError(f"lr={lr!r} must be a finite learning rate {'>=' if allow_zero else '>'} 0 ({hint}).")
    return value


def check_projection(projection_dim, seed) -> int | None:
    """``projection_dim`` as an int (None: exact gradients), after checking it and the projection's ``seed``."""
    if projection_dim is None:
        return None
    if isinstance(projection_dim, bool) or not isinstance(projection_dim, numbers.Integral) or projection_dim < 1:
        raise ArgumentError(
            f"projection_dim={projection_dim!r} must be a positive integer (e.g. 2048) or None for exact gradients."
        )
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ArgumentError(f"seed={seed!r} must be an integer (it seeds the random projection).")
    return int(projection_dim)


def pair_reference(policy, reference):
    """The reference an analysis runs against: ``reference``, or the own reference of a
    :class:`rmlab.ModelPair` given as ``policy``."""
    return policy.reference if isinstance(policy, ModelPair) and reference is None else reference


def check_weighting(loss_weight, reference) -> str:
    """The loss weighting to use, ``"dpo"`` or ``"none"`` (``"auto"``: DPO's when there is a reference)."""
    check_choice("loss_weight", loss_weight, WEIGHTINGS)
    if loss_weight == "dpo" and reference is None:
        raise ArgumentError(
            "loss_weight='dpo' weights each pair by beta * sigmoid(-margin), and the DPO margin needs the "
            "reference model: pass reference= (usually the SFT model), or loss_weight='none' for c = 1."
        )
    if loss_weight == "auto":
        return "dpo" if reference is not None else "none"
    return loss_weight


def check_method(method) -> None:
    """:class:`ArgumentError` unless ``method`` is ``"auto"``, ``"vmap"`` or ``"loop"``."""
    check_choice("method", method, ("auto", "vmap", "loop"))


# --------------------------------------------------------------------------------------------------
# the shared run: validation, model state, per-pair gradients
# --------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def prepared_pairs(policy, reference, data, params, options: Options):
    """Validate and tokenise with ``options``; yield ``(inputs, selection)`` (the pairs and the
    parameters ``params`` selects, :func:`~rmlab.engine.param_selection.select_parameters`); restore
    both models' training and ``requires_grad`` flags on exit."""
    models = (policy.policy, policy.reference) if isinstance(policy, ModelPair) else (policy, reference)
    states = [ModelState(m) for m in models if isinstance(m, torch.nn.Module)]
    try:
        inputs = prepare_pair_inputs(policy, reference, data, options=options)
        selection = select_parameters(inputs.policy, params)
        yield inputs, selection
    finally:
        for state in reversed(states):
            state.restore()


def _vocab_size(model) -> int:
    head = model.get_output_embeddings()
    weight = getattr(head, "weight", None)
    return int(weight.shape[0]) if weight is not None else int(model.config.vocab_size)


def reference_sums(inputs: PairInputs, progress: bool) -> np.ndarray:
    """``(N, 2)`` summed reference log-probs (NaN without a reference or for an empty response)."""
    n = len(inputs.encoded)
    if inputs.reference is None:
        return np.full((n, 2), np.nan)
    return response_sums(run_logprobs(inputs, inputs.reference, "reference", progress=progress)).reshape(n, 2)


def loss_weights(logps: np.ndarray, ref: np.ndarray, beta: float, weighting: str) -> tuple[np.ndarray, np.ndarray]:
    """Implicit-reward margins and loss weights ``c`` for rows of ``(lp_w, lp_l)``: DPO's
    ``c = beta * sigmoid(-margin)`` (Rafailov et al. 2023; Yuan et al. 2024), or 1 with
    ``weighting="none"`` (the margin is then NaN without reference log-probs)."""
    if weighting == "dpo":
        margin = beta * ((logps[:, 0] - ref[:, 0]) - (logps[:, 1] - ref[:, 1]))
        with np.errstate(over="ignore"):
            return margin, beta / (1.0 + np.exp(margin))  # beta * sigmoid(-margin)
    margin = np.full(len(logps), np.nan)
    if ref is not None and not np.all(np.isnan(ref)):
        margin = beta * ((logps[:, 0] - ref[:, 0]) - (logps[:, 1] - ref[:, 1]))
    weight = np.where(np.isnan(logps).any(axis=1), np.nan, 1.0)
    return margin, weight


def pair_logps_now(inputs: PairInputs, i: int) -> np.ndarray:
    """``(lp_w, lp_l)`` of pair ``i`` at the current weights (one no-grad forward of both)."""
    pair = inputs.encoded[i]
    model = inputs.policy
    device = next(model.parameters()).device
    with torch.no_grad(), autocast(device, inputs.autocast_dtype(model)):
        values = logprobs_with_grad(model, [pair.chosen, pair.rejected], pad_id=inputs.pad_id)
    return np.array([float(v.double().sum()) if v.numel() else np.nan for v in values])


def gradient_pass(
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
