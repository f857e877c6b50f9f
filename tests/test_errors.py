"""Bad input fails fast, before any model runs, with an error that says what, where and how to fix it."""

from __future__ import annotations

import copy
import math

import numpy as np
import pandas as pd
import pytest

import rmlab
from rmlab.errors import ArgumentError, DataError, DataFileError, ModelError, RmlabError, TokenizerError
from rmlab.io.pairs import load_pairs
from rmlab.io.tokenize import encode_pairs
from rmlab.toy import tiny_causal_lm, tiny_tokenizer

GOOD = {"prompt": "Review:", "chosen": " great film", "rejected": " dull film"}
USER = {"role": "user", "content": "Rate the film."}
GOOD_CHAT = {
    "prompt": [USER],
    "chosen": [{"role": "assistant", "content": "Great."}],
    "rejected": [{"role": "assistant", "content": "Dull."}],
}


@pytest.fixture
def no_forward(monkeypatch):
    """Any attempt to score tokens fails the test: errors must come before the models run."""
    calls = []

    def forbidden(*args, **kwargs):
        calls.append(1)
        raise AssertionError("a model forward pass ran before the input error was raised")

    monkeypatch.setattr("rmlab.engine.pairs.token_logprobs", forbidden)
    return calls


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def lm():
    return tiny_causal_lm("gpt2", seed=0)


def test_the_no_forward_guard_is_in_the_path(tok, lm, no_forward):
    """Valid input reaches the scoring step, so the guard above really sees every forward."""
    with pytest.raises(AssertionError, match="forward pass ran"):
        rmlab.implicit_rewards(lm, lm, [GOOD], tokenizer=tok, progress=False)
    assert no_forward == [1]


def rewards(data, policy, reference, tok, **kwargs):
    return rmlab.implicit_rewards(policy, reference, data, tokenizer=tok, progress=False, **kwargs)


def raises(cls, data, *words):
    """load_pairs(data) raises ``cls`` whose message holds every one of ``words``."""
    with pytest.raises(cls) as info:
        load_pairs(data)
    message = str(info.value)
    for word in words:
        assert word in message, (word, message)
    assert isinstance(info.value, RmlabError)
    return message


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------
def test_missing_column_suggests_the_closest_name():
    rows = [{"prompt": "Review:", "chosen_text": " great", "rejected": " dull"}]
    raises(DataError, rows, "['chosen']", "Did you mean 'chosen_text'?", "'prompt', 'chosen' and 'rejected'")
    rows = [{"prompt": "Review:", "choosen": " great", "rejected": " dull"}]
    raises(DataError, rows, "['chosen']", "Did you mean 'choosen'?")
    frame = pd.DataFrame({"prompt": ["Q"], "chosen": [" a"], "rejectd": [" b"]})
    raises(DataError, frame, "['rejected']", "Did you mean 'rejectd'?")
    # nothing close: no suggestion, both names listed
    message = raises(DataError, [{"text": "a", "label": 1}], "['chosen', 'rejected']", "found ['text', 'label']")
    assert "Did you mean" not in message
    # a DataError is also a ValueError
    with pytest.raises(ValueError):
        load_pairs([{"prompt": "Q", "choosen": " a", "rejected": " b"}])


def test_prompt_column_that_does_not_exist_or_collides():
    rows = [{"question": "Review:", "chosen": " great", "rejected": " dull"}]
    assert list(load_pairs(rows, prompt_column="question")["prompt"]) == ["Review:"]
    # a typo must not silently fall back to the implicit-prompt form
    with pytest.raises(DataError) as info:
        load_pairs(rows, prompt_column="qestion")
    assert "prompt_column='qestion'" in str(info.value) and "Did you mean 'question'?" in str(info.value)
    both = [{"prompt": "P", "question": "Q", "chosen": " great", "rejected": " dull"}]
    with pytest.raises(DataError) as info:
        load_pairs(both, prompt_column="question")
    assert "'prompt'" in str(info.value) and "'question'" in str(info.value)


def test_columns_of_different_lengths():
    columns = {"prompt": ["a", "b"], "chosen": [" x"], "rejected": [" y", " z"]}
    raises(DataError, columns, "different lengths", "'chosen': 1", "'prompt': 2")


@pytest.mark.parametrize("missing", [None, float("nan"), np.nan])
def test_missing_response_names_row_and_column(missing):
    rows = [dict(GOOD), dict(GOOD), dict(GOOD, rejected=missing)]
    raises(DataError, rows, "Row 2", "'rejected'", "missing (None/NaN)")
    frame = pd.DataFrame([dict(GOOD), dict(GOOD, chosen=missing)])
    raises(DataError, frame, "Row 1", "'chosen'", "missing")


def test_missing_prompt_is_an_error_too():
    raises(DataError, [dict(GOOD), dict(GOOD, prompt=None)], "Row 1", "'prompt'", "missing")


