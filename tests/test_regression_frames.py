"""Every analysis frame on the toy world equals the stored regression frame (tests/regression/frames).

The calls live in ``tests/regression/calls.py``, shared with ``tests/regression/build_frames.py``,
which wrote the frames. Same columns, dtype kinds and index; numbers within 1e-6 (absolute and
relative, NaN equal to NaN), list cells elementwise; everything else exactly. When a change of
numbers is intended, regenerate with ``python -m tests.regression.build_frames`` and say why in the
commit.
"""

from __future__ import annotations

import pytest

from tests.regression import calls

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    # DPOConfig and the Trainer (diagnostics_callback) use deprecated transformers names; TRL's business
    pytest.mark.filterwarnings(r"ignore:`(is_)?gradient_checkpointing\S*` is deprecated:FutureWarning"),
]

REGENERATE = "python -m tests.regression.build_frames"


@pytest.fixture(scope="module")
def manifest():
    if not calls.MANIFEST.exists():
        pytest.fail(f"no regression frames at {calls.FRAMES_DIR}; write them with {REGENERATE}", pytrace=False)
    return calls.load_manifest()


@pytest.fixture(scope="module")
def context(world):
    """The calls' context: shared results (one track_dpo run, one report, ...) are computed once."""
    return calls.Context(world)


@pytest.mark.parametrize("name", list(calls.CALLS), ids=str)
def test_frame_unchanged(name, manifest, context):
    for module in calls.CALLS[name].needs:
        pytest.importorskip(module)
    entry = manifest["frames"].get(name)
    if entry is None:
        pytest.fail(f"frame {name!r} has a call but no stored frame; write it with {REGENERATE}", pytrace=False)
    problems = calls.compare(name, entry, calls.read(entry), calls.compute(context, name))
    if problems:
        pytest.fail(
            "\n".join(problems) + f"\n(the stored frame was computed by:\n{entry['call']})",
            pytrace=False,
        )


def test_every_stored_frame_has_a_call(manifest):
    orphans = sorted(set(manifest["frames"]) - set(calls.CALLS))
    assert not orphans, f"stored frames without a call in tests/regression/calls.py: {orphans}; rerun {REGENERATE}"
    stored = {p.name for p in calls.FRAMES_DIR.iterdir()} - {calls.MANIFEST.name}
    named = {entry["file"] for entry in manifest["frames"].values()}
    assert stored == named, f"files in {calls.FRAMES_DIR} not in the manifest: {sorted(stored - named)}"
