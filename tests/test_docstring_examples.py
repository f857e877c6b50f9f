"""Every ``>>>`` example in rmlab's docstrings runs and prints what it says."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import rmlab

MODULES = sorted(
    name for _, name, _ in pkgutil.walk_packages(rmlab.__path__, prefix="rmlab.")
    if not name.startswith("rmlab.toy.build")  # builds the toy world: minutes, covered by test_toy
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    tests = [t for t in finder.find(module, name) if t.examples]
    for test in tests:
        runner.run(test)
    results = runner.summarize(verbose=False)
    assert results.failed == 0, f"{results.failed} of {results.attempted} docstring examples of {name} failed"
