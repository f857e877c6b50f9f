"""The forward-runner seam: the one object that runs batches of sequences through a model.

Every analysis asks a runner for what it needs: per-token log-probs of sequences, reward scores
of sequences, prefix scores at every position, or decoded completions. It never runs a forward
pass itself, so the runner chosen by ``Options.runner`` decides where the work happens. Today
:class:`LocalRunner` runs it in this process with torch (length-bucketed batches, prompts run
once, the checks of :mod:`rmlab.engine.logprobs` and :mod:`rmlab.engine.kv_cache`); a
data-parallel or vLLM runner implements the same methods and plugs in through
:func:`register_runner` without touching any analysis.

A runner's results must equal :class:`LocalRunner`'s to floating-point tolerance: the local
runner is the reference every other one is tested against.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from rmlab import options
from rmlab.engine import decoding, logprobs, prefix_scores, reward_model
from rmlab.errors import ArgumentError, closest


class LocalRunner:
    """Runs every batch in this process, on the model's own device, with torch."""

    name = "local"

    def logprobs(
        self,
        model,
        sequences: Sequence[logprobs.Scored],
        *,
        groups: Sequence[Sequence[int]] | None = None,
        pad_id: int = 0,
        batch_tokens: int | None = None,
        autocast_dtype=None,
        progress: bool = True,
        desc: str = "log-probs",
    ) -> list[np.ndarray]:
        """Per-token log-probs of the scored tokens of every sequence
        (:func:`rmlab.engine.logprobs.token_logprobs`)."""
        return logprobs.token_logprobs(
            model, sequences, groups=groups, pad_id=pad_id, batch_tokens=batch_tokens,
            autocast_dtype=autocast_dtype, progress=progress, desc=desc,
        )

    def scores(
        self, model, sequences: Sequence[Sequence[int]], *, pad_id: int, label: int = 0,
        batch_tokens: int | None = None, autocast_dtype=None, progress: bool = True, desc: str = "reward scores",
    ) -> np.ndarray:
        """One reward score per id list (:func:`rmlab.engine.reward_model.score_sequences`)."""
        return reward_model.score_sequences(
            model, sequences, pad_id=pad_id, label=label, batch_tokens=batch_tokens,
            autocast_dtype=autocast_dtype, progress=progress, desc=desc,
        )

    def position_scores(
        self, model, sequences: Sequence[Sequence[int]], *, pad_id: int, label: int = 0,
        batch_tokens: int | None = None, autocast_dtype=None, progress: bool = True, desc: str = "dense rewards",
    ) -> list[np.ndarray]:
        """The score of the prefix ending at every position (:func:`rmlab.engine.prefix_scores.position_scores`)."""
        return prefix_scores.position_scores(
            model, sequences, pad_id=pad_id, label=label, batch_tokens=batch_tokens,
            autocast_dtype=autocast_dtype, progress=progress, desc=desc,
        )

    def shared_prompt_scores(
        self, model, groups, *, pad_id: int, label: int = 0, batch_tokens: int | None = None,
        autocast_dtype=None, progress: bool = True, desc: str = "dense rewards",
    ) -> list[list[np.ndarray]]:
        """Prefix scores of responses that share a prompt, the prompt run once
        (:func:`rmlab.engine.prefix_scores.shared_prompt_scores`)."""
        return prefix_scores.shared_prompt_scores(
            model, groups, pad_id=pad_id, label=label, batch_tokens=batch_tokens,
            autocast_dtype=autocast_dtype, progress=progress, desc=desc,
        )

    def decode(self, model, prompt_ids, uniforms, **settings):
        """Sample one completion per prompt row (:func:`rmlab.engine.decoding.decode_batch`)."""
        return decoding.decode_batch(model, prompt_ids, uniforms, **settings)


_RUNNERS: dict[str, Callable[[], object]] = {"local": LocalRunner}


def register_runner(name: str, factory: Callable[[], object]) -> None:
    """Make ``Options(runner=name)`` run batches through ``factory()`` (an object with the methods
    of :class:`LocalRunner`)."""
    _RUNNERS[name] = factory
    if name not in options.RUNNERS:
        options.RUNNERS = (*options.RUNNERS, name)


def runner_for(name: str = "local"):
    """The runner named ``name`` (``Options.runner``)."""
    if name not in _RUNNERS:
        raise ArgumentError(f"runner={name!r} is not available; choose one of {sorted(_RUNNERS)}.{closest(name, _RUNNERS)}")
    return _RUNNERS[name]()
