"""Every ``>>>`` example in rmlab's docstrings runs and prints what it says."""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import pkgutil

import pytest

import rmlab

SKIPPED = ("rmlab.toy.build",)  # builds the toy world: minutes, covered by test_toy


def _has_examples(name: str) -> bool:
    """Whether the module's source holds a ``>>>`` prompt (read, not imported, at collection)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return False
    with open(spec.origin, encoding="utf-8") as f:
        return ">>> " in f.read()


ALL_MODULES = sorted(name for _, name, _ in pkgutil.walk_packages(rmlab.__path__, prefix="rmlab."))
MODULES = [name for name in ALL_MODULES if not name.startswith(SKIPPED) and _has_examples(name)]


def test_modules_with_examples_are_found():
    assert len(MODULES) >= 10, MODULES
    assert "rmlab.rewards.implicit" in MODULES and "rmlab.diagnostics.entanglement" in MODULES
    assert "rmlab.errors" not in MODULES  # no examples there: it would test nothing


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    tests = [t for t in finder.find(module, name) if t.examples]
    for test in tests:
        runner.run(test)
    results = runner.summarize(verbose=False)
    assert results.attempted > 0, f"{name} has '>>> ' in its source but no docstring example ran"
    assert results.failed == 0, f"{results.failed} of {results.attempted} docstring examples of {name} failed"
