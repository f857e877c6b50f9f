"""Per-example gradients of response log-probs: one gradient per sequence of a batch, by vmap or a loop.

The gradient analyses of rmlab (gradient entanglement, Yuan et al. 2024; gradient similarity in the
style of TRAK, Park et al. 2023, and LESS, Xia et al. 2024) need, for every response ``y`` of a
preference pair, the gradient ``g = grad_theta lp(y)`` of its *summed* response log-prob
``lp(y) = sum_t log pi(y_t | x, y_<t)`` with respect to a chosen set of parameters ``theta``
(:mod:`rmlab.engine.param_selection`). This module computes them:

- :class:`SequenceGradients` returns the per-sequence gradients of a batch (:class:`Gradients`, kept
  parameter by parameter; flattened only on request). Its fast path is ``torch.func``: ``vmap(grad(functional_call(...)))`` over the sequences of
  a batch, with the same fused selective log-softmax as :func:`rmlab.engine.logprobs.token_logprobs`.
  Its first use on a model is checked against a loop of backward passes through
  :func:`~rmlab.engine.logprobs.logprobs_with_grad`; a model that vmap cannot run (data-dependent
  control flow, ``.item()``) or that disagrees falls back to that loop, with one warning per model.
- :func:`gradient_batches` plans the batches under the engine's token budget and a gradient memory
  budget.

Random projections live in :mod:`rmlab.engine.projection`, per-token products in
:mod:`rmlab.engine.token_grads`; the parameter selection and model state are re-exported here.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Sequence

import numpy as np
import torch
from torch.func import functional_call, grad, vmap

from rmlab.engine.batching import batch_budget, length_batches, pad_right
from rmlab.engine.logprobs import Scored, lm_head_for, logprobs_with_grad
from rmlab.engine.param_selection import (
    ModelState,
    ParamSelection,
    add_to_parameters,
    check_flat_budget,
    restore_parameters,
    save_parameters,
    select_parameters,
    transformer_blocks,
)
from rmlab.engine.precision import autocast
from rmlab.engine.projection import PROJECTION_CACHE_BYTES, RandomProjection
from rmlab.errors import ArgumentError, ModelError

#: Bytes of per-example gradients (and their flattened copy) one batch may hold.
GRAD_BYTES = {"cpu": 1 << 29, "cuda": 1 << 32}

_METHODS = ("auto", "vmap", "loop")


# --------------------------------------------------------------------------------------------------
# per-sequence gradients
# --------------------------------------------------------------------------------------------------
class _Scorer(torch.nn.Module):
    """Summed log-prob of one (padded) sequence's scored tokens: the function vmap differentiates."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids, rows, labels, weight, mask):
        head = lm_head_for(self.model)
        if head.fused:
            hidden = head.hidden_states(ids[None], mask)[0]
            logits = head.logits(hidden.index_select(0, rows))
        else:
            logits = self.model(input_ids=ids[None], attention_mask=mask, use_cache=False).logits[0].index_select(0, rows)
        logp = torch.log_softmax(logits.float(), dim=-1).gather(1, labels[:, None])[:, 0]
        return (logp * weight).sum()


#: Per model: "vmap" once vmap was checked against the loop, "loop" once it failed.
_VMAP_STATE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

#: What torch.func raises for a model it cannot transform (data-dependent control flow, .item(),
#: an op without a batching rule or a functional form).
VMAP_ERRORS = (RuntimeError, NotImplementedError, TypeError, ValueError)


