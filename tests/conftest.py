"""Shared fixtures: tiny tokenizers, models and preference pairs, all built offline; brute-force
log-probs for tests to compare with; and two checks on the suite itself:

- with the environment variable ``CI`` set, every package of pyproject's ``[test]`` extra must be
  installed (in a version the extra allows) and importable, or the run stops before any test: in CI a
  missing test dependency is an error, never a skipped test;
- a deprecation warning of transformers while rmlab code is on the call stack (logged through its
  loggers, or raised and attributed to transformers itself, both out of reach of pyproject's
  ``filterwarnings``) fails the test, so that it is fixed before it reaches users.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import random
import re
import sys
import warnings
from pathlib import Path

import pytest

from rmlab.toy import tiny_causal_lm, tiny_tokenizer

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


# --------------------------------------------------------------------------------------------------
# CI: a missing test dependency fails the run
# --------------------------------------------------------------------------------------------------
def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def extra_requirements(extra: str = "test", path: Path = PYPROJECT) -> list[str]:
    """The requirement strings of an extra (``[test]``) in ``pyproject.toml``."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: pytest itself depends on tomli there
        import tomli as tomllib
    with open(path, "rb") as f:
        return list(tomllib.load(f)["project"]["optional-dependencies"][extra])


def missing_test_dependencies(requirements: list[str]) -> list[str]:
    """One line per requirement that is not installed, installed in a version it excludes, or whose
    modules cannot be found on ``sys.path``."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    modules: dict[str, list[str]] = {}
    for module, dists in importlib.metadata.packages_distributions().items():
        for dist in dists:
            modules.setdefault(canonicalize_name(dist), []).append(module)
    problems = []
    for line in requirements:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate({"extra": "test"}):
            continue
        try:
            version = importlib.metadata.version(req.name)
        except importlib.metadata.PackageNotFoundError:
            problems.append(f"{line}: not installed")
            continue
        if not req.specifier.contains(version, prereleases=True):
            problems.append(f"{line}: version {version} is installed")
            continue
        names = [m for m in modules.get(canonicalize_name(req.name), []) if not m.startswith("_")]
        names = names or [req.name.replace("-", "_")]
        if not any(_findable(m) for m in names):
            problems.append(f"{line}: installed but none of its modules ({', '.join(names)}) is importable")
    return problems


def _findable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken parent package, or a module blocked in sys.modules
        return False


def pytest_sessionstart(session):
    if not in_ci():
        return
    problems = missing_test_dependencies(extra_requirements())
    if problems:
        raise pytest.UsageError(
            "CI is set, and these [test] dependencies of pyproject.toml are missing, so their tests "
            "would be skipped instead of run:\n  " + "\n  ".join(problems)
            + '\nInstall them with  pip install -e ".[test]"  (or unset CI to let those tests skip).'
        )


# --------------------------------------------------------------------------------------------------
# transformers' deprecation warnings, when rmlab code calls the deprecated API
# --------------------------------------------------------------------------------------------------
def called_from_rmlab(frame=None) -> str | None:
    """``module:line`` of the innermost frame of an rmlab module on the call stack (from ``frame``
    outwards), or None."""
    frame = frame or sys._getframe(1)
    while frame is not None:
        name = frame.f_globals.get("__name__") or ""
        if name == "rmlab" or name.startswith("rmlab."):
            return f"{name}:{frame.f_lineno}"
        frame = frame.f_back
    return None


_WARN = warnings.warn


def _warn(message, category=None, stacklevel=1, source=None, **kwargs):
    """``warnings.warn``, and the innermost :class:`TransformersDeprecations` block sees the call."""
    if TransformersDeprecations.active:
        TransformersDeprecations.active[-1].warned(message, category, sys._getframe(1))
    return _WARN(message, category, stacklevel + 1, source, **kwargs)  # + 1: this frame


class TransformersDeprecations(logging.Handler):
    """Collects, within a ``with`` block, the deprecation warnings of transformers that come while rmlab
    code is on the call stack (what a user of rmlab would see and could not fix): messages its
    loggers log (``logger.warning`` / ``warning_once``), and DeprecationWarning / FutureWarning that
    transformers code raises with ``warnings.warn`` at a stack level inside transformers (pyproject's
    ``filterwarnings`` entries match the module a warning is attributed to, so they see only those
    attributed to rmlab). A warning counts even where a filter of the test ignores it: filters in
    the tests do not protect users. When blocks nest, the innermost one collects: a test that
    provokes such a warning on purpose, inside its own block, does not fail through the block around
    it."""

    PATTERN = re.compile(r"deprecat|will be removed", re.IGNORECASE)
    active: list[TransformersDeprecations] = []

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        if self.active[-1] is not self:
            return
        message = record.getMessage()
        where = self.PATTERN.search(message) and called_from_rmlab()
        if where:
            self.messages.append(f"logged by {record.name} (called from {where}): {message}")

    def warned(self, message, category, caller):
        category = type(message) if isinstance(message, Warning) else (category or UserWarning)
        module = caller.f_globals.get("__name__") or ""
        where = (
            issubclass(category, (DeprecationWarning, FutureWarning))
            and (module == "transformers" or module.startswith("transformers."))
            and called_from_rmlab(caller)
        )
        if where:
            self.messages.append(f"{category.__name__} raised in {module} (called from {where}): {message}")

    def __enter__(self):
        # warning_once remembers what it logged in the whole process: forget it, so that each test
        # sees the messages its own code causes
        cached = getattr(logging.Logger, "warning_once", None)
        if hasattr(cached, "cache_clear"):
            cached.cache_clear()
        logging.getLogger("transformers").addHandler(self)  # its children propagate up to it, no further
        if not self.active:
            warnings.warn = _warn
        self.active.append(self)
        return self

    def __exit__(self, *exc):
        self.active.remove(self)
        if not self.active:
            warnings.warn = _WARN
        logging.getLogger("transformers").removeHandler(self)
        return False


def _fail_on_transformers_deprecations(when: str):
    with TransformersDeprecations() as seen:
        result = yield
    if seen.messages:
        pytest.fail(
            f"transformers warned of a deprecation during {when}, called from rmlab code:\n  "
            + "\n  ".join(dict.fromkeys(seen.messages)),
            pytrace=False,
        )
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    return (yield from _fail_on_transformers_deprecations("fixture setup"))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    return (yield from _fail_on_transformers_deprecations("the test"))


# --------------------------------------------------------------------------------------------------
# fixtures and helpers
# --------------------------------------------------------------------------------------------------

ADJ = ["great", "dull", "charming", "slow", "clever", "flat", "wonderful", "weak", "funny", "long"]


@pytest.fixture(scope="module")
def world():
    """The shipped toy world, loaded once per test module."""
    from rmlab.toy import load

    return load()


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``): tiny
    models run fastest so on shared cores, and exact comparisons need one reduction order."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def no_default_cache(monkeypatch):
    """A developer's RMLAB_CACHE_DIR must not leak cached results into the tests."""
    monkeypatch.delenv("RMLAB_CACHE_DIR", raising=False)


