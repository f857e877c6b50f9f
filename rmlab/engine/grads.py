"""Per-example gradients of response log-probs: parameter subsets, vmap, projections, per-token VJPs.

The gradient analyses of rmlab (gradient entanglement, Yuan et al. 2024; gradient similarity in the
style of TRAK, Park et al. 2023, and LESS, Xia et al. 2024) need, for every response ``y`` of a
preference pair, the gradient ``g = grad_theta lp(y)`` of its *summed* response log-prob
``lp(y) = sum_t log pi(y_t | x, y_<t)`` with respect to a chosen set of parameters ``theta``. This
module computes them:

- :func:`select_parameters` picks ``theta``: every parameter that requires grad (for a peft / LoRA
  model exactly the adapters), regular expressions over parameter names, a predicate, or the last
  ``k`` transformer blocks (``"last:k"``). Tied tensors (GPT-2's ``lm_head`` and ``wte``) count once.
- :class:`SequenceGradients` returns the per-sequence gradients of a batch (:class:`Gradients`, kept
  parameter by parameter; flattened only on request). Its fast path is ``torch.func``: ``vmap(grad(functional_call(...)))`` over the sequences of
  a batch, with the same fused selective log-softmax as :func:`rmlab.engine.logprobs.token_logprobs`.
  Its first use on a model is checked against a loop of backward passes through
  :func:`~rmlab.engine.logprobs.logprobs_with_grad`; a model that vmap cannot run (data-dependent
  control flow, ``.item()``) or that disagrees falls back to that loop, with one warning per model.
- :class:`RandomProjection` maps gradients to ``k`` dimensions with a seeded Rademacher (or Gaussian)
  matrix scaled by ``1/sqrt(k)``, generated block by block so the ``D x k`` matrix is never held whole
  (unless it is small enough to cache).
- :func:`token_gradient_products` gives, for every response token ``t``, the inner products of
  ``grad log pi(y_t | .)`` with given vectors (a batched vector-Jacobian product over tokens).
- :class:`ModelState` records a model's training flags and ``requires_grad`` flags and restores them.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import re
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.func import functional_call, grad, vmap

from rmlab.engine.batching import batch_budget, length_batches, pad_right
from rmlab.engine.logprobs import Scored, lm_head_for, logprobs_with_grad
from rmlab.engine.precision import autocast
from rmlab.errors import ArgumentError, ModelError

#: Bytes of per-example gradients (and their flattened copy) one batch may hold.
GRAD_BYTES = {"cpu": 1 << 29, "cuda": 1 << 32}
#: Bytes of projection matrix kept in memory between batches (regenerated block by block beyond).
PROJECTION_CACHE_BYTES = {"cpu": 1 << 28, "cuda": 1 << 30}
#: Entries of one generated block of a projection matrix.
_PROJECTION_BLOCK = 1 << 22

_METHODS = ("auto", "vmap", "loop")


# --------------------------------------------------------------------------------------------------
# parameter selection
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ParamSelection:
    """The parameters gradients are taken with respect to, each distinct tensor once.

    ``names[i]`` is the name ``model.named_parameters()`` gives ``params[i]`` (the first name of a
    tied tensor); ``aliases[names[i]]`` lists its other names (e.g. ``lm_head.weight`` for GPT-2's
    ``transformer.wte.weight``). Flattened gradients concatenate the parameters in this order.
    """

    names: tuple[str, ...]
    params: tuple[torch.nn.Parameter, ...]
    aliases: dict = field(default_factory=dict)

    @property
    def numel(self) -> int:
        return int(sum(p.numel() for p in self.params))

    @property
    def sizes(self) -> list[int]:
        return [p.numel() for p in self.params]

    def describe(self) -> str:
        shown = ", ".join(self.names[:4]) + (", ..." if len(self.names) > 4 else "")
        return f"{len(self.names)} tensors, {self.numel:,} parameters ({shown})"


def _named_groups(model) -> list[tuple[list[str], torch.nn.Parameter]]:
    """Every distinct parameter tensor with all its names, in ``named_parameters()`` order."""
    groups: dict[int, tuple[list[str], torch.nn.Parameter]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in groups:
            groups[id(p)][0].append(name)
        else:
            groups[id(p)] = ([name], p)
    return list(groups.values())


def _sample_names(groups, n: int = 6) -> str:
    names = [g[0][0] for g in groups]
    if len(names) <= 2 * n:
        return ", ".join(names)
    return ", ".join(names[:n]) + ", ..., " + ", ".join(names[-n:])


def transformer_blocks(model) -> tuple[str, int] | None:
    """``(prefix, count)`` of the model's stack of transformer blocks (``prefix.0``, ``prefix.1``...).

    The stack is the ``ModuleList`` whose children share one class and that holds the most
    parameters (``transformer.h`` in GPT-2, ``model.layers`` in Llama); None if there is none.
    """
    best, best_size = None, 0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        size = sum(p.numel() for p in module.parameters())
        if size > best_size:
            best, best_size = (name, len(module)), size
    return best


def _last_blocks(model, text: str, groups) -> Callable[[str], bool]:
    k = int(text.split(":", 1)[1])
    found = transformer_blocks(model)
    if found is None:
        raise ArgumentError(
            f"params={text!r}: no stack of transformer blocks (a ModuleList of identical layers) was "
            f"found in this {type(model).__name__}. Choose parameters by regular expression instead; "
            f"its parameters are: {_sample_names(groups)}."
        )
    prefix, count = found
    if not 1 <= k <= count:
        raise ArgumentError(f"params={text!r}: k must be between 1 and {count} (the model has {count} blocks under {prefix!r}).")
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")

    def chosen(name: str) -> bool:
        m = pattern.match(name)
        return bool(m) and int(m.group(1)) >= count - k

    return chosen


def select_parameters(model, params=None) -> ParamSelection:
    """Choose the parameters that gradients are taken with respect to.

    Args:
        model: a ``torch.nn.Module``.
        params: None: every parameter that requires grad (for a peft / LoRA model these are
            exactly the adapter weights, as in Yuan et al. 2024's official code). A string: a regular
            expression searched in each parameter name (``re.search``), e.g.
            ``r"transformer\\.h\\.2\\.|lm_head"``, or ``"last:k"``: every parameter of the last ``k``
            transformer blocks (:func:`transformer_blocks`). A list of strings: their union. A callable
            ``(name, param) -> bool``.

    A tied tensor is selected once when any of its names matches (GPT-2's ``lm_head.weight`` is
    ``transformer.wte.weight``; its gradient sums both uses). An explicit filter may select
    parameters that do not require grad; gradients are taken with respect to them all the same.

    Raises:
        ArgumentError: a filter of the wrong type, an invalid regular expression, or one that matches
            no parameter (the message lists parameter names).
    """
    groups = _named_groups(model)
    if not groups:
        raise ArgumentError(f"The {type(model).__name__} has no parameters to take gradients with respect to.")
    if params is None:
        picked = [(names, p) for names, p in groups if p.requires_grad]
        if not picked:
            raise ArgumentError(
                "params=None selects the parameters that require grad, and none of this model's do. "
                "Pass params= (a regular expression such as 'lm_head', a list of them, 'last:2' or a "
                f"callable) to choose some; its parameters are: {_sample_names(groups)}."
            )
    else:
        if isinstance(params, str):
            params_list = [params]
        elif isinstance(params, (list, tuple)) and params and all(isinstance(s, str) for s in params):
            params_list = list(params)
        elif callable(params):
            params_list = None
        else:
            raise ArgumentError(
                f"params={params!r} must be None, a regular expression, a list of them, 'last:k' or a "
                "callable (name, param) -> bool."
            )
        if params_list is None:
            tests = [lambda name, p: bool(params(name, p))]
        else:
            tests = []
            for text in params_list:
                if re.fullmatch(r"last:\d+", text.strip()):
                    rule = _last_blocks(model, text.strip(), groups)
                    tests.append(lambda name, p, rule=rule: rule(name))
                    continue
                try:
                    regex = re.compile(text)
                except re.error as err:
                    raise ArgumentError(f"params={text!r} is not a valid regular expression ({err}).") from None
                tests.append(lambda name, p, regex=regex: regex.search(name) is not None)
        picked = [(names, p) for names, p in groups if any(t(n, p) for n in names for t in tests)]
        if not picked:
            raise ArgumentError(
                f"params={params!r} matches no parameter of this {type(model).__name__}. Its parameters "
                f"are: {_sample_names(groups)}."
            )
    return ParamSelection(
        names=tuple(names[0] for names, _ in picked),
        params=tuple(p for _, p in picked),
        aliases={names[0]: tuple(names[1:]) for names, _ in picked if len(names) > 1},
    )


# --------------------------------------------------------------------------------------------------
# model state
# --------------------------------------------------------------------------------------------------
class ModelState:
    """Training flags of every submodule and ``requires_grad`` of every parameter, to restore later.

    ``ModelState(model)`` records; :meth:`restore` puts the recorded flags back (weights untouched).
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.modes = [(m, m.training) for m in model.modules()]
        self.flags = [(p, p.requires_grad) for p in model.parameters()]

    def restore(self) -> None:
        for module, mode in self.modes:
            module.training = mode
        for p, flag in self.flags:
            if p.requires_grad != flag:
                p.requires_grad_(flag)

    @contextlib.contextmanager
    def analysing(self, selection: ParamSelection | None = None):
        """Eval mode (dropout off) and ``requires_grad`` only on ``selection``; restored on exit."""
        chosen = {id(p) for p in selection.params} if selection is not None else set()
        try:
            self.model.eval()
            for p in self.model.parameters():
                p.requires_grad_(id(p) in chosen)
            yield
        finally:
            self.restore()


def check_flat_budget(rows: int, selection: ParamSelection, what: str, hint: str, limit: int) -> None:
    """Raise :class:`ArgumentError` if ``rows`` float32 gradients of ``selection`` exceed ``limit`` bytes."""
    need = rows * selection.numel * 4
    if need > limit:
        raise ArgumentError(
            f"{what} would hold {rows} gradients of {selection.numel:,} parameters ({need / 2**30:.1f} GiB, "
            f"limit {limit / 2**30:.1f} GiB). {hint}"
        )


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
_VMAP_ERRORS = (RuntimeError, NotImplementedError, TypeError, ValueError)


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
        except _VMAP_ERRORS as err:
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


# --------------------------------------------------------------------------------------------------
# random projections
# --------------------------------------------------------------------------------------------------
class RandomProjection:
    """``x -> x @ P``: a seeded random ``D x k`` matrix, never held whole unless it is small.

    The gradient projection of TRAK (Park et al. 2023) and LESS (Xia et al. 2024), after the
    Johnson-Lindenstrauss lemma (Achlioptas 2003 for the +-1 entries).

    ``P`` has entries ``+-1/sqrt(k)`` (``kind="rademacher"``, as TRAK and LESS) or ``N(0, 1/k)``
    (``"gaussian"``), so ``E[<Pu, Pv>] = <u, v>`` and, with high probability,
    ``|<Pu, Pv> - <u, v>| <= eps |u| |v|`` for ``eps`` a few times ``sqrt(2/k)`` (Johnson-Lindenstrauss).
    ``sizes`` splits the ``D`` input coordinates into segments (one per parameter tensor); each
    segment's rows of ``P`` are generated in blocks of about 4M entries, each block from its own
    generator seeded by ``(seed, segment, block)``: the same seed gives the same matrix on a device
    type whatever the batch sizes. Blocks are cached when the whole matrix fits ``cache_bytes``;
    otherwise each call regenerates them (a projection then costs generating ``D x k`` random signs).
    """

    def __init__(self, sizes, dim_out: int, *, seed: int = 0, kind: str = "rademacher",
                 device="cpu", cache_bytes: int | None = None):
        if kind not in ("rademacher", "gaussian"):
            raise ArgumentError(f"projection kind={kind!r} is not supported; choose 'rademacher' or 'gaussian'.")
        self.sizes = [int(sizes)] if isinstance(sizes, numbers.Integral) else [int(v) for v in sizes]
        self.dim_in, self.dim_out, self.seed, self.kind = sum(self.sizes), int(dim_out), int(seed), kind
        self.device = torch.device(device)
        self.rows = max(1, _PROJECTION_BLOCK // self.dim_out)
        limit = cache_bytes if cache_bytes is not None else PROJECTION_CACHE_BYTES.get(self.device.type, 1 << 28)
        self.cache: dict | None = {} if self.dim_in * self.dim_out * 4 <= limit else None

    @property
    def blocks(self) -> int:
        return sum(math.ceil(size / self.rows) for size in self.sizes)

    def block(self, segment: int, b: int) -> torch.Tensor:
        """Rows ``[b * rows, (b + 1) * rows)`` of segment ``segment`` of ``sqrt(k) * P``."""
        key = (segment, b)
        if self.cache is not None and key in self.cache:
            return self.cache[key]
        n = min(self.rows, self.sizes[segment] - b * self.rows)
        gen = torch.Generator(device=self.device)
        gen.manual_seed(int(np.random.SeedSequence([self.seed, segment, b]).generate_state(1)[0]))
        if self.kind == "rademacher":
            signs = torch.randint(0, 2, (n, self.dim_out), generator=gen, device=self.device, dtype=torch.int8)
            out = signs.to(torch.float32).mul_(2.0).sub_(1.0)
        else:
            out = torch.randn(n, self.dim_out, generator=gen, device=self.device, dtype=torch.float32)
        if self.cache is not None:
            self.cache[key] = out
        return out

    def __call__(self, x) -> torch.Tensor:
        """Project ``(n, D)`` rows (a tensor, or :class:`Gradients`) to ``(n, k)`` float32."""
        if isinstance(x, Gradients):
            segments, n = [x.matrix(p) for p in range(len(self.sizes))], x.n
        else:
            if x.shape[-1] != self.dim_in:
                raise ValueError(f"expected rows of {self.dim_in} values, got {x.shape[-1]}")
            segments, n = list(torch.split(x, self.sizes, dim=1)), x.shape[0]
        out = torch.zeros(n, self.dim_out, dtype=torch.float32, device=self.device)
        for s, segment in enumerate(segments):
            segment = segment.to(self.device, torch.float32)
            for b in range(math.ceil(self.sizes[s] / self.rows)):
                lo = b * self.rows
                out.addmm_(segment[:, lo : lo + self.rows], self.block(s, b))
        return out.mul_(1.0 / math.sqrt(self.dim_out))


# --------------------------------------------------------------------------------------------------
# per-token products
# --------------------------------------------------------------------------------------------------
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
            except _VMAP_ERRORS as err:
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


def add_to_parameters(selection: ParamSelection, deltas: Sequence[torch.Tensor]) -> None:
    """``theta_p += deltas[p]`` for each selected parameter (in place, without autograd)."""
    with torch.no_grad():
        for p, delta in zip(selection.params, deltas):
            p.add_(delta.view_as(p).to(device=p.device, dtype=p.dtype))


def save_parameters(selection: ParamSelection) -> list[torch.Tensor]:
    """Detached copies of the selected parameters (to restore them bit for bit)."""
    return [p.detach().clone() for p in selection.params]


def restore_parameters(selection: ParamSelection, saved: Sequence[torch.Tensor]) -> None:
    """Copy saved values back into the selected parameters."""
    with torch.no_grad():
        for p, value in zip(selection.params, saved):
            p.copy_(value)
