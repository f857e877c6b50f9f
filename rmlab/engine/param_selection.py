"""Which parameters gradients are taken with respect to, and the model state around a gradient run.

The gradient analyses of rmlab (gradient entanglement, Yuan et al. 2024; gradient similarity in the
style of TRAK, Park et al. 2023, and LESS, Xia et al. 2024) take gradients with respect to a chosen
set of parameters ``theta``:

- :func:`select_parameters` picks ``theta``: every parameter that requires grad (for a peft / LoRA
  model exactly the adapters), regular expressions over parameter names, a predicate, or the last
  ``k`` transformer blocks (``"last:k"``). Tied tensors (GPT-2's ``lm_head`` and ``wte``) count once.
- :class:`ModelState` records a model's training flags and ``requires_grad`` flags and restores them.
- :func:`save_parameters`, :func:`add_to_parameters`, :func:`restore_parameters`: take a step on the
  selected parameters and put them back bit for bit.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from rmlab.errors import ArgumentError


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
