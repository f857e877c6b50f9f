"""Reading preference data in every accepted form, and tokenising it exactly as TRL's DPOTrainer does."""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
from pathlib import Path

import pandas as pd
import pytest

import rmlab
from rmlab.io.pairs import load_pairs, read_table
from rmlab.io.tokenize import encode_pairs
from rmlab.toy import tiny_causal_lm, tiny_tokenizer
from tests.conftest import make_pairs


def need(module: str):
    """An optional test dependency, imported for the one test that needs it (skipped without it;
    tests/conftest.py makes a missing one an error in CI)."""
    return pytest.importorskip(module)

# DPOConfig itself sets a deprecated TrainingArguments field; that is TRL's business, not ours
pytestmark = pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")

# Text that is hard to round-trip through files: commas, quotes, newlines, tabs, unicode, leading
# spaces, an empty prompt, and responses that look like numbers ("4", "007").
TEXT_ROWS = [
    {"prompt": "Review:", "chosen": " great film", "rejected": " dull film", "source": "a", "score": 1},
    {
        "prompt": 'Say "hi", then stop.',
        "chosen": " Hi,\nthat's all.",
        "rejected": "\tÜnïcödé çharacters!",
        "source": "b",
        "score": 2,
    },
    {"prompt": "2+2 =", "chosen": "4", "rejected": "007", "source": "c", "score": 3},
    {"prompt": "", "chosen": "A charming film.", "rejected": "A flat script.", "source": "d", "score": 4},
]

CHAT_ROWS = [
    {
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        "chosen": [{"role": "assistant", "content": "Hello."}],
        "rejected": [{"role": "assistant", "content": "Go away."}],
        "id": 10,
    },
    {
        "prompt": [
            {"role": "user", "content": "Rate the film."},
            {"role": "assistant", "content": "Which one?"},
            {"role": "user", "content": "The long one."},
        ],
        "chosen": [{"role": "assistant", "content": "Too long, 3/10."}],
        "rejected": [{"role": "assistant", "content": "Great!\nLoved it."}],
        "id": 11,
    },
    {
        "prompt": [{"role": "user", "content": "Describe the film in one sentence."}],
        "chosen": [{"role": "assistant", "content": "A charming, funny and clever little film."}],
        "rejected": [{"role": "assistant", "content": "Film."}],
        "id": 12,
    },
]


def _columns(rows):
    return {key: [row[key] for row in rows] for key in rows[0]}


def make_source(kind: str, rows: list[dict], tmp):
    """The same rows in one of the forms load_pairs accepts (files are written under ``tmp``)."""
    if kind == "dataframe":
        return pd.DataFrame(rows)
    if kind == "records":
        return [dict(row) for row in rows]
    if kind == "columns":
        return _columns(rows)
    if kind == "dataset":
        return need("datasets").Dataset.from_list(rows)
    if kind == "jsonl":
        path = tmp / "d.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
        return path
    if kind == "json":  # a list of records, path given as a string
        path = tmp / "d.json"
        path.write_text(json.dumps(rows), encoding="utf-8")
        return str(path)
    if kind == "json_columns":
        path = tmp / "c.json"
        path.write_text(json.dumps(_columns(rows)), encoding="utf-8")
        return path
    if kind == "parquet":
        pd.DataFrame(rows).to_parquet(tmp / "d.parquet")
        return tmp / "d.parquet"
    if kind == "csv":
        pd.DataFrame(rows).to_csv(tmp / "d.csv", index=False)
        return str(tmp / "d.csv")
    if kind == "tsv":
        pd.DataFrame(rows).to_csv(tmp / "d.tsv", sep="\t", index=False)
        return tmp / "d.tsv"
    raise AssertionError(kind)


SOURCES = ["dataframe", "records", "columns", "dataset", "jsonl", "json", "json_columns", "parquet", "csv", "tsv"]
TEXT_ONLY = {"csv", "tsv"}


def as_lists(frame: pd.DataFrame) -> dict:
    return {c: list(frame[c]) for c in frame.columns}


