"""Per-token gradients of response log-probs, as inner products with given vectors.

The token-level decomposition of gradient entanglement (Yuan et al. 2024): for every response token
``t``, the inner products of ``grad log pi(y_t | .)`` with vectors built from the responses' summed
gradients, by batched vector-Jacobian products over the tokens (:func:`token_gradient_products`).
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Sequence

import numpy as np
import torch

from rmlab.engine.grads import GRAD_BYTES, VMAP_ERRORS
from rmlab.engine.logprobs import Scored, logprobs_with_grad
from rmlab.engine.param_selection import ParamSelection
from rmlab.engine.precision import autocast

#: Per model: "loop" once batched per-token gradients failed on it.
_TOKEN_STATE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _flat_grads(grads, params, rows: int, device) -> torch.Tensor:
    parts = []
    for p, g in zip(params, grads):
        parts.append(torch.zeros(rows, p.numel(), device=device) if g is None else g.reshape(rows, -1).float())
    return torch.cat(parts, dim=1)


def token_gradient_products(
    model,
    sequences: Sequence[Scored],
    selection: ParamSelection,
    *,
    pad_id: int,
    vectors: Callable[[list[torch.Tensor]], torch.Tensor],
    autocast_dtype: torch.dtype | None = None,
    grad_bytes: int | None = None,
) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray], torch.Tensor]:
    """Inner products of every scored token's log-prob gradient with given vectors, exactly.

    The token-level decomposition of gradient entanglement (Yuan et al. 2024, who form per-token
    gradients with one backward pass per token; here they are batched).

    The sequences (e.g. the chosen and rejected response of one pair) run in one forward pass of
    :func:`~rmlab.engine.logprobs.logprobs_with_grad`. First the gradient ``G_s`` of each sequence's
    summed log-prob is taken; ``vectors([G_0, G_1, ...])`` returns an ``(m, D)`` matrix ``V`` built from
    them. Then the per-token gradients ``grad log pi(y_t | .)`` are formed by batched vector-Jacobian
    products (``is_grads_batched``, rows chunked under ``grad_bytes``; one backward pass per token for
    a model where the batched form fails) and multiplied with ``V``.

    Returns:
        ``(products, logps, squares, G)``: per sequence a ``(tokens, m)`` float64 array of
        ``<grad log pi(y_t), V_j>``, the float64 token log-probs, the squared norms
        ``|grad log pi(y_t)|^2``, and the ``(len(sequences), D)`` matrix of sequence gradients.
        Token products sum to ``G_s @ V.T`` by linearity.
    """
    device = next(model.parameters()).device
    params = selection.params
    n_seq = len(sequences)
    counts = [len(s.ids) - s.start for s in sequences]
    with autocast(device, autocast_dtype):
        per_seq = logprobs_with_grad(model, list(sequences), pad_id=pad_id)
    flat = torch.cat([t.float() for t in per_seq])
    seq_grads = torch.zeros(n_seq, selection.numel, device=device)
    for s, lp in enumerate(per_seq):
        if counts[s] > 0:
            seq_grads[s] = _flat_grads(torch.autograd.grad(lp.float().sum(), params, retain_graph=True, allow_unused=True), params, 1, device)[0]
    V = vectors(list(seq_grads)).to(device, torch.float32)
    total = flat.numel()
    products = torch.zeros(total, V.shape[0], dtype=torch.float64)
    squares = torch.zeros(total, dtype=torch.float64)
    limit = grad_bytes or GRAD_BYTES.get(device.type, 1 << 30)
    chunk = max(1, limit // max(1, 2 * selection.numel * 4))
    batched = _TOKEN_STATE.get(model, "batched") == "batched"
    for lo in range(0, total, chunk):
        hi = min(total, lo + chunk)
        rows = None
        if batched:
            eye = torch.zeros(hi - lo, total, device=device)
            eye[torch.arange(hi - lo), torch.arange(lo, hi)] = 1.0
            try:
                grads = torch.autograd.grad(flat, params, grad_outputs=eye, retain_graph=True,
                                            is_grads_batched=True, allow_unused=True)
                rows = _flat_grads(grads, params, hi - lo, device)
            except torch.OutOfMemoryError:
                raise
            except VMAP_ERRORS as err:
                warnings.warn(
                    f"{type(model).__name__}: batched per-token gradients failed ({type(err).__name__}: "
                    f"{str(err).splitlines()[0][:200]}); using one backward pass per token (exact, slower).",
                    stacklevel=3,
                )
                _TOKEN_STATE[model] = "loop"
                batched = False
        if rows is None:
            rows = torch.cat([
                _flat_grads(torch.autograd.grad(flat[j], params, retain_graph=True, allow_unused=True), params, 1, device)
                for j in range(lo, hi)
            ])
        products[lo:hi] = (rows @ V.T).double().cpu()
        squares[lo:hi] = rows.double().pow(2).sum(1).cpu()
    splits = np.cumsum([0] + counts)
    logps = flat.detach().double().cpu().numpy()
    return (
        [products[a:b].numpy() for a, b in zip(splits[:-1], splits[1:])],
        [logps[a:b] for a, b in zip(splits[:-1], splits[1:])],
        [squares[a:b].numpy() for a, b in zip(splits[:-1], splits[1:])],
        seq_grads.detach(),
    )