@pytest.mark.parametrize("empty", ["", "   ", "\n\t "])
def test_empty_response(empty):
    raises(DataError, [dict(GOOD), dict(GOOD, chosen=empty)], "Row 1", "'chosen'", "empty response")


def test_empty_prompt_is_allowed_but_an_implicit_prompt_must_leave_a_response():
    assert load_pairs([dict(GOOD, prompt="")])["prompt"].iloc[0] == ""
    rows = [{"chosen": "The film was great", "rejected": "The film was great and long"}]
    raises(DataError, rows, "Row 0", "'chosen'", "nothing is left")


@pytest.mark.parametrize("value, type_name", [(5, "int"), (2.5, "float"), ({"text": "hi"}, "dict")])
def test_non_string_response(value, type_name):
    raises(DataError, [dict(GOOD), dict(GOOD, chosen=value)], "Row 1", "'chosen'", f"got {type_name}")


def test_whole_column_of_ints_in_a_frame():
    frame = pd.DataFrame({"prompt": ["a", "b"], "chosen": [1, 2], "rejected": [" x", " y"]})
    raises(DataError, frame, "Row 0", "'chosen'", "must be a string or a list of chat messages", "int64")


def test_list_of_strings_points_to_step_rewards():
    rows = [dict(GOOD, rejected=["First step.", "Second step."])]
    raises(DataError, rows, "Row 0", "'rejected'", "list of strings", "rmlab.step_rewards")


def test_malformed_chat_messages():
    no_role = dict(GOOD_CHAT, chosen=[{"content": "Great."}])
    raises(DataError, [GOOD_CHAT, no_role], "Row 1", "'chosen'", "message 0", "'role' and 'content'")
    no_content = dict(GOOD_CHAT, prompt=[USER, {"role": "user"}])
    raises(DataError, [no_content], "Row 0", "'prompt'", "message 1", "'role' and 'content'")
    not_a_dict = dict(GOOD_CHAT, rejected=[{"role": "assistant", "content": "ok"}, 3])
    raises(DataError, [not_a_dict], "'rejected'", "message 1")
    empty = dict(GOOD_CHAT, chosen=[])
    raises(DataError, [GOOD_CHAT, GOOD_CHAT, empty], "Row 2", "'chosen'", "message list is empty")
    bad_content = dict(GOOD_CHAT, chosen=[{"role": "assistant", "content": 7}])
    raises(DataError, [bad_content], "Row 0", "'chosen'", "'content' must be a string", "int")


@pytest.mark.parametrize("role, suggestion", [("asistant", "assistant"), ("usr", "user"), ("System", "system")])
def test_unknown_role_suggests_the_closest(role, suggestion):
    rows = [GOOD_CHAT, dict(GOOD_CHAT, rejected=[{"role": role, "content": "Dull."}])]
    raises(DataError, rows, "Row 1", "'rejected'", f"unknown role {role!r}", f"Did you mean {suggestion!r}?")


def test_unknown_role_without_a_close_match():
    rows = [dict(GOOD_CHAT, prompt=[{"role": "narrator", "content": "Once."}])]
    message = raises(DataError, rows, "Row 0", "'prompt'", "unknown role 'narrator'", "'assistant'")
    assert "Did you mean" not in message


def test_mixed_text_and_chat():
    within_row = dict(GOOD_CHAT, prompt="Rate the film.")  # text prompt, chat responses
    raises(DataError, [within_row], "Row 0", "mixes plain text and chat messages")
    across_rows = [GOOD, GOOD, GOOD_CHAT]
    raises(DataError, across_rows, "Row 2", "'chat'", "earlier rows are 'text'")
    raises(DataError, [GOOD_CHAT, GOOD], "Row 1", "'text'", "earlier rows are 'chat'")


@pytest.mark.parametrize(
    "data",
    [
        [],
        pd.DataFrame(columns=["prompt", "chosen", "rejected"]),
        {"prompt": [], "chosen": [], "rejected": []},
        {},
    ],
    ids=["list", "frame", "columns", "dict"],
)
def test_empty_data(data):
    raises(DataError, data, "empty", "at least one pair")


def test_empty_dataset_and_file(tmp_path):
    datasets = pytest.importorskip("datasets")
    empty = datasets.Dataset.from_dict({"prompt": [], "chosen": [], "rejected": []})
    raises(DataError, empty, "empty")
    (tmp_path / "empty.jsonl").write_text("\n\n", encoding="utf-8")
    raises(DataError, tmp_path / "empty.jsonl", "empty")


def test_unreadable_data_object():
    raises(DataError, 42, "Cannot read preference data from a int", "DataFrame")
    raises(DataError, [GOOD, "not a row"], "Row 1", "is a str", "must be a dict")


