"""Preference data: read, validate, normalise and tokenise it exactly as a DPO trainer would.

Data follow TRL's preference convention: columns ``prompt``, ``chosen``, ``rejected`` holding either
strings or chat message lists (``[{"role": ..., "content": ...}, ...]``). The "implicit prompt" form,
where ``chosen`` and ``rejected`` hold whole texts or conversations and the prompt is their shared
prefix, is accepted too.
Tokenising validated pairs as a DPO trainer does lives in :mod:`rmlab.io.tokenize`.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from rmlab.errors import (
    DataError,
    DataFileError,
    DataFileNotFoundError,
    DataWarning,
    closest,
)

#: Roles a chat message may carry.
KNOWN_ROLES = ("system", "user", "assistant", "tool", "developer", "function", "ipython")

_RESPONSE_COLUMNS = ("chosen", "rejected")


# --------------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------------
def _read_jsonl(path: Path) -> pd.DataFrame:
    rows = []
    with open(path, encoding="utf-8-sig") as handle:  # -sig: a leading BOM is not data
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataFileError(
                    f"{path}: line {number} is not valid JSON ({err.msg} at column {err.colno}). "
                    "Each line of a .jsonl file must hold one JSON object."
                ) from None
            if not isinstance(rows[-1], dict):
                raise DataFileError(
                    f"{path}: line {number} holds a {type(rows[-1]).__name__}, not a JSON object "
                    "with 'prompt', 'chosen' and 'rejected'."
                )
    return pd.DataFrame(rows)


def _read_json(path: Path) -> pd.DataFrame:
    text = path.read_text(encoding="utf-8-sig")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # one object per line under a .json name
            return _read_jsonl(path)
        raise DataFileError(
            f"{path}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})."
        ) from None
    if isinstance(obj, dict) and all(isinstance(v, list) for v in obj.values()):
        return pd.DataFrame(obj)  # columnar {"prompt": [...], "chosen": [...], ...}
    if isinstance(obj, dict):
        for key in ("data", "rows", "train"):
            if isinstance(obj.get(key), list):
                return pd.DataFrame(obj[key])
    if isinstance(obj, list):
        return pd.DataFrame(obj)
    raise DataFileError(
        f"{path}: expected a list of records or a dict of columns, found a {type(obj).__name__}."
    )


# A CSV cell has no type: responses such as "4" or "007" are text, not numbers.
_TEXT_DTYPES = {"prompt": str, "chosen": str, "rejected": str}


def _read_file(path: Path) -> pd.DataFrame:
    if not path.exists():
        raise DataFileNotFoundError(
            f"Preference data file {str(path)!r} does not exist (working directory: {os.getcwd()})."
        )
    suffix = path.suffix.lower()
    readers = {
        ".jsonl": _read_jsonl,
        ".ndjson": _read_jsonl,
        ".json": _read_json,
        ".parquet": pd.read_parquet,
        ".pq": pd.read_parquet,
        ".csv": lambda p: pd.read_csv(p, keep_default_na=False, dtype=_TEXT_DTYPES),
        ".tsv": lambda p: pd.read_csv(p, sep="\t", keep_default_na=False, dtype=_TEXT_DTYPES),
    }
    if suffix not in readers:
        raise DataFileError(
            f"Cannot read {str(path)!r}: unknown file type {suffix!r}. "
            f"Use one of {sorted(readers)} or pass a pandas DataFrame."
        )
    try:
        return readers[suffix](path)
    except DataFileError:
        raise
    except Exception as err:  # parquet / csv parser errors
        raise DataFileError(f"Could not parse {str(path)!r} as {suffix}: {err}") from err


def to_python(value):
    """Turn numpy arrays (as parquet / datasets give nested lists) back into plain lists/dicts."""
    if isinstance(value, np.ndarray):
        return [to_python(v) for v in value.tolist()]
    if isinstance(value, list):
        return [to_python(v) for v in value]
    if isinstance(value, dict):
        return {k: to_python(v) for k, v in value.items()}
    return value


def read_table(data) -> pd.DataFrame:
    """Any accepted form of tabular data (frame, records, columns, Dataset, file) as a new DataFrame."""
    if isinstance(data, pd.DataFrame):
        return data.copy()
    if isinstance(data, (str, os.PathLike)):
        return _read_file(Path(data))
    if hasattr(data, "to_list") and hasattr(data, "column_names"):  # datasets.Dataset
        return pd.DataFrame(data.to_list(), columns=list(data.column_names))
    if isinstance(data, Mapping):
        chosen = data.get("chosen")
        one_chat_row = isinstance(chosen, (list, tuple)) and any(isinstance(m, Mapping) for m in chosen)
        if not one_chat_row and all(
            isinstance(v, (list, tuple, np.ndarray, pd.Series)) for v in data.values()
        ):
            lengths = {str(k): len(v) for k, v in data.items()}
            if len(set(lengths.values())) > 1:
                raise DataError(
                    f"The columns of the preference data have different lengths ({lengths}); "
                    "every column needs one value per pair."
                )
            return pd.DataFrame(dict(data))
        return pd.DataFrame([dict(data)])  # one pair
    if isinstance(data, Sequence) and not isinstance(data, (bytes, bytearray)):
        if len(data) == 0:
            raise DataError("The preference data are empty: pass at least one pair.")
        bad = next((i for i, row in enumerate(data) if not isinstance(row, Mapping)), None)
        if bad is not None:
            raise DataError(
                f"Row {bad} of the preference data is a {type(data[bad]).__name__}; every row must be "
                "a dict with 'prompt', 'chosen' and 'rejected'."
            )
        return pd.DataFrame(list(data))
    raise DataError(
        f"Cannot read preference data from a {type(data).__name__}. Pass a pandas DataFrame, a list of "
        "dicts, a datasets.Dataset, or a path to a .jsonl/.json/.parquet/.csv file."
    )


# --------------------------------------------------------------------------------------------------
# validating and normalising
# --------------------------------------------------------------------------------------------------
def _is_missing(value) -> bool:
    if value is None:
        return True
    return isinstance(value, float) and math.isnan(value)


def _check_messages(messages, row: int, column: str) -> None:
    if len(messages) == 0:
        raise DataError(f"Row {row}, column {column!r}: the message list is empty.")
    for k, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise DataError(
                f"Row {row}, column {column!r}, message {k}: expected a dict with 'role' and "
                f"'content', got {message!r:.80}."
            )
        role = message["role"]
        if role not in KNOWN_ROLES:
            raise DataError(
                f"Row {row}, column {column!r}, message {k}: unknown role {role!r}; "
                f"use one of {list(KNOWN_ROLES)}.{closest(role, KNOWN_ROLES)}"
            )
        if not isinstance(message["content"], str):
            raise DataError(
                f"Row {row}, column {column!r}, message {k}: 'content' must be a string, "
                f"got {type(message['content']).__name__}."
            )


def cell_kind(value, row: int, column: str, *, response: bool | None = None) -> str:
    """'text' or 'chat' for one cell, or a DataError that says what is wrong with it.

    ``response`` (default: the column is ``chosen`` or ``rejected``) makes empty text an error.
    """
    if response is None:
        response = column in _RESPONSE_COLUMNS
    if _is_missing(value):
        raise DataError(
            f"Row {row}, column {column!r} is missing (None/NaN). Drop the row or fill in the text."
        )
    if isinstance(value, str):
        if response and not value.strip():
            raise DataError(
                f"Row {row}, column {column!r} is an empty response. Every response needs text; "
                "drop the row or fix the data."
            )
        return "text"
    if isinstance(value, (list, tuple)):
        if value and all(isinstance(m, str) for m in value):
            raise DataError(
                f"Row {row}, column {column!r} holds a list of strings. Chat messages must be dicts "
                "with 'role' and 'content'; for step-wise responses use rmlab.step_rewards."
            )
        _check_messages(value, row, column)
        return "chat"
    if isinstance(value, Mapping):
        if "role" in value and "content" in value:
            raise DataError(
                f"Row {row}, column {column!r} holds one chat message, not a list of them; wrap it in a "
                "list: [{'role': ..., 'content': ...}]."
            )
        raise DataError(
            f"Row {row}, column {column!r} holds a dict with keys {list(value)[:8]} (a nested column); it "
            "must be a string or a list of chat messages. Take the text out of it first (datasets: "
            "Dataset.flatten() then rename the field; pandas: pd.json_normalize)."
        )
    raise DataError(
        f"Row {row}, column {column!r} must be a string or a list of chat messages, "
        f"got {type(value).__name__} ({value!r:.60})."
    )


def _extract_text_prompt(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Split the shared prefix off two texts as TRL's ``extract_prompt`` does."""
    idx = 0
    limit = min(len(chosen), len(rejected))
    while idx < limit and chosen[idx] == rejected[idx]:
        idx += 1
    if 0 < idx < limit and chosen[idx - 1] == " ":  # the space before the completion stays with it
        idx -= 1
    return chosen[:idx], chosen[idx:], rejected[idx:]


