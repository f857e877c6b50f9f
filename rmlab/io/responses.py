"""Single responses to score: plain texts, prompt/response rows, or conversations.

Reward models score one text at a time; preference pairs are only one way to hold texts. This
module reads the other ways, in TRL's conventions where one exists:

- a list of strings (each a whole text) or of chat conversations (lists of messages);
- rows with ``prompt`` and ``completion`` (TRL's prompt-completion format) or ``response``;
- rows with ``text`` (TRL's language-modeling format) or ``messages`` (its conversational form:
  the last message is the response, the ones before it the prompt).

Tokenising them lives in :func:`rmlab.io.tokenize.encode_responses`.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping

import pandas as pd

from rmlab.errors import DataError
from rmlab.io.pairs import cell_kind, load_pairs, read_table, to_python

#: Column names that hold the response to score, in order of preference.
RESPONSE_COLUMNS = ("response", "completion", "text", "messages")


def _is_conversation(value) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(m, Mapping) for m in value)


def load_responses(data) -> pd.DataFrame:
    """Read and validate texts to score one by one.

    Args:
        data: a list of strings or of conversations, or tabular data (DataFrame, list of dicts,
            dict of columns, ``datasets.Dataset``, .jsonl/.json/.parquet/.csv path) with a
            ``response`` / ``completion`` column (and optionally ``prompt``), a ``text`` column, or a
            ``messages`` column.

    Returns:
        A new DataFrame whose first columns are ``prompt`` (``""`` or ``[]`` when there is none) and
        ``response``, followed by the input's other columns; ``attrs["format"]`` is ``"text"`` or
        ``"chat"``.

    Raises:
        DataError: no response column (with the closest name), missing/empty/non-string responses,
            malformed messages; each names the row and column.
    """
    if isinstance(data, (list, tuple)) and data and all(isinstance(v, str) for v in data):
        frame = pd.DataFrame({"response": list(data)})
    elif isinstance(data, (list, tuple)) and data and all(_is_conversation(v) for v in data):
        frame = pd.DataFrame({"messages": [list(v) for v in data]})
    else:
        frame = read_table(data)
    if len(frame) == 0:
        raise DataError("The data are empty: pass at least one text to score.")
    frame.columns = [str(c) for c in frame.columns]
    source = next((c for c in RESPONSE_COLUMNS if c in frame.columns), None)
    if source is None:
        hint = ""
        for wanted in RESPONSE_COLUMNS:
            match = difflib.get_close_matches(wanted, list(frame.columns), n=1, cutoff=0.6)
            if match:
                hint = f" Rename {match[0]!r} to {wanted!r}?"
                break
        raise DataError(
            f"Found no text to score: the data have columns {list(frame.columns)} but none of "
            f"{list(RESPONSE_COLUMNS)}.{hint} Pass a list of strings, rows with 'prompt' and "
            "'completion', rows with 'text', or preference pairs with 'chosen' and 'rejected'."
        )
    frame = frame.reset_index(drop=True)
    has_prompt = "prompt" in frame.columns and source in ("response", "completion")
    prompts, responses, kinds = [], [], set()
    for row in range(len(frame)):
        value = to_python(frame.at[row, source])
        kind = cell_kind(value, row, source, response=True)
        prompt = to_python(frame.at[row, "prompt"]) if has_prompt else ("" if kind == "text" else [])
        if has_prompt and prompt not in ("", []):
            prompt_kind = cell_kind(prompt, row, "prompt", response=False)
            if prompt_kind != kind:
                raise DataError(
                    f"Row {row} mixes plain text and chat messages (prompt is {prompt_kind!r}, "
                    f"{source} is {kind!r}); use one format per row."
                )
        if source == "messages":
            if value[-1]["role"] != "assistant":
                raise DataError(
                    f"Row {row}, column 'messages': the last message has role {value[-1]['role']!r}; "
                    "the response scored is the last message and must be the assistant's."
                )
            prompt, value = value[:-1], value[-1:]
        if kinds and kind not in kinds:
            raise DataError(
                f"Row {row} is {kind!r} but earlier rows are {next(iter(kinds))!r}; rmlab needs one "
                "format for a whole data set."
            )
        kinds.add(kind)
        prompts.append(prompt if prompt is not None else "")
        responses.append(value)
    out = pd.DataFrame({"prompt": prompts, "response": responses})
    for column in frame.columns:
        if column not in ("prompt", source):
            out[column] = frame[column].to_numpy()
    out.attrs["format"] = kinds.pop()
    return out


def load_scoring_data(data) -> tuple[str, pd.DataFrame]:
    """Read data a reward model scores: ``("pairs", load_pairs(...))`` when it has ``chosen`` and
    ``rejected`` columns, else ``("responses", load_responses(...))``."""
    if isinstance(data, (list, tuple)) and data and all(
        isinstance(v, str) or _is_conversation(v) for v in data
    ):
        return "responses", load_responses(data)
    table = read_table(data)
    columns = set(map(str, table.columns))
    if {"chosen", "rejected"} <= columns:
        return "pairs", load_pairs(table)
    if not columns & set(RESPONSE_COLUMNS) and _looks_like_pairs(columns):
        return "pairs", load_pairs(table)  # says which of chosen/rejected is missing, and the closest name
    return "responses", load_responses(table)


def _looks_like_pairs(columns: set[str]) -> bool:
    """One of ``chosen``/``rejected`` is there, or both are there misspelt: pairs, not single texts."""
    near = [
        name for name in ("chosen", "rejected")
        if name in columns or difflib.get_close_matches(name, sorted(columns), n=1, cutoff=0.6)
    ]
    return len(near) == 2 or bool({"chosen", "rejected"} & columns)
