"""Write docs/errors.md, the table of bad inputs and what rmlab says, from the catalogue in
tests/test_bad_inputs.py (one table for the tests and the docs; a test keeps them equal).

Usage: python tools/errors_table.py [--check]
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str]) -> int:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.path.insert(0, str(ROOT))
    os.chdir(ROOT)  # messages show the working directory as <cwd>, the same for the tests
    from tests.test_bad_inputs import DOCS, World, render_table

    with tempfile.TemporaryDirectory() as tmp:
        text = render_table(World(Path(tmp)))
    if "--check" in argv:
        same = DOCS.exists() and DOCS.read_text(encoding="utf-8") == text
        print(f"{DOCS.relative_to(ROOT)} is {'up to date' if same else 'out of date'}")
        return 0 if same else 1
    DOCS.parent.mkdir(parents=True, exist_ok=True)
    DOCS.write_text(text, encoding="utf-8")
    print(f"wrote {DOCS.relative_to(ROOT)} ({text.count(chr(10))} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