def _extract_chat_prompt(chosen: list, rejected: list) -> tuple[list, list, list]:
    idx = 0
    limit = min(len(chosen), len(rejected))
    while idx < limit and chosen[idx] == rejected[idx]:
        idx += 1
    return list(chosen[:idx]), list(chosen[idx:]), list(rejected[idx:])


def _nested_hint(frame: pd.DataFrame, missing: list[str]) -> str:
    """Advice for columns that hold dicts with the missing names (a nested / struct column)."""
    for column in frame.columns:
        first = next((v for v in frame[column] if not _is_missing(v)), None)
        if isinstance(first, Mapping) and any(m in first for m in missing):
            return (
                f" Column {column!r} holds dicts with keys {list(first)[:8]}: the pairs are nested. "
                f"Flatten them first (datasets: Dataset.flatten(), then rename '{column}.chosen' to "
                "'chosen' and so on; pandas: pd.json_normalize(rows))."
            )
    return ""


def _warn_identical(chosen: list, rejected: list) -> None:
    same = [i for i, (c, r) in enumerate(zip(chosen, rejected)) if c == r]
    if same:
        shown = same[:10] + (["..."] if len(same) > 10 else [])
        warnings.warn(
            f"{len(same)} of {len(chosen)} pairs have chosen identical to rejected (rows {shown}): their "
            "margin is 0 by construction and they carry no preference. Drop them (e.g. "
            "frame[frame.chosen != frame.rejected]) or fix the data.",
            DataWarning,
            stacklevel=3,
        )


