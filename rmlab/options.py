"""One set of run options for every analysis: validated once, named once, passed as one object.

Every model-running function of rmlab takes the same settings (how to tokenise, how to batch,
where and in which precision to run, whether to cache, how to load a model given by name). They
live in :class:`Options`, a frozen dataclass checked when it is built. Public functions accept
them both ways, as flat keywords (``rmlab.implicit_rewards(..., max_length=512)``) or as one
object (``options=rmlab.Options(max_length=512)``; flat keywords override its fields), through
:func:`with_options`, which also lists the flat keywords in the function's signature so that
``help()`` and a notebook's tooltip show them.

An unknown keyword is refused with one error that names the closest accepted one.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from rmlab.errors import ArgumentError, check_choice, closest

#: Truncation modes of TRL's ``DPOConfig`` (``keep_start`` is its default).
TRUNCATION_MODES = ("keep_start", "keep_end")

#: Runners that execute forward passes (see :mod:`rmlab.engine.runner`).
RUNNERS = ("local",)


@dataclass(frozen=True)
class Options:
    """Settings shared by every analysis that runs a model.

    Attributes:
        tokenizer: the tokenizer (object, hub name or path); None loads the one saved with the
            (first) model.
        max_length: truncate prompt + response to this many tokens (None: no truncation).
        truncation_mode: ``"keep_start"`` (TRL's default) or ``"keep_end"``.
        add_eos: append EOS to plain-text responses, as TRL's ``DPOTrainer`` does (None, the
            reward models' default: append it unless the tokenizer closes texts itself).
        chat_template_kwargs: extra keywords for ``tokenizer.apply_chat_template``.
        batch_tokens: padded tokens per forward pass (None: a default for the device).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ... or a ``torch.device``.
        dtype: ``"auto"``, ``"float32"``, ``"bfloat16"``, ``"float16"`` or a ``torch.dtype``.
        progress: show progress bars.
        cache_dir: folder for resumable results (None: ``$RMLAB_CACHE_DIR`` if set; False: none).
        overwrite_cache: recompute and replace this call's cached results.
        trust_remote_code: run code from a model repository (off unless asked).
        revision: hub revision (branch, tag or commit) of models loaded by name.
        use_safetensors: refuse pickled ``.bin`` weights unless set to False.
        runner: what executes the forward passes (``"local"``: this process's torch).
    """

    tokenizer: object = None
    max_length: int | None = None
    truncation_mode: str = "keep_start"
    add_eos: bool | None = True
    chat_template_kwargs: Mapping | None = field(default=None, hash=False)
    batch_tokens: int | None = None
    device: object = "auto"
    dtype: object = "auto"
    progress: bool = True
    cache_dir: object = None
    overwrite_cache: bool = False
    trust_remote_code: bool = False
    revision: str | None = None
    use_safetensors: bool = True
    runner: str = "local"

    def __post_init__(self):
        for name in ("progress", "overwrite_cache", "trust_remote_code", "use_safetensors"):
            if not isinstance(getattr(self, name), bool):
                raise ArgumentError(f"{name}={getattr(self, name)!r} must be True or False.")
        if self.add_eos is not None and not isinstance(self.add_eos, bool):
            raise ArgumentError(
                f"add_eos={self.add_eos!r} must be True, False or None (reward models: append EOS unless "
                "the tokenizer closes texts itself)."
            )
        for name in ("max_length", "batch_tokens"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ArgumentError(f"{name}={value!r} must be a positive integer (or None).")
        check_choice("truncation_mode", self.truncation_mode, TRUNCATION_MODES)
        check_choice("runner", self.runner, RUNNERS)
        if self.chat_template_kwargs is not None and not isinstance(self.chat_template_kwargs, Mapping):
            raise ArgumentError(
                f"chat_template_kwargs={self.chat_template_kwargs!r} must be a dict of keywords for "
                "tokenizer.apply_chat_template (or None)."
            )
        if not (self.device == "auto" or isinstance(self.device, (str, torch.device))):
            raise ArgumentError(f"device={self.device!r} must be 'auto', a device name such as 'cuda:0', or a torch.device.")
        if not (isinstance(self.dtype, (str, torch.dtype))):
            raise ArgumentError(f"dtype={self.dtype!r} must be 'auto', a dtype name such as 'bfloat16', or a torch.dtype.")
        if self.revision is not None and not isinstance(self.revision, str):
            raise ArgumentError(f"revision={self.revision!r} must be a branch, tag or commit name (str) or None.")
        if self.cache_dir is not None and self.cache_dir is not False and (
            isinstance(self.cache_dir, bool) or not isinstance(self.cache_dir, (str, os.PathLike))
        ):
            raise ArgumentError(
                f"cache_dir={self.cache_dir!r} must be a folder path (str or Path), None (the "
                "RMLAB_CACHE_DIR folder if set, else no cache) or False (no cache)."
            )

    def replace(self, **changes) -> Options:
        """A copy with ``changes`` applied (and validated); unknown names are refused."""
        check_names(changes, "Options")
        return dataclasses.replace(self, **changes)

    @property
    def loading(self) -> dict:
        """The keywords of :func:`rmlab.io.models.load_causal_lm` / ``load_reward_model``."""
        return dict(
            device=self.device, dtype=self.dtype, trust_remote_code=self.trust_remote_code,
            use_safetensors=self.use_safetensors, revision=self.revision,
        )

    @property
    def tokenizing(self) -> dict:
        """The keywords of :func:`rmlab.io.tokenize.encode_pairs` / ``encode_responses``."""
        return dict(
            max_length=self.max_length, truncation_mode=self.truncation_mode, add_eos=self.add_eos,
            chat_template_kwargs=None if self.chat_template_kwargs is None else dict(self.chat_template_kwargs),
        )


#: Every option's name, in the order of :class:`Options`, and the groups functions take.
OPTION_NAMES = tuple(f.name for f in dataclasses.fields(Options))
LOADING = ("device", "dtype", "trust_remote_code", "revision", "use_safetensors")
TOKENIZING = ("tokenizer", "max_length", "truncation_mode", "add_eos", "chat_template_kwargs")
RUNNING = ("batch_tokens", "progress", "runner")
CACHING = ("cache_dir", "overwrite_cache")
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(Options)}


def check_names(given: Mapping, where: str, accepted=OPTION_NAMES) -> None:
    """Raise :class:`ArgumentError` for the first name of ``given`` not in ``accepted``."""
    for name in given:
        if name not in accepted:
            raise ArgumentError(
                f"{where}() got an unexpected keyword argument {name!r}.{closest(name, accepted)}"
            )


def resolve_options(options: Options | None = None, where: str = "Options", **flat) -> Options:
    """``options`` (or the defaults) with the flat keywords ``flat`` applied on top."""
    if options is not None and not isinstance(options, Options):
        raise ArgumentError(f"options={options!r} must be an rmlab.Options (or None).")
    check_names(flat, where)
    base = options if options is not None else Options()
    return dataclasses.replace(base, **flat) if flat else base


def with_options(*names: str, defaults: Mapping | None = None) -> Callable:
    """Let a function take the options ``names`` as flat keywords or as ``options=``.

    The decorated function declares a keyword-only ``options`` parameter and receives one
    validated :class:`Options` there; its own keywords pass through unchanged. ``defaults``
    overrides an option's default for this function only (e.g. ``progress=False``) when no
    ``options`` object is given (a given object is used as it is, flat keywords on top). The public
    signature lists the flat option keywords after the function's own, so ``help()`` shows them.
    """
    unknown = [n for n in names if n not in OPTION_NAMES]
    if unknown:
        raise ValueError(f"not options: {unknown}")
    own_defaults = dict(defaults or {})

    def wrap(fn):
        sig = inspect.signature(fn)
        params = list(sig.parameters.values())
        if "options" not in sig.parameters:
            raise TypeError(f"{fn.__name__} must take a keyword-only 'options' parameter")
        own = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - {"options"}
        takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in params)
        accepted = (*names, *sorted(own))

        @functools.wraps(fn)
        def inner(*args, options: Options | None = None, **kwargs):
            flat = {n: kwargs.pop(n) for n in names if n in kwargs}
            if not takes_kwargs:
                check_names({k: v for k, v in kwargs.items() if k not in own}, fn.__name__, accepted)
            base = resolve_options(options) if options is not None else Options(**own_defaults)
            resolved = dataclasses.replace(base, **flat)  # always a copy: the caller's object stays as it is
            # which fields the caller chose (all of an object it built, or what an outer rmlab call
            # recorded on the object it passes on): an object that carries its own options (a
            # ModelPair) keeps the rest
            prior = getattr(options, "given", OPTION_NAMES) if options is not None else ()
            object.__setattr__(resolved, "given", tuple(dict.fromkeys((*prior, *flat))))
            return fn(*args, options=resolved, **kwargs)

        extra = [
            inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=own_defaults.get(n, _DEFAULTS[n]))
            for n in names
            if n not in sig.parameters
        ]
        before_var = [
            p.replace(default=None, annotation="Options | None") if p.name == "options" else p
            for p in params
            if p.kind is not p.VAR_KEYWORD
        ]
        var = [p for p in params if p.kind is p.VAR_KEYWORD]
        inner.__signature__ = sig.replace(parameters=[*before_var, *extra, *var])
        inner.option_names = names
        return inner

    return wrap
