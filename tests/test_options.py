"""rmlab.Options: validated once, given flat or as one object, unknown keywords named."""

from __future__ import annotations

import inspect

import pytest
import torch

from rmlab.errors import ArgumentError
from rmlab.options import OPTION_NAMES, Options, resolve_options, with_options


@with_options("max_length", "batch_tokens", "progress", defaults={"progress": False})
def analysis(model, data, *, beta: float = 0.1, options: Options):
    return model, data, beta, options


def test_flat_keywords_and_the_options_object_give_one_options():
    _, _, beta, opts = analysis("m", "d", beta=0.5, max_length=64)
    assert beta == 0.5 and opts.max_length == 64 and opts.batch_tokens is None
    base = Options(max_length=32, batch_tokens=128, dtype="bfloat16")
    _, _, _, opts = analysis("m", "d", options=base, max_length=16)
    assert (opts.max_length, opts.batch_tokens, opts.dtype) == (16, 128, "bfloat16"), "flat keywords win"
    assert base.max_length == 32, "the caller's object is not changed"


def test_a_function_default_applies_unless_the_caller_sets_it():
    assert analysis("m", "d")[3].progress is False
    assert analysis("m", "d", progress=True)[3].progress is True
    assert analysis("m", "d", options=Options())[3].progress is True, "a given object is used as it is"


@pytest.mark.parametrize(
    "call, needle",
    [
        (lambda: analysis("m", "d", max_lenght=3), "unexpected keyword argument 'max_lenght'. Did you mean 'max_length'"),
        (lambda: analysis("m", "d", bta=3), "Did you mean 'beta'"),
        (lambda: analysis("m", "d", options={"max_length": 3}), "must be an rmlab.Options"),
        (lambda: Options(max_length=0), "max_length=0 must be a positive integer"),
        (lambda: Options(batch_tokens=True), "batch_tokens=True must be a positive integer"),
        (lambda: Options(truncation_mode="keep_middle"), "truncation_mode='keep_middle' is not supported"),
        (lambda: Options(add_eos="yes"), "add_eos='yes' must be True, False or None"),
        (lambda: Options(progress=None), "progress=None must be True or False"),
        (lambda: Options(chat_template_kwargs=["a"]), "chat_template_kwargs=.* must be a dict"),
        (lambda: Options(cache_dir=3), "cache_dir=3 must be a folder path"),
        (lambda: Options(device=0), "device=0 must be"),
        (lambda: Options(dtype=16), "dtype=16 must be"),
        (lambda: Options(runner="ray"), "runner='ray' is not supported"),
        (lambda: Options().replace(batch_token=5), "Did you mean 'batch_tokens'"),
    ],
)
def test_bad_options_are_refused_with_the_fix(call, needle):
    with pytest.raises(ArgumentError, match=needle):
        call()


def test_the_signature_lists_the_flat_option_keywords():
    sig = inspect.signature(analysis)
    assert list(sig.parameters) == ["model", "data", "beta", "options", "max_length", "batch_tokens", "progress"]
    assert sig.parameters["progress"].default is False
    assert sig.parameters["options"].default is None
    assert sig.parameters["max_length"].default is None


def test_options_views_for_loading_and_tokenizing():
    opts = Options(dtype=torch.bfloat16, revision="main", chat_template_kwargs={"enable_thinking": False})
    assert opts.loading == dict(device="auto", dtype=torch.bfloat16, trust_remote_code=False, use_safetensors=True, revision="main")
    assert opts.tokenizing["chat_template_kwargs"] == {"enable_thinking": False}
    assert set(opts.loading) | set(opts.tokenizing) < set(OPTION_NAMES)
    assert resolve_options(None) == Options()


def test_import_rmlab_gives_the_toy_world_and_loads_the_report_on_first_use():
    import subprocess
    import sys

    code = (
        "import sys, rmlab; assert callable(rmlab.toy.load); "
        "assert 'rmlab.report_page' not in sys.modules; assert callable(rmlab.html_report); "
        "assert 'rmlab.report_page' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_reward_analyses_take_options_flat_or_as_one_object():
    import pandas as pd

    import rmlab
    from rmlab.toy import tiny_reward_model, tiny_tokenizer
    from tests.conftest import make_pairs

    rm, tok, pairs = tiny_reward_model("gpt2", seed=2), tiny_tokenizer(), make_pairs(4, seed=9)
    opts = Options(tokenizer=tok, batch_tokens=64, progress=False)
    for analysis in (rmlab.reward_scores, rmlab.dense_rewards):
        flat = analysis(rm, pairs, tokenizer=tok, batch_tokens=64, progress=False)
        pd.testing.assert_frame_equal(analysis(rm, pairs, options=opts), flat, check_exact=True)
        with pytest.raises(ArgumentError, match="Did you mean 'batch_tokens'"):
            analysis(rm, pairs, options=opts, batch_token=3)


def test_the_callers_options_object_is_not_changed_and_an_inner_call_keeps_what_was_chosen():
    mine = Options(max_length=32)
    _, _, _, got = analysis("m", "d", options=mine)
    assert not hasattr(mine, "given") and got is not mine
    _, _, _, outer = analysis("m", "d", max_length=8)
    assert outer.given == ("max_length",)
    _, _, _, inner = analysis("m", "d", options=outer, batch_tokens=16)
    assert inner.given == ("max_length", "batch_tokens"), "a call handed an rmlab-made object keeps its record"