def load_pairs(data, *, prompt_column: str = "prompt") -> pd.DataFrame:
    """Read and validate preference data in TRL's convention.

    Args:
        data: a pandas DataFrame, a list of dicts, a dict of columns, a ``datasets.Dataset``, or a
            path to a ``.jsonl`` / ``.json`` / ``.parquet`` / ``.csv`` file, with columns
            ``prompt`` (optional), ``chosen`` and ``rejected``.
        prompt_column: name of the prompt column, if it is not ``"prompt"``.

    Returns:
        A new DataFrame whose first columns are ``prompt``, ``chosen``, ``rejected`` (strings, or chat
        message lists), followed by every other column of the input unchanged. Without a prompt
        column, the prompt is the shared prefix of chosen and rejected (TRL's implicit-prompt form).
        ``frame.attrs["format"]`` is ``"text"`` or ``"chat"``.

    Raises:
        DataError: missing columns (with the closest name), missing/empty/non-string responses,
            malformed chat messages or unknown roles, rows that mix text and chat; each names the
            row and column.
        DataFileError: a path that does not exist or does not parse (with the line number).

    Warns:
        DataWarning: pairs whose chosen is identical to rejected (with their count and rows).

    Example:
        >>> import rmlab
        >>> frame = rmlab.load_pairs([{"prompt": "Hi", "chosen": " there", "rejected": " you"}])
        >>> list(frame.columns[:3]), frame.attrs["format"]
        (['prompt', 'chosen', 'rejected'], 'text')
    """
    frame = read_table(data)
    if len(frame) == 0:
        raise DataError("The preference data are empty: pass at least one pair.")
    frame.columns = [str(c) for c in frame.columns]
    if prompt_column != "prompt":
        if prompt_column not in frame.columns:
            raise DataError(
                f"prompt_column={prompt_column!r} is not a column of the preference data; found "
                f"{list(frame.columns)}.{closest(prompt_column, frame.columns)}"
            )
        if "prompt" in frame.columns:
            raise DataError(
                f"The preference data have both a 'prompt' column and prompt_column={prompt_column!r}; "
                "drop or rename one of them."
            )
        frame = frame.rename(columns={prompt_column: "prompt"})
    missing = [c for c in _RESPONSE_COLUMNS if c not in frame.columns]
    if missing:
        hints = "".join(closest(c, frame.columns) for c in missing) + _nested_hint(frame, missing)
        raise DataError(
            f"The preference data lack the column(s) {missing}; found {list(frame.columns)}.{hints} "
            "Rename your columns to 'prompt', 'chosen' and 'rejected' (TRL's convention)."
        )
    frame = frame.reset_index(drop=True)
    has_prompt = "prompt" in frame.columns
    columns = (["prompt"] if has_prompt else []) + list(_RESPONSE_COLUMNS)
    for column in columns:
        frame[column] = [to_python(v) for v in frame[column]]

    kinds = set()
    prompts, chosens, rejecteds = [], [], []
    for row in range(len(frame)):
        cells = {c: frame.at[row, c] for c in columns}
        row_kinds = {c: cell_kind(v, row, c) for c, v in cells.items() if c != "prompt" or v != ""}
        if len(set(row_kinds.values())) > 1:
            raise DataError(
                f"Row {row} mixes plain text and chat messages ({row_kinds}); use one format per row."
            )
        kind = next(iter(row_kinds.values()))
        if kinds and kind not in kinds:
            raise DataError(
                f"Row {row} is {kind!r} but earlier rows are {kinds.pop()!r}; rmlab needs one format "
                "for a whole data set."
            )
        kinds.add(kind)
        chosen, rejected = cells["chosen"], cells["rejected"]
        if not has_prompt and chosen == rejected:
            raise DataError(
                f"Row {row}: chosen is identical to rejected and there is no 'prompt' column, so no "
                "response is left after taking their shared prefix as the prompt. Drop the row or fix "
                "the data."
            )
        if has_prompt:
            prompt = cells["prompt"]
        elif kind == "chat":
            prompt, chosen, rejected = _extract_chat_prompt(chosen, rejected)
        else:
            prompt, chosen, rejected = _extract_text_prompt(chosen, rejected)
        for column, value in (("chosen", chosen), ("rejected", rejected)):
            if kind == "chat" and not value:
                raise DataError(
                    f"Row {row}, column {column!r}: after removing the shared prompt no message is "
                    "left; chosen and rejected must differ in their last turns."
                )
            if kind == "text" and not value.strip():
                raise DataError(
                    f"Row {row}, column {column!r}: after removing the prefix shared with the other "
                    "response, nothing is left; give a 'prompt' column or distinct responses."
                )
        prompts.append(prompt)
        chosens.append(chosen)
        rejecteds.append(rejected)

    _warn_identical(chosens, rejecteds)
    extra = [c for c in frame.columns if c not in ("prompt", *_RESPONSE_COLUMNS)]
    out = pd.DataFrame({"prompt": prompts, "chosen": chosens, "rejected": rejecteds})
    for column in extra:
        out[column] = frame[column].to_numpy()
    out.attrs["format"] = kinds.pop()
    return out