NOUNS = ["film", "movie", "plot", "cast", "music", "script", "ending", "story"]


def make_pairs(n: int = 12, seed: int = 0, chat: bool = False) -> list[dict]:
    """Preference pairs of varied lengths (1 to ~12 words of response) from a fixed seed."""
    rng = random.Random(seed)

    def sentence(k):
        return " ".join(f"the {rng.choice(NOUNS)} was {rng.choice(ADJ)}" for _ in range(k))

    rows = []
    for i in range(n):
        prompt = rng.choice(["Review:", "Write a short review of the movie.", "Describe the film in one sentence."])
        if i % 3 == 0:
            prompt += " " + sentence(rng.randint(1, 3))
        chosen = " " + sentence(rng.randint(1, 4)) + "."
        rejected = " " + sentence(rng.randint(1, 4)) + "!"
        if chat:
            rows.append(
                {
                    "prompt": [{"role": "user", "content": prompt}],
                    "chosen": [{"role": "assistant", "content": chosen.strip()}],
                    "rejected": [{"role": "assistant", "content": rejected.strip()}],
                }
            )
        else:
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


@pytest.fixture(scope="session")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def bos_tok():
    return tiny_tokenizer(add_bos=True)


@pytest.fixture(scope="session")
def policy():
    return tiny_causal_lm("gpt2", seed=1)


@pytest.fixture(scope="session")
def reference():
    return tiny_causal_lm("gpt2", seed=0)


@pytest.fixture(scope="session")
def pairs():
    return make_pairs(12)


# --------------------------------------------------------------------------------------------------
# brute force: each sequence alone through the model's own forward, tokenised by hand
# --------------------------------------------------------------------------------------------------
def _common_prefix(a, b) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def hand_tokenise(tok, row: dict) -> dict:
    """``{"chosen": (ids, start), "rejected": (ids, start)}`` for a plain-text pair, tokenised as TRL's
    DPOTrainer does, written out from scratch: EOS appended unless present, the response starting
    where the ids of the prompt and of prompt+response first differ (the minimum over both sides),
    never at position 0 (which nothing predicts)."""
    eos = tok.eos_token
    prompt = tok(row["prompt"])["input_ids"]
    full = {
        side: tok(row["prompt"] + row[side] + ("" if row[side].endswith(eos) else eos))["input_ids"]
        for side in ("chosen", "rejected")
    }
    start = max(1, min(_common_prefix(prompt, ids) for ids in full.values()))
    return {side: (ids, start) for side, ids in full.items()}


def response_logprobs(model, ids, start):
    """Per-token log-probs (float64 numpy) of ``ids[start:]``: the model's full forward on ``ids``
    alone (no padding, no batching), log_softmax over the whole vocabulary."""
    import torch

    with torch.no_grad():
        logits = model(input_ids=torch.tensor([list(ids)])).logits[0].double()
    logp = torch.log_softmax(logits[:-1], dim=-1).gather(1, torch.tensor(list(ids[1:]))[:, None])[:, 0]
    return logp[start - 1 :].numpy()


def brute_force_logprobs(model, tok, rows) -> list[dict]:
    """Per row: ``{"chosen": per-token log-probs, "rejected": ..., "ids": {side: response ids}}``."""
    out = []
    for row in rows:
        enc = hand_tokenise(tok, row)
        item = {side: response_logprobs(model, *enc[side]) for side in ("chosen", "rejected")}
        item["ids"] = {side: list(ids[start:]) for side, (ids, start) in enc.items()}
        out.append(item)
    return out