# --------------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------------
def test_nonexistent_file(tmp_path):
    path = tmp_path / "nowhere" / "pairs.jsonl"
    message = raises(DataFileError, path, str(path), "does not exist")
    assert "working directory" in message
    with pytest.raises(FileNotFoundError):  # what Python users catch for a missing file
        load_pairs(str(path))
    with pytest.raises(ValueError):
        load_pairs(str(path))


def test_jsonl_with_a_broken_line_names_the_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(
        '{"prompt": "a", "chosen": " b", "rejected": " c"}\n'
        "\n"  # blank lines are skipped but counted
        '{"prompt": "a", "chosen": " b", "rejected": " c"}\n'
        '{"prompt": "a", "chosen": " b", "rejected": \n',
        encoding="utf-8",
    )
    raises(DataFileError, path, str(path), "line 4 is not valid JSON", "one JSON object")
    path.write_text('{"prompt": "a", "chosen": " b", "rejected": " c"}\n[1, 2]\n', encoding="utf-8")
    raises(DataFileError, path, "line 2 holds a list")


def test_broken_json_and_parquet(tmp_path):
    path = tmp_path / "pairs.json"
    path.write_text('[{"prompt": "a", "chosen": " b",\n "rejected": }]', encoding="utf-8")
    raises(DataFileError, path, "not valid JSON", "line 2")
    path.write_text('"just a string"', encoding="utf-8")
    raises(DataFileError, path, "expected a list of records or a dict of columns", "str")
    bad = tmp_path / "pairs.parquet"
    bad.write_bytes(b"this is not parquet")
    raises(DataFileError, bad, "Could not parse", ".parquet")


@pytest.mark.parametrize("name", ["pairs.txt", "pairs.xlsx", "pairs"])
def test_unknown_file_suffix(name, tmp_path):
    path = tmp_path / name
    path.write_text("prompt,chosen,rejected\n", encoding="utf-8")
    raises(DataFileError, path, "unknown file type", "'.jsonl'", "'.parquet'", "DataFrame")


# --------------------------------------------------------------------------------------------------
# tokenisation
# --------------------------------------------------------------------------------------------------
def test_chat_data_with_a_tokenizer_without_chat_template(lm, no_forward):
    plain = tiny_tokenizer()
    plain.chat_template = None
    pairs = load_pairs([GOOD_CHAT])
    with pytest.raises(TokenizerError) as info:
        encode_pairs(pairs, plain)
    assert "no chat_template" in str(info.value) and "chat_template_kwargs" in str(info.value)
    with pytest.raises(TokenizerError, match="no chat_template"):
        rewards([GOOD_CHAT], lm, lm, plain)
    assert not no_forward
    # a template given through chat_template_kwargs is used instead
    from rmlab.toy import CHAT_TEMPLATE

    with_kwargs = encode_pairs(pairs, plain, chat_template_kwargs={"chat_template": CHAT_TEMPLATE})
    assert with_kwargs == encode_pairs(pairs, tiny_tokenizer())


def test_add_eos_without_eos_token(tok):
    no_eos = copy.deepcopy(tok)
    no_eos.eos_token = None
    with pytest.raises(TokenizerError, match="no eos_token.*add_eos=False"):
        encode_pairs(load_pairs([GOOD]), no_eos)
    assert len(encode_pairs(load_pairs([GOOD]), no_eos, add_eos=False)) == 1


@pytest.mark.parametrize(
    "mode, suggestion", [("keep-end", "keep_end"), ("keep_middle", None), ("left", None)]
)
def test_invalid_truncation_mode(mode, suggestion, tok, lm, no_forward):
    with pytest.raises(ArgumentError) as info:
        encode_pairs(load_pairs([GOOD]), tok, max_length=8, truncation_mode=mode)
    message = str(info.value)
    assert f"truncation_mode={mode!r}" in message and "['keep_start', 'keep_end']" in message
    if suggestion:
        assert f"Did you mean {suggestion!r}?" in message
    with pytest.raises(ArgumentError, match="truncation_mode"):
        rewards([GOOD], lm, lm, tok, truncation_mode=mode)
    assert not no_forward


@pytest.mark.parametrize("max_length", [0, 1, -5, 2.5, "16"])
def test_invalid_max_length(max_length, tok):
    with pytest.raises(DataError, match=r"max_length=.* must be an integer >= 2"):
        encode_pairs(load_pairs([GOOD]), tok, max_length=max_length)


# --------------------------------------------------------------------------------------------------
# arguments and models
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("beta", [0, -0.1, float("nan"), float("inf"), "abc", None])
def test_bad_beta(beta, tok, lm, no_forward):
    with pytest.raises(ArgumentError) as info:
        rewards([GOOD], lm, lm, tok, beta=beta)
    assert f"beta={beta!r}" in str(info.value) and "> 0" in str(info.value)
    assert not no_forward


