"""Property tests: any text the loader accepts tokenises to responses that decode back to the text;
anything it refuses is refused with an RmlabError, never another exception. Each test also counts
what was accepted and requires a minimum share of it: a loader that refused everything would
otherwise pass them all."""

from __future__ import annotations

import sys
import warnings

import pytest

from rmlab.errors import RmlabError
from rmlab.io.pairs import load_pairs
from rmlab.io.tokenize import encode_pairs
from rmlab.toy import tiny_tokenizer

hypothesis = pytest.importorskip("hypothesis")  # a [test] dependency: in CI, tests/conftest.py requires it
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

TOK = tiny_tokenizer()
SPECIAL = set(TOK.all_special_ids)
TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)


def outcomes(check, *, max_examples: int, **strategies) -> list[bool]:
    """``check(**example)`` on generated examples (deterministic: derandomised, no example database);
    per example, whether the input was accepted (``check`` returned True) or refused with an
    RmlabError (False)."""
    seen: list[bool] = []

    @settings(max_examples=max_examples, deadline=None, derandomize=True, database=None)
    @given(**strategies)
    def run(**example):
        seen.append(bool(check(**example)))

    run()
    assert len(seen) >= max_examples // 2, f"only {len(seen)} examples were generated"
    return seen


def assert_share_accepted(seen: list[bool], minimum: float) -> None:
    accepted = sum(seen)
    assert accepted >= minimum * len(seen), (
        f"only {accepted} of {len(seen)} generated inputs were accepted (at least {minimum:.0%} expected)"
    )


# --------------------------------------------------------------------------------------------------
# plain text
# --------------------------------------------------------------------------------------------------
def check_text_pair(prompt, chosen, rejected) -> bool:
    try:
        pairs = load_pairs([{"prompt": prompt, "chosen": chosen, "rejected": rejected}])
        encoded = encode_pairs(pairs, TOK)
    except RmlabError:
        return False
    for side, text in (("chosen", chosen), ("rejected", rejected)):
        seq = getattr(encoded[0], side)
        decoded = TOK.decode(list(seq.ids))
        assert decoded == prompt + text + TOK.eos_token  # byte-level BPE round-trips exactly
        assert seq.start >= 1 and seq.response_ids[-1] == TOK.eos_token_id
        # Byte accounting (byte-level BPE: one character of a token string is one byte): the
        # unscored prefix and the scored tokens together are exactly prompt + response, and the
        # scored tokens cover the whole response, except that position 0 has no context and is never
        # scored (as in TRL), so a first token that straddles prompt and response stays unscored.
        def nbytes(ids):
            pieces = TOK.convert_ids_to_tokens(list(ids))
            return sum(len(piece) for piece, i in zip(pieces, ids) if i not in SPECIAL)

        prefix, scored = nbytes(seq.ids[: seq.start]), nbytes(seq.response_ids)
        assert prefix + scored == len((prompt + text).encode("utf-8"))
        assert prefix <= len(prompt.encode("utf-8")) or seq.start == 1
    return True


@pytest.mark.filterwarnings("ignore::rmlab.errors.DataWarning")  # the data is bad on purpose here
def test_text_pairs_decode_back_or_fail_cleanly():
    seen = outcomes(check_text_pair, max_examples=150, prompt=TEXT, chosen=TEXT, rejected=TEXT)
    assert_share_accepted(seen, 0.5)


def check_chat_pair(turns, chosen, rejected) -> bool:
    rows = [{"prompt": turns, "chosen": [{"role": "assistant", "content": chosen}],
             "rejected": [{"role": "assistant", "content": rejected}]}]
    try:
        encoded = encode_pairs(load_pairs(rows), TOK)
    except RmlabError:
        return False
    for seq in (encoded[0].chosen, encoded[0].rejected):
        assert 1 <= seq.start <= len(seq.ids)
    return True


@pytest.mark.filterwarnings("ignore::rmlab.errors.DataWarning")  # the data is bad on purpose here
def test_chat_pairs_never_fail_with_a_foreign_exception():
    seen = outcomes(
        check_chat_pair,
        max_examples=100,
        turns=st.lists(
            st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "robot"]), "content": TEXT}),
            min_size=0, max_size=3,
        ),
        chosen=TEXT,
        rejected=TEXT,
    )
    assert_share_accepted(seen, 0.3)
    assert not all(seen), "the unknown role 'robot' must be refused"


# --------------------------------------------------------------------------------------------------
# whitespace-only and unicode-heavy text

WHITESPACE = st.text(alphabet=" \t\n\r\x0b\x0c\u00a0\u1680\u2003\u2028\u3000\u200b\ufeff", max_size=8)
UNICODE = st.text(
    alphabet=st.characters(min_codepoint=0x80, blacklist_categories=("Cs",)), max_size=24
)  # every character multi-byte in UTF-8: combining marks, CJK, emoji, private use, unassigned
COMBINED = st.lists(st.one_of(TEXT, WHITESPACE, UNICODE), min_size=1, max_size=3).map("".join)


@pytest.mark.filterwarnings("ignore::rmlab.errors.DataWarning")  # the data is bad on purpose here
def test_whitespace_and_unicode_text_decode_back_or_fail_cleanly():
    text = st.one_of(WHITESPACE, UNICODE, COMBINED)
    seen = outcomes(check_text_pair, max_examples=120, prompt=text, chosen=text, rejected=text)
    assert_share_accepted(seen, 0.25)


# --------------------------------------------------------------------------------------------------
# chat structures: roles (valid and not), missing or malformed content, nesting, system messages,
# several turns, and the implicit-prompt form (no prompt column: the shared prefix is the prompt)

