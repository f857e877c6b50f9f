"""The exceptions rmlab raises for bad input.

Every error says what was wrong, where (row, column or argument) and how to fix it, and is raised
before any model runs. All derive from :class:`RmlabError`; each also subclasses the built-in
exception a Python user would expect (``ValueError``, ``TypeError``, ``FileNotFoundError``), so
``except ValueError`` keeps working. Input that runs but is probably not what was meant (chosen
identical to rejected, a response truncated to nothing) gets a :class:`DataWarning` instead, with the
count and the rows. The catalogue of bad inputs and their messages is ``docs/errors.md``.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class RmlabError(Exception):
    """Base class of every error rmlab raises on purpose."""


class DataError(RmlabError, ValueError):
    """Preference data that cannot be used as given (missing columns, empty responses, ...)."""


class DataFileError(RmlabError, ValueError):
    """A data file that does not exist or does not parse."""


class DataFileNotFoundError(DataFileError, FileNotFoundError):
    """A data file path that does not exist (also a ``FileNotFoundError``)."""


class ModelError(RmlabError, TypeError):
    """A model of the wrong kind, or one that cannot be loaded as asked."""


class TokenizerError(RmlabError, ValueError):
    """A missing tokenizer, one without what the data need (chat template), or tokenizers that disagree."""


class ArgumentError(RmlabError, ValueError):
    """An argument outside its valid range (beta <= 0, an unknown option name, ...)."""


class RmlabWarning(UserWarning):
    """Base class of every warning rmlab emits on purpose: input that can be used, but likely not as meant."""


class DataWarning(RmlabWarning):
    """Preference data that run but carry no signal as given (chosen identical to rejected, a response
    truncated to nothing). Turn it into an error with ``warnings.simplefilter("error", DataWarning)``."""


def closest(name: str, candidates: Iterable[str]) -> str:
    """Return ``" Did you mean 'x'?"`` for the closest candidate to ``name``, or ``""``."""
    match = difflib.get_close_matches(str(name), [str(c) for c in candidates], n=1, cutoff=0.6)
    return f" Did you mean {match[0]!r}?" if match else ""


def check_choice(argument: str, value, choices: Iterable) -> None:
    """Raise :class:`ArgumentError` unless ``value`` is one of ``choices``."""
    choices = list(choices)
    if value not in choices:
        raise ArgumentError(
            f"{argument}={value!r} is not supported; choose one of {choices}.{closest(value, choices)}"
        )
