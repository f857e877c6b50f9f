"""Property tests: any text the loader accepts tokenises to responses that decode back to the text;
anything it refuses is refused with an RmlabError, never another exception."""

from __future__ import annotations

import pytest

from rmlab.errors import RmlabError
from rmlab.io.pairs import load_pairs
from rmlab.io.tokenize import encode_pairs
from rmlab.toy import tiny_tokenizer

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

TOK = tiny_tokenizer()
SPECIAL = set(TOK.all_special_ids)
TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(prompt=TEXT, chosen=TEXT, rejected=TEXT)
def test_text_pairs_decode_back_or_fail_cleanly(prompt, chosen, rejected):
    try:
        pairs = load_pairs([{"prompt": prompt, "chosen": chosen, "rejected": rejected}])
        encoded = encode_pairs(pairs, TOK)
    except RmlabError:
        return
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


@settings(max_examples=100, deadline=None, derandomize=True)
@given(
    turns=st.lists(
        st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "robot"]), "content": TEXT}),
        min_size=0, max_size=3,
    ),
    chosen=TEXT,
    rejected=TEXT,
)
def test_chat_pairs_never_fail_with_a_foreign_exception(turns, chosen, rejected):
    rows = [{"prompt": turns, "chosen": [{"role": "assistant", "content": chosen}],
             "rejected": [{"role": "assistant", "content": rejected}]}]
    try:
        encoded = encode_pairs(load_pairs(rows), TOK)
    except RmlabError:
        return
    for seq in (encoded[0].chosen, encoded[0].rejected):
        assert 1 <= seq.start <= len(seq.ids)