def test_bad_beta_in_token_and_step_rewards(tok, lm, no_forward):
    with pytest.raises(ArgumentError, match="beta=nan"):
        rmlab.token_rewards(lm, lm, [GOOD], tokenizer=tok, beta=math.nan, progress=False)
    with pytest.raises(ArgumentError, match="beta=-1"):
        rmlab.step_rewards(lm, lm, [GOOD], tokenizer=tok, beta=-1, progress=False)
    assert not no_forward


def test_reference_none_without_reference_free(tok, lm, no_forward):
    with pytest.raises(ArgumentError) as info:
        rewards([GOOD], lm, None, tok)
    assert "reference=None" in str(info.value) and "reference_free=True" in str(info.value)
    with pytest.raises(ArgumentError, match="reference_free=True ignores the reference"):
        rewards([GOOD], lm, lm, tok, reference_free=True)
    assert not no_forward


def test_batch_tokens_must_be_positive(tok, lm, no_forward):
    with pytest.raises(ArgumentError, match="batch_tokens=0"):
        rewards([GOOD], lm, lm, tok, batch_tokens=0)
    assert not no_forward


def test_data_errors_come_before_models_run(tok, lm, no_forward):
    with pytest.raises(DataError, match="Row 1, column 'chosen'"):
        rewards([GOOD, dict(GOOD, chosen=" ")], lm, lm, tok)
    with pytest.raises(DataFileError, match="does not exist"):
        rewards("no/such/file.jsonl", lm, lm, tok)
    assert not no_forward


def test_sequence_classifier_is_not_a_policy(tok, lm, no_forward):
    from transformers import AutoModelForSequenceClassification, GPT2Config

    config = GPT2Config(vocab_size=384, n_embd=32, n_layer=1, n_head=2, n_positions=64, num_labels=1, pad_token_id=1)
    classifier = AutoModelForSequenceClassification.from_config(config)
    with pytest.raises(ModelError) as info:
        rewards([GOOD], classifier, lm, tok)
    message = str(info.value)
    assert "policy" in message and "GPT2ForSequenceClassification" in message
    assert "not a causal language model" in message and "AutoModelForCausalLM" in message
    assert isinstance(info.value, TypeError)
    with pytest.raises(ModelError, match="reference model is a GPT2ForSequenceClassification"):
        rewards([GOOD], lm, classifier, tok)
    assert not no_forward


def test_policy_and_reference_with_different_tokenizers(tmp_path, no_forward):
    for name, vocab in (("policy", 384), ("reference", 320)):
        tiny_causal_lm("gpt2", seed=0).save_pretrained(tmp_path / name)
        tiny_tokenizer(vocab).save_pretrained(tmp_path / name)
    with pytest.raises(TokenizerError) as info:
        rmlab.implicit_rewards(tmp_path / "policy", tmp_path / "reference", [GOOD], progress=False)
    message = str(info.value)
    assert "policy and reference tokenizers disagree" in message and "384 vs 320" in message
    assert not no_forward


def test_missing_model_path(tmp_path, tok, lm, no_forward):
    with pytest.raises(ModelError, match="Could not load the reference model"):
        rewards([GOOD], lm, str(tmp_path / "no-model-here"), tok)
    assert not no_forward


def test_tokenizer_bigger_than_the_model_vocabulary(tok, lm, no_forward):
    small = tiny_causal_lm("gpt2", vocab_size=300)
    with pytest.raises(TokenizerError) as info:
        rewards([GOOD], small, lm, tok)
    message = str(info.value)
    assert f"{len(tok)} tokens" in message and "policy model's output layer has only 300 rows" in message
    with pytest.raises(TokenizerError, match="reference model's output layer has only 300"):
        rewards([GOOD], lm, small, tok)
    assert not no_forward


def test_sequence_longer_than_the_context(tok):
    short = tiny_causal_lm("gpt2", n_positions=16)
    data = [GOOD, dict(GOOD, rejected=" the film was dull, slow and far too long; the ending made no sense")]
    assert len(encode_pairs(load_pairs(data), tok)[1].rejected.ids) > 16
    with pytest.raises(DataError) as info:
        rmlab.implicit_rewards(short, short, data, tokenizer=tok, progress=False)
    message = str(info.value)
    assert "Row 1, rejected" in message and "at most 16" in message and "max_length=16" in message
    # following the advice works, and the long pair is flagged
    frame = rmlab.implicit_rewards(short, short, data, tokenizer=tok, max_length=16, progress=False)
    assert list(frame["truncated"]) == [False, True]
    assert (frame["prompt_tokens"] + frame["tokens_rejected"] <= 16).all()
    np.testing.assert_allclose(frame["margin"], 0.0, atol=1e-6)  # same model on both sides