VALID_ROLES = st.sampled_from(["user", "assistant", "system", "tool", "developer"])
BAD_ROLES = st.sampled_from(["robot", "", "User", " user", "assistant "])
CONTENT = st.one_of(TEXT, WHITESPACE, UNICODE)
GOOD_MESSAGE = st.fixed_dictionaries({"role": VALID_ROLES, "content": CONTENT})
BAD_MESSAGE = st.one_of(
    st.fixed_dictionaries({"role": BAD_ROLES, "content": CONTENT}),  # unknown role
    st.fixed_dictionaries({"role": VALID_ROLES}),  # no content
    st.fixed_dictionaries({"content": TEXT}),  # no role
    st.fixed_dictionaries({"role": VALID_ROLES, "content": st.one_of(st.none(), st.integers(), st.floats())}),
    st.fixed_dictionaries({"role": VALID_ROLES, "content": st.lists(GOOD_MESSAGE, max_size=2)}),  # nested
    TEXT,  # a bare string among messages
    st.lists(GOOD_MESSAGE, min_size=1, max_size=2),  # a nested list of messages
    st.none(),
)


def mostly(good, bad, *, good_share: int = 8):
    """``good`` in ``good_share`` of 10 draws, else ``bad``: most examples get past validation."""
    return st.integers(0, 9).flatmap(lambda k: good if k < good_share else bad)


ASSISTANT = st.fixed_dictionaries({"role": st.just("assistant"), "content": CONTENT})
VALID_CONVERSATION = st.lists(GOOD_MESSAGE, min_size=0, max_size=4)  # system, multi-turn, empty
BROKEN_CONVERSATION = st.tuples(VALID_CONVERSATION, BAD_MESSAGE, st.integers(0, 4)).map(
    lambda t: t[0][: t[2]] + [t[1]] + t[0][t[2]:]
)
CONVERSATION = mostly(VALID_CONVERSATION, BROKEN_CONVERSATION)
VALID_COMPLETION = st.one_of(
    st.lists(ASSISTANT, min_size=1, max_size=1),
    st.tuples(ASSISTANT, st.lists(GOOD_MESSAGE, max_size=2), ASSISTANT).map(lambda t: [t[0], *t[1], t[2]]),
)
COMPLETION = mostly(VALID_COMPLETION, st.one_of(BROKEN_CONVERSATION, TEXT, st.none(), st.just([])))


def _render(messages, generation: bool) -> str:
    return TOK.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)


def _check_chat(encoded, pairs) -> None:
    """Every scored token lies inside the completion's rendering, and all of it is scored."""
    row = pairs.iloc[0]
    prompt = list(row["prompt"] or [])
    for side in ("chosen", "rejected"):
        seq = getattr(encoded[0], side)
        assert 1 <= seq.start <= len(seq.ids)
        full = _render(prompt + list(row[side]), generation=False)
        head = TOK.decode(list(seq.ids[: seq.start]))
        tail = TOK.decode(list(seq.response_ids))
        assert TOK.decode(list(seq.ids)) == full  # the template's text, token for token
        assert head + tail == full  # the split never cuts a character
        rendered_prompt = _render(prompt, generation=True) if prompt else ""
        # the unscored part is (a prefix of) the prompt: the whole completion is scored ...
        assert rendered_prompt.startswith(head) or len(head) <= len(TOK.decode(list(seq.ids[:1])))
        # ... and what is scored ends with the completion's last message
        last = row[side][-1]
        assert tail.endswith(last["content"] + "<|im_end|>\n")


def check_chat_rows(rows) -> bool:
    """Accepted chat rows score the completion (checked); text rows pass through; refusals are clean."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # identical chosen/rejected warn; that is not a failure
            pairs = load_pairs(rows)
            encoded = encode_pairs(pairs, TOK)
    except RmlabError:
        return False
    if pairs.attrs["format"] == "chat":
        _check_chat(encoded, pairs)
    return True


def test_chat_structures_score_the_completion_or_fail_cleanly():
    def check(prompt, chosen, rejected):
        return check_chat_rows([{"prompt": prompt, "chosen": chosen, "rejected": rejected}])

    seen = outcomes(
        check, max_examples=150, prompt=mostly(CONVERSATION, st.one_of(TEXT, st.none())),
        chosen=COMPLETION, rejected=COMPLETION,
    )
    assert_share_accepted(seen, 0.2)
    assert not all(seen), "broken conversations must be refused"


def test_implicit_prompt_chat_scores_the_completion_or_fails_cleanly():
    """No prompt column: chosen and rejected are whole conversations that start alike."""
    def check(shared, chosen, rejected):
        def whole(tail):
            return shared + tail if isinstance(tail, list) else tail

        return check_chat_rows([{"chosen": whole(chosen), "rejected": whole(rejected)}])

    seen = outcomes(check, max_examples=100, shared=CONVERSATION, chosen=COMPLETION, rejected=COMPLETION)
    assert_share_accepted(seen, 0.2)
    assert not all(seen), "broken conversations must be refused"


def test_a_loader_that_refuses_everything_fails_these_tests(monkeypatch):
    def refuse(*args, **kwargs):
        raise RmlabError("refused")

    monkeypatch.setattr(sys.modules[__name__], "load_pairs", refuse)
    seen = outcomes(check_text_pair, max_examples=20, prompt=TEXT, chosen=TEXT, rejected=TEXT)
    assert not any(seen)
    with pytest.raises(AssertionError, match="only 0 of"):
        assert_share_accepted(seen, 0.5)
