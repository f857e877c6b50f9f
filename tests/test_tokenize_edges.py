"""Edges of tokenisation where a reward could silently differ from TRL or from the papers:
``keep_end`` truncation that cuts into the prompt, tokens that merge across the prompt/response
boundary on one side of a pair only, and step delimiters that merge with the next word."""

from __future__ import annotations

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import rmlab
from rmlab.io.pairs import load_pairs
from rmlab.io.tokenize import encode_pairs
from rmlab.rewards.steps import _step_ends
from tests.conftest import hand_tokenise, response_logprobs
from tests.trl_reference import TRL_FILTER, trl_scored, trl_tokenised

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings(TRL_FILTER)]

SIDES = ("chosen", "rejected")


# --------------------------------------------------------------------------------------------------
# keep_end truncation that cuts into the prompt
# --------------------------------------------------------------------------------------------------
ROW = {"prompt": "Review:", "chosen": " great film", "rejected": " dull film"}


@pytest.mark.parametrize("cut", [1, 2])  # the BOS alone; the BOS and the prompt's first token
def test_keep_end_into_the_prompt_is_truncated(cut, bos_tok, tmp_path):
    """Only the prompt loses tokens (its BOS first): every response token is still scored, but in a
    shorter context, so the pair must say it was truncated. Ids and scored positions are TRL's."""
    full = hand_tokenise(bos_tok, ROW)  # written out from scratch in tests/conftest.py
    ids, start = full["chosen"]
    assert ids[0] == bos_tok.bos_token_id and len(ids) == len(full["rejected"][0])
    max_length = len(ids) - cut
    pair = encode_pairs(load_pairs([ROW]), bos_tok, max_length=max_length, truncation_mode="keep_end")[0]
    for side in SIDES:
        seq, (side_ids, _) = getattr(pair, side), full[side]
        assert list(seq.ids) == side_ids[cut:] and seq.start == start - cut
        assert list(seq.response_ids) == side_ids[start:]  # the whole response is kept ...
        assert seq.truncated  # ... but its context is not the one the untruncated pair has
    assert pair.truncated

    examples = trl_tokenised(bos_tok, [ROW], tmp_path)
    scored = trl_scored(examples, bos_tok, max_length=max_length, truncation_mode="keep_end")
    for (trl_ids, trl_positions), seq in zip(scored, (pair.chosen, pair.rejected)):
        assert list(seq.ids) == trl_ids and trl_positions == list(range(seq.start, len(seq.ids)))


def test_keep_end_that_cuts_nothing_is_not_truncated(bos_tok):
    full = hand_tokenise(bos_tok, ROW)
    max_length = max(len(ids) for ids, _ in full.values())
    pair = encode_pairs(load_pairs([ROW]), bos_tok, max_length=max_length, truncation_mode="keep_end")[0]
    assert not pair.truncated and list(pair.chosen.ids) == full["chosen"][0]


def test_keep_end_into_the_prompt_in_the_frame(policy, reference, bos_tok):
    """``implicit_rewards`` flags the pair, and its log-probs are those of the cut sequence (the
    model's own forward on it alone), not of the whole one."""
    full = hand_tokenise(bos_tok, ROW)
    max_length = len(full["chosen"][0]) - 1
    frame = rmlab.implicit_rewards(
        policy, reference, [ROW], tokenizer=bos_tok, max_length=max_length, truncation_mode="keep_end",
        progress=False,
    )
    assert bool(frame["truncated"].iloc[0])
    for side in SIDES:
        ids, start = full[side]
        cut = len(ids) - max_length
        expected = response_logprobs(policy, ids[cut:], start - cut).sum()
        assert frame[f"logps_{side}"].iloc[0] == pytest.approx(expected, abs=1e-4)
        assert abs(expected - response_logprobs(policy, ids, start).sum()) > 1e-3  # the cut matters


# --------------------------------------------------------------------------------------------------
# a token that merges across the prompt/response boundary on one side only
# --------------------------------------------------------------------------------------------------
ONE_SIDED = [
    # the prompt's trailing space merges with "great" (" g"), not with " dull" (" ", " d")
    {"prompt": "Review: ", "chosen": "great film", "rejected": " dull film"},
    # "gr" alone is " g" + "r"; "gr" + "eat." is " g" + "re" + "at": the chosen side merges
    {"prompt": "Review: the film was gr", "chosen": "eat.", "rejected": " dull."},
    # the same with the sides swapped
    {"prompt": "Review: the film was gr", "chosen": " dull.", "rejected": "eat."},
]