def assert_plain_python(value):
    """Nested values are plain lists/dicts/strings, never numpy arrays."""
    if isinstance(value, list):
        for v in value:
            assert isinstance(v, dict) and all(isinstance(x, str) for x in v.values()), v
    else:
        assert isinstance(value, str)


# --------------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("source", SOURCES)
def test_text_pairs_from_every_source_are_identical(source, tmp_path):
    frame = load_pairs(make_source(source, TEXT_ROWS, tmp_path))
    assert list(frame.columns) == ["prompt", "chosen", "rejected", "source", "score"]
    assert frame.attrs["format"] == "text"
    assert as_lists(frame) == _columns(TEXT_ROWS)
    for column in ("prompt", "chosen", "rejected"):
        for value in frame[column]:
            assert_plain_python(value)


@pytest.mark.parametrize("source", [s for s in SOURCES if s not in TEXT_ONLY])
def test_chat_pairs_from_every_source_are_identical(source, tmp_path):
    frame = load_pairs(make_source(source, CHAT_ROWS, tmp_path))
    assert list(frame.columns) == ["prompt", "chosen", "rejected", "id"]
    assert frame.attrs["format"] == "chat"
    assert as_lists(frame) == _columns(CHAT_ROWS)
    for column in ("prompt", "chosen", "rejected"):
        for value in frame[column]:
            assert type(value) is list  # parquet and datasets give numpy arrays: they must be normalised
            assert_plain_python(value)


def test_csv_responses_that_look_like_numbers_stay_text(tmp_path):
    """A CSV has no types: answers such as "4" or "007" are text, not numbers to be rejected or rewritten."""
    rows = [
        {"prompt": "2+2 =", "chosen": "4", "rejected": "5", "n": 1},
        {"prompt": "Agent?", "chosen": "007", "rejected": "1.50", "n": 2},
    ]
    pd.DataFrame(rows).to_csv(tmp_path / "math.csv", index=False)
    frame = load_pairs(tmp_path / "math.csv")
    assert as_lists(frame) == _columns(rows)  # extra columns keep their parsed types (n is int)
    pd.DataFrame(rows).to_csv(tmp_path / "math.tsv", sep="\t", index=False)
    assert as_lists(load_pairs(tmp_path / "math.tsv")) == _columns(rows)


def test_one_pair_as_a_single_dict():
    """A dict whose values are not columns is one pair, for text and for chat alike."""
    for rows in (TEXT_ROWS, CHAT_ROWS):
        for row in rows:
            row = {c: row[c] for c in ("prompt", "chosen", "rejected")}  # every value may be a list
            assert as_lists(load_pairs(row)) == _columns([row])


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_files_with_a_byte_order_mark(suffix, tmp_path):
    """Editors on Windows write UTF-8 with a BOM; it is not part of the data."""
    path = tmp_path / f"bom{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in TEXT_ROWS), encoding="utf-8-sig")
    elif suffix == ".json":
        path.write_text(json.dumps(TEXT_ROWS), encoding="utf-8-sig")
    else:
        pd.DataFrame(TEXT_ROWS).to_csv(path, index=False, encoding="utf-8-sig")
    assert path.read_bytes()[:3] == b"\xef\xbb\xbf"
    assert as_lists(load_pairs(path)) == _columns(TEXT_ROWS)


def test_filtered_frame_with_a_gappy_index():
    frame = pd.DataFrame(TEXT_ROWS).iloc[[3, 1]]
    got = load_pairs(frame)
    assert list(got.index) == [0, 1]
    assert as_lists(got) == _columns([TEXT_ROWS[3], TEXT_ROWS[1]])


def test_parquet_really_gives_numpy_arrays_that_load_pairs_normalises(tmp_path):
    pd.DataFrame(CHAT_ROWS).to_parquet(tmp_path / "c.parquet")
    raw = read_table(tmp_path / "c.parquet")
    assert type(raw["prompt"].iloc[0]).__module__ == "numpy"  # the case the normalisation exists for
    frame = load_pairs(raw)
    assert frame["prompt"].iloc[1] == CHAT_ROWS[1]["prompt"]


