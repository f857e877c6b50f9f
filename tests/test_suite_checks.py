"""The suite's own rules work: deprecation warnings from rmlab code fail tests (pyproject's
filterwarnings and the transformers-log check of tests/conftest.py), and in CI a missing test
dependency stops the run instead of skipping tests."""

from __future__ import annotations

import warnings

import pytest

import tests.conftest as suite
from rmlab.toy import tiny_causal_lm

# the message transformers 5 logs (once, through its logger) when code uses the old cache names
OLD_CACHE_NAME = "`past_key_values`/`cache_params` are deprecated. Use `cache` instead."
LOGGED = "logged by transformers.utils.generic (called from rmlab.engine.probe:2)"


def module_function(module: str, source: str):
    """The function ``f`` defined by ``source`` as if it lived in ``module`` (warnings and stack
    inspection see that module name)."""
    namespace = {"__name__": module, "warnings": warnings}
    exec(compile(source, f"<{module}>", "exec"), namespace)
    return namespace["f"]


@pytest.mark.parametrize("category", [DeprecationWarning, FutureWarning])
def test_deprecation_warnings_attributed_to_rmlab_are_errors(category):
    raised_in_rmlab = module_function("rmlab.engine.probe", "def f(c):\n    warnings.warn('old', c)\n")
    with pytest.raises(category, match="old"):
        raised_in_rmlab(category)
    # a library function that warns about its caller (stacklevel=2), called from rmlab
    library = module_function("transformers.probe", "def f(c):\n    warnings.warn('old api', c, stacklevel=2)\n")
    caller = module_function("rmlab.rewards.probe", "def f(lib, c):\n    lib(c)\n")
    with suite.TransformersDeprecations() as seen, pytest.raises(category, match="old api"):
        caller(library, category)
    assert seen.messages  # (the conftest check sees it too; this block keeps it from failing the test)
    # elsewhere they stay warnings, and modules merely named like rmlab are not rmlab
    for module in ("transformers.probe", "rmlabx.probe"):
        with pytest.warns(category, match="old"):
            module_function(module, "def f(c):\n    warnings.warn('old', c)\n")(category)


def test_transformers_deprecation_logs_are_caught_only_under_rmlab():
    from transformers.modeling_outputs import CausalLMOutputWithPast

    reads_old_name = module_function("rmlab.engine.probe", "def f(out):\n    return out.past_key_values\n")
    with suite.TransformersDeprecations() as seen:
        reads_old_name(CausalLMOutputWithPast(logits=None))
    assert seen.messages == [f"{LOGGED}: {OLD_CACHE_NAME}"]
    with suite.TransformersDeprecations() as again:  # warning_once is re-armed for every check
        reads_old_name(CausalLMOutputWithPast(logits=None))
        CausalLMOutputWithPast(logits=None).past_key_values  # test code, not rmlab: not counted
    assert len(again.messages) == 1
    with suite.TransformersDeprecations() as outside:
        CausalLMOutputWithPast(logits=None).past_key_values
    assert outside.messages == []


def test_transformers_deprecation_warnings_are_caught_only_under_rmlab():
    """A FutureWarning that transformers raises and attributes to its own frames (what a forward
    with the old ``past_key_values=`` argument does) escapes pyproject's filterwarnings."""
    import torch

    model = tiny_causal_lm("gpt2", seed=0)
    ids = torch.tensor([[3, 4, 5]])
    forward = module_function("rmlab.engine.probe", "def f(model, **kw):\n    return model(**kw)\n")
    with suite.TransformersDeprecations() as seen, pytest.warns(FutureWarning, match="past_key_values"):
        forward(model, input_ids=ids, past_key_values=None)
    assert len(seen.messages) == 1 and seen.messages[0].startswith("FutureWarning raised in transformers.")
    assert "`past_key_values` is deprecated" in seen.messages[0]
    with suite.TransformersDeprecations() as clean, warnings.catch_warnings():
        warnings.simplefilter("error")
        forward(model, input_ids=ids)  # the current API: nothing
    assert clean.messages == []
    with suite.TransformersDeprecations() as outside, pytest.warns(FutureWarning, match="past_key_values"):
        model(input_ids=ids, past_key_values=None)  # test code, not rmlab: not counted
    assert outside.messages == []
    assert warnings.warn is suite._warn  # (the block around every test is still open)
    # stacklevel still points where it should through the wrapper
    library = module_function("transformers.probe", "def f():\n    warnings.warn('x', FutureWarning, stacklevel=2)\n")
    with suite.TransformersDeprecations(), pytest.warns(FutureWarning) as record:
        library()
    assert record[0].filename == __file__


