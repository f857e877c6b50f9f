"""Write the regression frames: every public analysis of rmlab run on a small fixed subset of the toy world.

The frames in ``tests/regression/frames`` are what the code computed before the engine/options
redesign; ``tests/test_regression_frames.py`` recomputes each with the same call
(``tests/regression/calls.py``) and requires the same columns, dtype kinds and index, numbers within
1e-6 and everything else equal. Regenerate them only when a change of numbers is intended, and say
in the commit why the numbers changed.

Run from the repository root (one torch thread, as the test)::

    python -m tests.regression.build_frames
    python tests/regression/build_frames.py
    python -m tests.regression.build_frames --check   # compare with the stored frames, write nothing
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, str(ROOT))

VERSIONED = ("torch", "transformers", "pandas", "numpy", "pyarrow", "trl", "captum", "datasets")


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def commit() -> str | None:
    """The checkout's commit, marked when rmlab/ has uncommitted changes."""

    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()

    try:
        head = git("rev-parse", "HEAD")
        return head + (" with uncommitted changes in rmlab/" if git("status", "--porcelain", "--", "rmlab") else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def attrs_of(result) -> dict | None:
    attrs = getattr(result, "attrs", None)
    if not attrs:
        return None
    return json.loads(json.dumps(attrs, default=str))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the stored frames instead of writing")
    parser.add_argument("--only", nargs="*", help="compute only these frames (with --check)")
    args = parser.parse_args(argv)
    if args.only and not args.check:
        parser.error("--only needs --check: a build writes every frame")

    os.environ.pop("RMLAB_CACHE_DIR", None)  # cached numbers must not stand in for computed ones
    import torch

    torch.set_num_threads(1)
    from rmlab.toy import load
    from tests.regression import calls

    names = list(calls.CALLS)
    if args.only:
        unknown = sorted(set(args.only) - set(names))
        if unknown:
            parser.error(f"no such frames: {unknown}")
        names = [n for n in names if n in args.only]
    started = time.perf_counter()
    ctx = calls.Context(load())
    print(f"toy world loaded in {time.perf_counter() - started:.1f} s")

    if args.check:
        manifest = calls.load_manifest()
        failed = 0
        for name in names:
            t = time.perf_counter()
            entry = manifest["frames"][name]
            problems = calls.compare(name, entry, calls.read(entry), calls.compute(ctx, name))
            failed += bool(problems)
            print(f"{'FAIL' if problems else 'ok  '} {name} ({time.perf_counter() - t:.2f} s)")
            for line in problems:
                print("     " + line)
        print(f"{len(names) - failed} of {len(names)} frames agree ({time.perf_counter() - started:.1f} s)")
        return 1 if failed else 0

    staging = Path(tempfile.mkdtemp(prefix="frames-", dir=calls.FRAMES_DIR.parent))
    try:
        entries = {}
        for name in names:
            t = time.perf_counter()
            result = calls.compute(ctx, name)
            entry = calls.write(result, staging / calls.file_name(name, calls.kind_of(result)))
            # what was written must read back as the same result
            problems = calls.compare(name, entry, calls.read(entry, staging), result)
            if problems:
                raise SystemExit(f"{name} does not survive being stored:\n  " + "\n  ".join(problems))
            entry["call"] = calls.CALLS[name].source
            if calls.CALLS[name].needs:
                entry["needs"] = list(calls.CALLS[name].needs)
            attrs = attrs_of(result)
            if attrs:
                entry["attrs"] = attrs  # for reading; not compared
            entries[name] = entry
            print(f"{name}: {entry['kind']} ({time.perf_counter() - t:.2f} s)")
        manifest = {
            "about": "Regression frames: what rmlab computed on a fixed subset of the toy world before the "
                     "engine/options redesign. Recompute and compare with tests/test_regression_frames.py; "
                     "regenerate with python -m tests.regression.build_frames.",
            "built_from": commit(),
            "versions": versions(),
            "torch_threads": 1,
            "tolerance": calls.TOLERANCE,
            "subset": {"pairs": f"world.heldout.head({calls.N_PAIRS})",
                       "prompts": f"world.prompts[:{calls.N_PROMPTS}]",
                       "pool": f"data/toy/bon_pool.parquet; its first {calls.POOL_PROMPTS} prompts, "
                               f"{calls.POOL_PER_PROMPT} completions each, for the scored ensembles"},
            "shared": calls.shared_sources(),
            "frames": entries,
        }
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=1, allow_nan=True) + "\n")
        if calls.FRAMES_DIR.exists():
            shutil.rmtree(calls.FRAMES_DIR)
        staging.rename(calls.FRAMES_DIR)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    size = sum(p.stat().st_size for p in calls.FRAMES_DIR.iterdir())
    print(f"{len(entries)} frames, {size / 1024:.0f} KiB, in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