def _prefix(a, b) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@pytest.mark.parametrize("bos", [False, True])
@pytest.mark.parametrize("max_length, mode", [(None, "keep_start"), (11, "keep_start"), (7, "keep_end")])
def test_one_sided_merge_is_scored_as_trl_scores_it(bos, max_length, mode, tok, bos_tok, tmp_path):
    """TRL 1.16 takes one completion start for both sides: the minimum over chosen and rejected of
    where prompt and prompt+completion ids diverge. The side that does not merge then scores the
    prompt's last token(s) too; rmlab scores exactly TRL's tokens, in the same contexts."""
    tokenizer = bos_tok if bos else tok
    eos = tokenizer.eos_token
    encoded = encode_pairs(load_pairs(ONE_SIDED), tokenizer, max_length=max_length, truncation_mode=mode)
    examples = trl_tokenised(tokenizer, ONE_SIDED, tmp_path)
    assert len(examples) == len(ONE_SIDED)
    scored = trl_scored(examples, tokenizer, max_length=max_length, truncation_mode=mode)
    n = len(ONE_SIDED)
    assert any(p.truncated for p in encoded) == (max_length is not None)  # truncation is exercised
    for i, (row, pair) in enumerate(zip(ONE_SIDED, encoded)):
        alone = tokenizer(row["prompt"])["input_ids"]
        starts = {s: _prefix(alone, tokenizer(row["prompt"] + row[s] + eos)["input_ids"]) for s in SIDES}
        merged = min(starts, key=starts.get)
        other = "rejected" if merged == "chosen" else "chosen"
        assert starts[merged] < starts[other] == len(alone), (i, "the case is exercised")
        for k, side in ((i, "chosen"), (n + i, "rejected")):
            seq = getattr(pair, side)
            trl_ids, trl_positions = scored[k]
            assert list(seq.ids) == trl_ids, (i, side)
            assert list(range(seq.start, len(seq.ids))) == trl_positions, (i, side)
        if max_length is None:
            # the side that does not merge scores the end of the prompt before its own text
            tail = tokenizer.decode(alone[starts[merged] :])
            assert tokenizer.decode(getattr(pair, other).response_ids) == tail + row[other] + eos
            assert tokenizer.decode(getattr(pair, merged).response_ids).endswith(row[merged] + eos)


# --------------------------------------------------------------------------------------------------
# step delimiters that merge with the next word
# --------------------------------------------------------------------------------------------------
STEPS = {"prompt": "Review:", "chosen": " First the plot was slow. Then the cast was great. So I liked it.",
         "rejected": " It was dull."}


def test_step_after_a_merged_delimiter_starts_with_its_word(policy, reference, tok):
    """Delimiter ". ": the tokenizer merges its space with "Then" (" The"), but not with "So" (" ",
    "S"). The word after each delimiter, and its reward, belong to the next step; the merged token
    opens it. Steps cut by hand from the token list, rewards from brute-force log-probs."""
    beta = 0.5
    frame = rmlab.step_rewards(policy, reference, [STEPS], tokenizer=tok, beta=beta, delimiter=". ",
                               progress=False)
    ids, start = hand_tokenise(tok, STEPS)["chosen"]
    response = ids[start:]
    texts = [tok.decode([t]) for t in response]
    then, so = texts.index(" The"), texts.index("S")  # " The" merged the delimiter's space; "S" did not
    assert texts[then - 1] == "." and texts[so - 1] == " " and texts[so - 2] == "."
    begins, ends = [0, then, so], [then - 1, so - 1, len(response) - 1]
    per_token = beta * (response_logprobs(policy, ids, start) - response_logprobs(reference, ids, start))
    rewards = np.array([per_token[b : e + 1].sum() for b, e in zip(begins, ends)])

    got = frame[frame.side == "chosen"]
    assert list(got["text"]) == [
        " First the plot was slow.", " Then the cast was great. ", "So I liked it." + tok.eos_token
    ]
    assert list(got["tokens"]) == [e + 1 - b for b, e in zip(begins, ends)]
    np.testing.assert_allclose(got["reward"], rewards, rtol=0, atol=1e-5)
    np.testing.assert_allclose(got["value"], np.cumsum(rewards), rtol=0, atol=1e-5)
    np.testing.assert_allclose(got["min_step_reward"], rewards.min(), rtol=0, atol=1e-5)


def merging_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE without pre-tokenizer splits whose merges join "\\n\\n" and "Then" into one
    token, as tokenizers trained without whitespace splitting can."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = [("Ċ", "Ċ"), ("T", "h"), ("e", "n"), ("Th", "en"), ("ĊĊ", "Then")]
    vocab = {c: i for i, c in enumerate(alphabet)}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<eos>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def test_delimiter_inside_a_token_with_the_next_word():
    """The whole delimiter "\\n\\n" and the next word are one token: it opens the next step (the step
    before ends with "."); a delimiter that is a token of its own closes its step."""
    tok = merging_tokenizer()
    ids = tok("Go.\n\nThen stop.\n\nEnd.<eos>")["input_ids"]
    texts = [tok.decode([t]) for t in ids]
    assert texts[:5] == ["G", "o", ".", "\n\nThen", " "] and texts[10] == "\n\n"
    assert _step_ends(tok, ids, "\n\n") == [2, 10, len(ids) - 1]
    # a trailing delimiter starts no step, nor does the empty text between two delimiters
    tail = tok("Go.\n\n")["input_ids"]
    assert _step_ends(tok, tail, "\n\n") == [len(tail) - 1]
    double = tok("Go.\n\n\n\nThen.")["input_ids"]
    assert [tok.decode([t]) for t in double][3:5] == ["\n\n", "\n\nThen"]
    assert _step_ends(tok, double, "\n\n") == [3, len(double) - 1]