def test_extra_columns_are_kept_after_the_pair_columns_and_input_is_not_modified():
    original = pd.DataFrame(
        {
            "id": [7, 8],
            "rejected": [" dull", " slow"],
            "question": ["Review:", "Describe:"],
            "chosen": [" great", " clever"],
            "meta": [{"k": 1}, {"k": 2}],
        }
    )
    snapshot = original.copy()
    frame = load_pairs(original, prompt_column="question")
    assert list(frame.columns) == ["prompt", "chosen", "rejected", "id", "meta"]
    assert list(frame["prompt"]) == ["Review:", "Describe:"]
    assert list(frame["id"]) == [7, 8] and list(frame["meta"]) == [{"k": 1}, {"k": 2}]
    pd.testing.assert_frame_equal(original, snapshot)


# --------------------------------------------------------------------------------------------------
# implicit prompt (no prompt column): the shared prefix, as TRL's extract_prompt finds it
# --------------------------------------------------------------------------------------------------
IMPLICIT_TEXT = [
    {"chosen": "The movie was great", "rejected": "The movie was dull"},  # a space stays with the response
    {"chosen": "The film was great", "rejected": "The film was grim"},  # diverges inside a word
    {"chosen": "Yes, I liked it.", "rejected": "No."},  # nothing shared: empty prompt
    {"chosen": "Q: best part? A: the cast.", "rejected": "Q: best part? A: nothing at all"},
]

IMPLICIT_CHAT = [
    {
        "chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}],
        "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go away."}],
    },
    {
        "chosen": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Rate it."},
            {"role": "assistant", "content": "Which?"},
            {"role": "user", "content": "The film."},
            {"role": "assistant", "content": "8/10."},
        ],
        "rejected": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Rate it."},
            {"role": "assistant", "content": "Which?"},
            {"role": "user", "content": "The film."},
            {"role": "assistant", "content": "2/10, dull."},
        ],
    },
]


@pytest.mark.parametrize("rows, fmt", [(IMPLICIT_TEXT, "text"), (IMPLICIT_CHAT, "chat")])
@pytest.mark.parametrize("source", ["records", "dataset", "parquet"])
def test_implicit_prompt_equals_trl_extract_prompt(rows, fmt, source, tmp_path):
    frame = load_pairs(make_source(source, rows, tmp_path))
    assert list(frame.columns) == ["prompt", "chosen", "rejected"]
    assert frame.attrs["format"] == fmt
    for i, row in enumerate(rows):
        expected = need("trl.data_utils").extract_prompt(dict(row))
        got = {c: frame[c].iloc[i] for c in ("prompt", "chosen", "rejected")}
        assert got == expected, i
        assert got["prompt"] + got["chosen"] == row["chosen"]
        assert got["prompt"] + got["rejected"] == row["rejected"]
    if fmt == "text":  # the examples cover what they are meant to
        assert list(frame["prompt"]) == ["The movie was", "The film was gr", "", "Q: best part? A:"]
    else:
        assert [len(p) for p in frame["prompt"]] == [1, 4]


# --------------------------------------------------------------------------------------------------
# tokenisation against TRL's DPOTrainer
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models():
    return tiny_causal_lm("gpt2", seed=0), tiny_causal_lm("gpt2", seed=1)


def trl_tokenised(models, tok, rows, tmp_path, **config):
    """The train dataset of a real DPOTrainer: prompt_ids / chosen_ids / rejected_ids per row."""
    trl, datasets = need("trl"), need("datasets")
    args = trl.DPOConfig(
        output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False, dataset_num_proc=None,
        **config,
    )
    trainer = trl.DPOTrainer(
        model=models[0], ref_model=models[1], args=args, processing_class=tok,
        train_dataset=datasets.Dataset.from_list(rows),
    )
    return trainer.train_dataset


