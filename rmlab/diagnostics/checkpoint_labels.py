"""Policy checkpoints and their labels: which models a checkpoint curve samples, named how.

A checkpoint curve (Rafailov et al. 2024, "Scaling Laws for Reward Model Overoptimization in Direct
Alignment Algorithms": DPO checkpoints across beta and training steps) takes its policies as a
dict ``{label: model or path}``, a nested ``{beta: {step: model or path}}`` (a toy world's
``.checkpoints``) or a list. Labels that are tuples or numbers fill the label columns in order;
string labels and paths are searched for ``<name><number>`` (``"dpo_beta0.1/step_50"``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from rmlab.errors import ArgumentError, DataError, ModelError, TokenizerError
from rmlab.io.models import check_same_tokenizer, check_vocab_covers, is_causal_lm, load_tokenizer


_NUMBER = r"(-?\d+(?:\.\d+)?(?:[eE]-?\d+)?)"


def _number(text: str):
    value = float(text)
    return int(value) if value.is_integer() and re.fullmatch(r"-?\d+", text) else value


def _parse_label(label, label_names: Sequence[str]) -> tuple[str, dict]:
    """``(checkpoint string, {label name: value})`` of one checkpoint label."""
    if isinstance(label, tuple):
        if len(label) > len(label_names):
            raise ArgumentError(
                f"Checkpoint label {label!r} has {len(label)} parts but label_names={tuple(label_names)!r} "
                f"names {len(label_names)}; pass label_names=... with one name per part."
            )
        fields = dict(zip(label_names, label))
        return "/".join(f"{k}={v}" for k, v in fields.items()), fields
    if isinstance(label, (int, float, np.integer, np.floating)) and not isinstance(label, bool):
        return f"{label_names[0]}={label}", {label_names[0]: label}
    text = str(label)
    fields = {}
    for name in label_names:
        match = re.search(rf"{re.escape(name)}[_=-]?{_NUMBER}", text)
        if match:
            fields[name] = _number(match.group(1))
    return text, fields


def _label_of(item, i: int) -> str:
    if isinstance(item, (str, os.PathLike)):
        return str(item)
    return getattr(item, "name_or_path", "") or f"checkpoint {i}"


def checkpoint_items(checkpoints, label_names) -> list[tuple[str, dict, object]]:
    """``(name, {label column: value}, model or path)`` of every checkpoint, in the order given, each
    checked to be a causal LM or an existing folder (the DPO checkpoints of Rafailov et al. 2024)."""
    if isinstance(label_names, str) or not label_names or not all(isinstance(x, str) for x in label_names):
        raise ArgumentError(f"label_names={label_names!r} must be a non-empty tuple of column names, e.g. ('beta', 'step').")
    raw: list[tuple[object, object]] = []
    if isinstance(checkpoints, Mapping):
        for key, value in checkpoints.items():
            if isinstance(value, Mapping):
                raw.extend(((key, inner), v) for inner, v in value.items())
            else:
                raw.append((key, value))
    elif isinstance(checkpoints, (list, tuple)):
        raw = [(_label_of(item, i), item) for i, item in enumerate(checkpoints)]
    else:
        raise ArgumentError(
            "checkpoints must be a dict {label: model or path} (labels may be (beta, step) tuples or a "
            "nested {beta: {step: path}} dict such as a toy world's .checkpoints) or a list of models/paths; "
            f"got {type(checkpoints).__name__}."
        )
    if not raw:
        raise ArgumentError("checkpoints is empty: pass at least one policy checkpoint.")
    items, seen = [], set()
    for label, spec in raw:
        name, fields = _parse_label(label, tuple(label_names))
        if name in seen:
            raise ArgumentError(f"Two checkpoints have the label {name!r}; give each its own label.")
        seen.add(name)
        if isinstance(spec, (str, os.PathLike)):
            local = isinstance(spec, os.PathLike) or str(spec).startswith((".", "/", "~"))
            if local and not Path(spec).expanduser().exists():
                raise DataError(f"Checkpoint {name!r}: the folder {str(spec)!r} does not exist.")
        elif not isinstance(spec, torch.nn.Module):
            raise ArgumentError(
                f"Checkpoint {name!r} is a {type(spec).__name__}; pass a causal LM or a hub name / local path."
            )
        elif not is_causal_lm(spec):
            raise ModelError(f"Checkpoint {name!r} is a {type(spec).__name__}, not a causal language model.")
        items.append((name, fields, spec))
    return items


def check_checkpoints(items, tok, trust_remote_code: bool) -> None:
    """Every checkpoint fits the reference's tokenizer, checked before the first one samples: model
    objects by their vocabulary, folders by the tokenizer saved beside them (when there is one).
    KL from the reference (Gao et al. 2022) needs one tokenisation for both."""
    for name, _, spec in items:
        if isinstance(spec, torch.nn.Module):
            check_vocab_covers(spec, tok, role=f"checkpoint {name!r}")
        elif Path(spec).expanduser().is_dir():
            try:
                saved = load_tokenizer(None, Path(spec).expanduser(), role=f"checkpoint {name!r}",
                                       trust_remote_code=trust_remote_code)
            except TokenizerError:
                continue  # no tokenizer saved beside the weights: the reference's is used
            check_same_tokenizer(tok, saved, names=("reference", f"checkpoint {name!r}"))