INNER_TESTS = f'''
import warnings

from transformers.modeling_outputs import CausalLMOutputWithPast


def from_rmlab(source):
    namespace = {{"__name__": "rmlab.engine.probe"}}
    exec(source, namespace)
    return namespace["f"]


def test_rmlab_reads_an_old_cache_name():
    from_rmlab("def f(out):\\n    return out.past_key_values\\n")(CausalLMOutputWithPast(logits=None))


def test_test_code_reads_an_old_cache_name():
    CausalLMOutputWithPast(logits=None).past_key_values


def test_rmlab_logs_nothing_deprecated():
    from_rmlab("def f(out):\\n    return out.cache\\n")(CausalLMOutputWithPast(logits=None))


def test_rmlab_calls_a_forward_with_an_old_argument():
    from rmlab.toy import tiny_causal_lm
    import torch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ignoring it in a test does not keep it from users: still fails
        from_rmlab("def f(m, ids):\\n    return m(input_ids=ids, past_key_values=None)\\n")(
            tiny_causal_lm("gpt2"), torch.tensor([[3, 4]])
        )
'''


def test_a_logged_deprecation_fails_the_test_it_happens_in(pytester, monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    pytester.makepyfile(test_inner=INNER_TESTS)
    result = pytester.runpytest_inprocess("-p", "tests.conftest", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, failed=2)
    result.stdout.fnmatch_lines(["FAILED*test_rmlab_reads_an_old_cache_name*"])
    result.stdout.fnmatch_lines(["FAILED*test_rmlab_calls_a_forward_with_an_old_argument*"])
    result.stdout.fnmatch_lines(["*transformers warned of a deprecation during the test, called from rmlab code*"])
    result.stdout.fnmatch_lines([f"*{LOGGED}: {OLD_CACHE_NAME[:20]}*"])
    result.stdout.fnmatch_lines(["*FutureWarning raised in transformers.*past_key_values* is deprecated*"])


def test_missing_test_dependencies_are_named():
    problems = suite.missing_test_dependencies(
        ["pytest>=8", "rmlab-no-such-package>=1", "pytest>=999", 'pytest>=999; python_version < "3"']
    )
    assert len(problems) == 2, problems
    assert problems[0].startswith("rmlab-no-such-package>=1: not installed")
    assert problems[1].startswith("pytest>=999: version ")
    requirements = suite.extra_requirements()
    assert any(r.startswith("trl") for r in requirements) and any(r.startswith("hypothesis") for r in requirements)


@pytest.mark.parametrize("ci", ["1", "true", None])
def test_in_ci_a_missing_test_dependency_stops_the_run(ci, pytester, monkeypatch):
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    monkeypatch.setattr(suite, "extra_requirements", lambda: ["pytest>=8", "rmlab-no-such-package>=1"])
    pytester.makepyfile(test_inner="def test_nothing():\n    pass\n")
    result = pytester.runpytest_inprocess("-p", "tests.conftest", "-p", "no:cacheprovider")
    if ci is None:
        result.assert_outcomes(passed=1)
    else:
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        result.stderr.fnmatch_lines(["*rmlab-no-such-package>=1: not installed*"])