def text_rows_for_trl():
    rows = make_pairs(8, seed=2)
    rows[1]["chosen"] += "<|endoftext|>"  # already ends with EOS: TRL does not add a second one
    # a word split at the boundary: "gr" alone and "gr" inside "great" tokenise differently
    rows[2].update(prompt="Review: the film was gr", chosen="eat.", rejected="im.")
    return rows


def chat_rows_for_trl():
    rows = make_pairs(6, seed=4, chat=True)
    return rows + [{k: v for k, v in row.items() if k != "id"} for row in CHAT_ROWS]


def implicit_chat_rows():
    return [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in CHAT_ROWS]


CASES = {
    "text": (False, text_rows_for_trl),
    "text_bos": (True, text_rows_for_trl),
    "chat": (False, chat_rows_for_trl),
    "chat_bos": (True, chat_rows_for_trl),
    "text_implicit": (False, lambda: IMPLICIT_TEXT),
    "chat_implicit": (False, implicit_chat_rows),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_encode_pairs_equals_dpo_trainer_tokenisation(case, models, tmp_path):
    bos, make_rows = CASES[case]
    tok = tiny_tokenizer(add_bos=bos)
    rows = make_rows()
    expected = trl_tokenised(models, tok, rows, tmp_path)
    assert len(expected) == len(rows)
    encoded = encode_pairs(load_pairs(rows), tok)
    assert len(encoded) == len(rows)
    for i, (row, pair) in enumerate(zip(expected, encoded)):
        for side in ("chosen", "rejected"):
            seq = getattr(pair, side)
            assert list(seq.ids) == row["prompt_ids"] + row[f"{side}_ids"], (i, side)
            assert not seq.truncated and seq.response_tokens_full == len(row[f"{side}_ids"])
            if row["prompt_ids"]:
                assert seq.start == len(row["prompt_ids"]), (i, side)
            else:  # position 0 cannot be predicted: TRL's shifted completion mask drops it too
                assert seq.start == 1
        assert pair.prompt_tokens == len(row["prompt_ids"])
        if bos:  # the tokenizer's BOS once, at the start; never doubled
            for seq in (pair.chosen, pair.rejected):
                if case.startswith("text"):
                    assert seq.ids[0] == tok.bos_token_id and seq.ids.count(tok.bos_token_id) == 1
                else:  # chat templates carry their own specials; the tokenizer's BOS is not added
                    assert tok.bos_token_id not in seq.ids


def test_boundary_merge_case_is_exercised():
    """A prompt that tokenises differently alone: the response starts where the ids diverge."""
    tok = tiny_tokenizer()
    rows = text_rows_for_trl()
    alone = tok(rows[2]["prompt"])["input_ids"]
    pair = encode_pairs(load_pairs(rows), tok)[2]
    assert pair.prompt_tokens < len(alone)
    assert list(pair.chosen.ids[: pair.prompt_tokens]) == alone[: pair.prompt_tokens]


def test_decoded_responses_are_the_completions():
    tok = tiny_tokenizer()
    text = encode_pairs(load_pairs(TEXT_ROWS[:2]), tok)
    assert tok.decode(text[0].chosen.response_ids) == " great film<|endoftext|>"
    assert tok.decode(text[1].rejected.response_ids) == "\tÜnïcödé çharacters!<|endoftext|>"
    assert tok.decode(text[0].chosen.ids[: text[0].chosen.start]) == "Review:"
    chat = encode_pairs(load_pairs(CHAT_ROWS), tok)
    assert tok.decode(chat[0].chosen.response_ids) == "Hello.<|im_end|>\n"
    assert tok.decode(chat[1].rejected.response_ids) == "Great!\nLoved it.<|im_end|>\n"
    assert tok.decode(chat[0].chosen.ids[: chat[0].chosen.start]).endswith("<|im_start|>assistant\n")
    # chat completions are closed by the template: no EOS is appended
    assert all(tok.eos_token_id not in s.ids for p in chat for s in (p.chosen, p.rejected))


# --------------------------------------------------------------------------------------------------
# EOS
# --------------------------------------------------------------------------------------------------
def test_eos_is_appended_once():
    tok = tiny_tokenizer()
    eos = tok.eos_token_id
    rows = [
        {"prompt": "Review:", "chosen": " great film<|endoftext|>", "rejected": " dull film"},
        {"prompt": "Review:", "chosen": " great film", "rejected": " dull film<|endoftext|>"},
    ]
    encoded = encode_pairs(load_pairs(rows), tok)
    for pair in encoded:
        for seq in (pair.chosen, pair.rejected):
            assert seq.ids[-1] == eos and seq.ids.count(eos) == 1
    # with or without the EOS in the text, the same ids
    assert encoded[0].chosen.ids == encoded[1].chosen.ids
    assert encoded[0].rejected.ids == encoded[1].rejected.ids

    plain = encode_pairs(load_pairs(rows), tok, add_eos=False)
    assert eos not in plain[1].chosen.ids and eos not in plain[0].rejected.ids
    assert plain[1].chosen.ids == encoded[1].chosen.ids[:-1]
    assert tok.decode(plain[1].chosen.response_ids) == " great film"
    # an EOS written in the data stays, once, even with add_eos=False
    assert plain[0].chosen.ids == encoded[0].chosen.ids


# --------------------------------------------------------------------------------------------------
# truncation
# --------------------------------------------------------------------------------------------------
def test_default_truncation_mode_is_the_one_trl_uses():
    """What the README and the docstrings call TRL's default is DPOConfig's default, and every
    public function that truncates starts from it."""
    trl = need("trl")
    field = {f.name: f for f in dataclasses.fields(trl.DPOConfig)}["truncation_mode"]
    trl_default = field.default
    assert trl_default in field.metadata["choices"]
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    stated = re.findall(r"`(\w+)`, TRL's default", readme)
    assert stated == [trl_default], "the README names TRL's default truncation mode once, correctly"
    documented = re.compile(r'``"(\w+)"`` \(TRL\'s default\)')
    functions = [encode_pairs] + [getattr(rmlab, name) for name in rmlab.__all__]
    checked = named = 0
    for fn in functions:
        try:
            parameter = inspect.signature(fn).parameters.get("truncation_mode")
        except (TypeError, ValueError):
            continue
        if parameter is None:
            continue
        checked += 1
        assert parameter.default == trl_default, fn.__name__
        modes = documented.findall(fn.__doc__ or "")
        assert all(mode == trl_default for mode in modes), fn.__name__
        named += bool(modes)
    assert checked >= 10 and named >= 2


LONG_PROMPT = {
    "prompt": "Review: " + "the plot was slow and " * 6,
    "chosen": " great",
    "rejected": " the film was dull and far too long",
}


def truncation_rows():
    return make_pairs(8, seed=3) + [dict(LONG_PROMPT)]


@pytest.mark.filterwarnings("ignore::rmlab.errors.DataWarning")  # the data is bad on purpose here
@pytest.mark.parametrize("mode", ["keep_start", "keep_end"])
def test_truncation_lengths_flags_and_kept_tokens(mode):
    tok = tiny_tokenizer()
    pairs = load_pairs(truncation_rows())
    full = encode_pairs(pairs, tok)
    lengths = sorted({len(s.ids) for p in full for s in (p.chosen, p.rejected)})
    for max_length in (2, 6, 12, lengths[len(lengths) // 2], lengths[-1] - 1, lengths[-1]):
        cut = encode_pairs(pairs, tok, max_length=max_length, truncation_mode=mode)
        for f_pair, c_pair in zip(full, cut):
            assert c_pair.prompt_tokens == f_pair.prompt_tokens
            for side in ("chosen", "rejected"):
                f, c = getattr(f_pair, side), getattr(c_pair, side)
                assert len(c.ids) == min(len(f.ids), max_length)
                assert c.response_tokens_full == f.n_response == len(f.ids) - f.start
                # truncated exactly when a token is lost: the response's end, or the prompt's start
                assert c.truncated == (len(f.ids) > max_length)
                if mode == "keep_start":
                    assert c.ids == f.ids[:max_length]
                    assert c.response_ids == f.response_ids[: c.n_response]
                else:
                    assert c.ids == f.ids[-max_length:]
                    assert c.response_ids == f.response_ids[len(f.response_ids) - c.n_response :]
                assert 1 <= c.start <= len(c.ids)
        if max_length == lengths[-1]:
            assert not any(p.truncated for p in cut) and cut == full
    assert encode_pairs(pairs, tok, max_length=None) == full


@pytest.mark.filterwarnings("ignore::rmlab.errors.DataWarning")  # the data is bad on purpose here
def test_prompt_longer_than_max_length():
    tok = tiny_tokenizer()
    pairs = load_pairs([LONG_PROMPT])
    full = encode_pairs(pairs, tok)[0]
    max_length = 8
    assert full.prompt_tokens > max_length and full.chosen.n_response < max_length < full.rejected.n_response
    start = encode_pairs(pairs, tok, max_length=max_length)[0]
    for seq in (start.chosen, start.rejected):
        assert seq.truncated and seq.n_response == 0 and seq.response_ids == ()
        assert len(seq.ids) == max_length
    assert start.truncated
    # keep_end keeps the end of the response: "great"+EOS fits whole (its prompt lost its start, so
    # it is truncated too), the long rejected is cut
    end = encode_pairs(pairs, tok, max_length=max_length, truncation_mode="keep_end")[0]
    assert end.chosen.response_ids == full.chosen.response_ids and end.chosen.truncated
    assert end.rejected.response_ids == full.rejected.response_ids[-(max_length - 1) :]
    assert end.rejected.truncated and end.truncated


@pytest.mark.filterwarnings("ignore::rmlab.errors.DataWarning")  # the data is bad on purpose here
@pytest.mark.parametrize("mode", ["keep_start", "keep_end"])
@pytest.mark.parametrize("max_length", [6, 14, 25])
def test_truncation_equals_trl_collator(mode, max_length, models, tmp_path):
    """TRL truncates in its collator; the ids kept and the response tokens scored must agree."""
    tok = tiny_tokenizer()
    rows = truncation_rows()
    examples = list(trl_tokenised(models, tok, rows, tmp_path))
    collator = need("trl.trainer.dpo_trainer").DataCollatorForPreference(
        pad_token_id=tok.pad_token_id, max_length=max_length, truncation_mode=mode
    )
    batch = collator(examples)
    encoded = encode_pairs(load_pairs(rows), tok, max_length=max_length, truncation_mode=mode)
    n = len(rows)
    assert any(p.truncated for p in encoded)
    if max_length == 25:
        assert not all(p.truncated for p in encoded)
    for i, pair in enumerate(encoded):
        for k, seq in ((i, pair.chosen), (n + i, pair.rejected)):
            length = int(batch["attention_mask"][k].sum())
            assert list(seq.ids) == batch["input_ids"][k, :length].tolist()
            # TRL scores label t where completion_mask[t] == 1, for t >= 1 (shifted mask)
            scored = [t for t in range(1, length) if batch["completion_mask"][k, t]]
            assert scored == list(range(seq.start, len(seq.ids))), (i, k)


@pytest.mark.filterwarnings("ignore::rmlab.errors.DataWarning")  # the data is bad on purpose here
@pytest.mark.parametrize("max_length", [12, 20])
def test_trl_drops_exactly_the_pairs_left_without_response(max_length, models, tmp_path):
    """TRL's keep_start filter removes pairs whose prompt fills max_length; rmlab keeps and flags them."""
    tok = tiny_tokenizer()
    rows = [dict(row, row=i) for i, row in enumerate(truncation_rows())]
    kept = trl_tokenised(models, tok, rows, tmp_path, max_length=max_length)
    encoded = encode_pairs(load_pairs(rows), tok, max_length=max_length)
    empty = [i for i, p in enumerate(encoded) if p.chosen.n_response == 0]
    assert empty and all(encoded[i].truncated and encoded[i].rejected.n_response == 0 for i in empty)
    assert sorted(kept["row"]) == [i for i in range(len(rows)) if i not in empty]
