"""Old names and keywords that keep working for one release, with a DeprecationWarning naming the new one.

The warning points at the caller's line (not at rmlab), so Python shows it where the old name is used.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable, Mapping


def warn_deprecated(message: str, *, stacklevel: int = 2) -> None:
    """Issue a ``DeprecationWarning``; ``stacklevel`` counts from the caller of this function.

    ``stacklevel=2`` (the default) attributes the warning to whoever called the function that calls
    :func:`warn_deprecated`, which is where the deprecated name is written.
    """
    warnings.warn(message, DeprecationWarning, stacklevel=stacklevel + 1)


def rename_keywords(name: str, fn: Callable, args: tuple, kwargs: dict, renamed: Mapping[str, str], *,
                    stacklevel: int = 3) -> dict:
    """``kwargs`` with each old keyword in ``renamed`` (``{old: new}``) moved to its new name.

    Each old keyword used gives a DeprecationWarning (``stacklevel`` counted from the caller of this
    function). Passing a value under both names, or positionally and under the old name, is a
    ``TypeError``, as Python reports a parameter given twice.
    """
    if not renamed or not set(renamed) & set(kwargs):
        return kwargs
    params = list(inspect.signature(fn).parameters)
    kwargs = dict(kwargs)
    for old, new in renamed.items():
        if old not in kwargs:
            continue
        positional = new in params and params.index(new) < len(args)
        if new in kwargs or positional:
            raise TypeError(f"{name}() got {new!r} twice: pass it once, as {new}= (the old name {old}= is deprecated).")
        warn_deprecated(
            f"{name}({old}=...) is deprecated: the argument is now called {new!r} (pass it first, positionally, "
            f"or as {new}=...); {old}= goes in the next release.",
            stacklevel=stacklevel,
        )
        kwargs[new] = kwargs.pop(old)
    return kwargs


def renamed_arguments(name: str, renamed: Mapping[str, str]) -> Callable:
    """Decorator: ``fn(old=value)`` still works for each ``{old: new}`` and means ``fn(new=value)``.

    ``name`` is the public name the warning shows (e.g. ``"rmlab.plots.length_bias"``). The decorated
    function keeps its signature, docstring and name; the old keyword gives a DeprecationWarning.
    """

    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            return fn(*args, **rename_keywords(name, fn, args, kwargs, renamed))

        return wrapper

    return decorate


def deprecated_alias(fn: Callable, old: str, new: str, *, renamed: Mapping[str, str] | None = None) -> Callable:
    """``fn`` under its old public name ``old``: it works as ``new`` and warns on every call.

    ``renamed`` (``{old keyword: new keyword}``) also accepts the old keywords of the old name. The
    alias's docstring says it is deprecated, then repeats ``fn``'s (which names its paper).
    """
    renamed = dict(renamed or {})

    @functools.wraps(fn)
    def alias(*args, **kwargs):
        warn_deprecated(f"{old} is deprecated: use {new} (same arguments); {old} goes in the next release.")
        return fn(*args, **rename_keywords(old, fn, args, kwargs, renamed))

    alias.__name__ = alias.__qualname__ = old.rsplit(".", 1)[-1]
    alias.__doc__ = f"Deprecated alias of :func:`{new}` (warns on every call; removed in the next release).\n\n" + (
        fn.__doc__ or ""
    )
    return alias