class Gradients:
    """Per-sequence gradients of one batch, kept parameter by parameter (never flattened unless asked).

    ``per_param[p]`` holds, for parameter ``p`` of the selection, either an ``(n, numel_p)`` tensor or
    a list of ``n`` 1-D tensors (row ``i`` is sequence ``i``'s gradient); ``logps`` the ``(n,)`` float64
    summed log-probs (NaN for a sequence with no scored token, whose gradient is 0).
    """

    def __init__(self, per_param: list, logps: torch.Tensor):
        self.per_param = per_param
        self.logps = logps
        self.n = len(logps)

    def matrix(self, p: int) -> torch.Tensor:
        """``(n, numel_p)`` float32 gradients of parameter ``p``."""
        value = self.per_param[p]
        return (torch.stack(value) if isinstance(value, list) else value).float()

    def row(self, i: int) -> list[torch.Tensor]:
        """Sequence ``i``'s gradient, one 1-D tensor per parameter."""
        return [value[i] for value in self.per_param]

    def flat(self) -> torch.Tensor:
        """``(n, D)`` float32: rows are flattened gradients, parameters in selection order."""
        return torch.cat([self.matrix(p) for p in range(len(self.per_param))], dim=1)

    def pair_gram(self) -> np.ndarray:
        """``(n // 2, 3)`` float64 ``|g_0|^2, |g_1|^2, <g_0, g_1>`` of rows ``(2j, 2j + 1)``.

        Dot products run per parameter in float32 (torch's blocked sums) and add up in float64.
        """
        out = torch.zeros(self.n // 2, 3, dtype=torch.float64)
        for value in self.per_param:
            if isinstance(value, list):
                for j in range(self.n // 2):
                    a, b = value[2 * j].float(), value[2 * j + 1].float()
                    out[j, 0] += float(torch.dot(a, a))
                    out[j, 1] += float(torch.dot(b, b))
                    out[j, 2] += float(torch.dot(a, b))
            else:
                a, b = value[0::2].float(), value[1::2].float()
                out[:, 0] += torch.linalg.vecdot(a, a).double().cpu()
                out[:, 1] += torch.linalg.vecdot(b, b).double().cpu()
                out[:, 2] += torch.linalg.vecdot(a, b).double().cpu()
        return out.numpy()


class SequenceGradients:
    """Per-sequence gradients ``grad_theta sum_t log pi(y_t | .)`` of a causal LM, batch by batch.

    The gradients of summed response log-probs that gradient entanglement is about (Yuan et al.
    2024; their code takes them over LoRA parameters with one backward pass per response, which is
    the ``"loop"`` method here). Per-example gradients by ``torch.func`` follow the PyTorch recipe
    (``vmap(grad(functional_call))``), as used by Opacus-style DP-SGD and TRAK.

    Args:
        model: a causal LM; call inside :meth:`ModelState.analysing` (eval mode, ``requires_grad``
            only on the selected parameters).
        selection: the parameters (:func:`select_parameters`).
        pad_id: padding id (padding is on the right and never scored).
        method: ``"auto"`` (vmap, checked once per model against the loop; the loop where vmap
            fails), ``"vmap"`` or ``"loop"`` (one backward pass per sequence).
        autocast_dtype: autocast dtype on CUDA (as the engine's log-probs), or None.

    Calling it on a list of sequences returns their :class:`Gradients`.
    """

    def __init__(self, model, selection: ParamSelection, *, pad_id: int, method: str = "auto",
                 autocast_dtype: torch.dtype | None = None):
        if method not in _METHODS:
            raise ArgumentError(f"method={method!r} is not supported; choose one of {list(_METHODS)}.")
        self.model, self.selection, self.pad_id = model, selection, pad_id
        self.device = next(model.parameters()).device
        self.autocast_dtype = autocast_dtype
        self.requested = method
        self.used: set[str] = set()
        self.scorer = _Scorer(model)

    # -- the two ways -------------------------------------------------------------------------------
    def loop(self, sequences: Sequence[Scored]) -> Gradients:
        """One forward and one backward pass per sequence (through ``logprobs_with_grad``)."""
        params = self.selection.params
        per_param: list[list[torch.Tensor]] = [[] for _ in params]
        logps = torch.full((len(sequences),), float("nan"), dtype=torch.float64)
        for i, seq in enumerate(sequences):
            grads: Sequence[torch.Tensor | None] = [None] * len(params)
            if len(seq.ids) - seq.start >= 1:
                with autocast(self.device, self.autocast_dtype):
                    lp = logprobs_with_grad(self.model, [seq], pad_id=self.pad_id)[0]
                grads = torch.autograd.grad(lp.float().sum(), params, allow_unused=True)
                logps[i] = float(lp.detach().double().sum())
            for rows, p, g in zip(per_param, params, grads):
                rows.append(torch.zeros(p.numel(), device=self.device) if g is None else g.reshape(-1))
        return Gradients(per_param, logps)

    def vmap(self, sequences: Sequence[Scored]) -> Gradients:
        """``vmap(grad(...))`` over the sequences: one batched forward and backward pass."""
        n = len(sequences)
        counts = [len(s.ids) - s.start for s in sequences]
        width = max(1, max(counts))
        ids, _ = pad_right([s.ids for s in sequences], self.pad_id)
        rows = torch.zeros(n, width, dtype=torch.long)
        labels = torch.zeros(n, width, dtype=torch.long)
        weight = torch.zeros(n, width, dtype=torch.float32)
        for r, (seq, m) in enumerate(zip(sequences, counts)):
            if m > 0:
                rows[r, :m] = torch.arange(seq.start - 1, len(seq.ids) - 1)
                labels[r, :m] = ids[r, seq.start : len(seq.ids)]
                weight[r, :m] = 1.0
        ids, rows, labels, weight = (t.to(self.device) for t in (ids, rows, labels, weight))
        # right padding + causal attention: real tokens never see padding, so one all-ones mask
        # (not batched, hence no data-dependent mask logic under vmap) is exact for scored positions
        mask = torch.ones((1, ids.shape[1]), dtype=torch.long, device=self.device)
        scorer = self.scorer
        keys = ["model." + name for name in self.selection.names]

        def summed(primals, ids_1, rows_1, labels_1, weight_1):
            value = functional_call(scorer, dict(zip(keys, primals)), (ids_1, rows_1, labels_1, weight_1, mask))
            return value, value

        primals = tuple(p.detach() for p in self.selection.params)
        with warnings.catch_warnings(), autocast(self.device, self.autocast_dtype):
            warnings.filterwarnings("ignore", message=".*performance drop.*batching rule.*")
            grads, values = vmap(grad(summed, has_aux=True), in_dims=(None, 0, 0, 0, 0))(
                primals, ids, rows, labels, weight
            )
        logps = values.detach().double().cpu()
        logps[torch.as_tensor([m == 0 for m in counts])] = float("nan")  # their gradient is exactly 0
        return Gradients([g.reshape(n, -1) for g in grads], logps)

    # -- dispatch -----------------------------------------------------------------------------------
    def __call__(self, sequences: Sequence[Scored]) -> Gradients:
        state = _VMAP_STATE.get(self.model)
        if self.requested == "loop" or (self.requested == "auto" and state == "loop"):
            self.used.add("loop")
            return self.loop(sequences)
        if state == "vmap":
            self.used.add("vmap")
            return self.vmap(sequences)
        return self._first_vmap(sequences)

    def _fall_back(self, sequences, message: str, err: Exception | None = None) -> Gradients:
        name = type(self.model).__name__
        if self.requested == "vmap":
            raise ModelError(f"{name}: {message}. Use method='loop' (or 'auto' to fall back).") from err
        warnings.warn(
            f"{name}: {message}; per-example gradients fall back to one backward pass per sequence "
            "(exact, slower).",
            stacklevel=5,
        )
        _VMAP_STATE[self.model] = "loop"
        self.used.add("loop")
        return self.loop(sequences)

    def _first_vmap(self, sequences: Sequence[Scored]) -> Gradients:
        """Run vmap on a model for the first time and check it against the loop on one sequence."""
        scored = [i for i, s in enumerate(sequences) if len(s.ids) - s.start > 0]
        check = min(scored, key=lambda i: len(sequences[i].ids)) if scored else None
        # the loop first: it also runs the engine's once-per-model check of the fused LM head
        expected = self.loop([sequences[check]]).row(0) if check is not None else None
        try:
            result = self.vmap(sequences)
        except torch.OutOfMemoryError:
            raise
        except VMAP_ERRORS as err:
            first = (str(err).splitlines() or [""])[0][:200]
            return self._fall_back(sequences, f"torch.func.vmap cannot run this model ({type(err).__name__}: {first})", err)
        if expected is not None:
            got = result.row(check)
            diff = math.sqrt(sum(float((a.float() - b.float()).pow(2).sum()) for a, b in zip(got, expected)))
            scale = math.sqrt(sum(float(b.float().pow(2).sum()) for b in expected)) + 1e-12
            exact = next(self.model.parameters()).dtype == torch.float32 and self.autocast_dtype is None
            if not diff / scale <= (1e-3 if exact else 5e-2):
                return self._fall_back(
                    sequences, f"per-example gradients from torch.func.vmap differ from backward passes by "
                    f"{diff / scale:.2e} (relative)",
                )
            _VMAP_STATE[self.model] = "vmap"
        self.used.add("vmap")
        return result

    @property
    def method_used(self) -> str:
        return "+".join(sorted(self.used)) or "none"


def gradient_batches(
    sequences: Sequence[Scored],
    groups: Sequence[Sequence[int]],
    selection: ParamSelection,
    *,
    vocab_size: int,
    device: torch.device,
    batch_tokens: int | None = None,
    grad_bytes: int | None = None,
) -> list[list[int]]:
    """Batches of groups (e.g. the two sequences of a pair) for :class:`SequenceGradients`.

    Length-bucketed under ``batch_tokens`` padded tokens (the engine's default), and small enough that
    the per-example gradients (twice: per parameter and flattened) and the scored rows' float32
    logits stay under ``grad_bytes``.
    """
    budget = batch_budget(batch_tokens, device)
    limit = grad_bytes or GRAD_BYTES.get(device.type, 1 << 30)
    width = max(len(g) for g in groups) if groups else 1
    lengths = [max(len(sequences[k].ids) for k in g) for g in groups]
    scored = max((len(s.ids) - s.start for s in sequences), default=1)
    per_group = width * (2 * selection.numel * 4 + 3 * scored * vocab_size * 4)
    return length_batches(lengths, budget, width=width, max_items=max(1, limit // max(1, per_group)))


__all__ = [
    "GRAD_BYTES",
    "PROJECTION_CACHE_BYTES",
    "VMAP_ERRORS",
    "Gradients",
    "ModelState",
    "ParamSelection",
    "RandomProjection",
    "SequenceGradients",
    "add_to_parameters",
    "check_flat_budget",
    "gradient_batches",
    "restore_parameters",
    "save_parameters",
    "select_parameters",
    "transformer_blocks",
]
