"""Every notebook runs top to bottom on the shipped toy world (as a reader would run it) without
writing to stderr, and its nbconvert HTML export keeps every figure without loading anything from
the network."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))

PLOTLY_MIME = "application/vnd.plotly.v1+json"
# The licence header that opens plotly.js's bundle: once per inlined copy of the library.
PLOTLYJS_INLINE = re.compile(r"\* plotly\.js v\d")
# A <script> loading its code from elsewhere (http, https or protocol-relative).
REMOTE_SCRIPT = re.compile(r"<script\b[^>]*\bsrc\s*=\s*[\"']?\s*(?:https?:)?//", re.IGNORECASE)


def _text(value) -> str:
    return "".join(value) if isinstance(value, list) else str(value)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs_and_exports(path, tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nbconvert = pytest.importorskip("nbconvert")
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    outputs = [(k, o) for k, c in enumerate(notebook.cells) if c.cell_type == "code" for o in c.get("outputs", [])]
    errors = [o for _, o in outputs if o.output_type == "error"]
    assert not errors
    # a reader sees stderr in red: warnings from rmlab, transformers or the widget protocol
    stderr = [(k, _text(o.get("text", ""))[:300]) for k, o in outputs if o.output_type == "stream" and o.name == "stderr"]
    assert not stderr, f"cells write to stderr: {stderr}"

    # Our outputs: every plotly figure carries an HTML fallback (what an export or a kernel-less
    # viewer shows), and no output pulls a script from a CDN. nbconvert's template loads its own
    # scripts (require.js, MathJax); those are not checked here.
    figures = [k for k, o in outputs if PLOTLY_MIME in o.get("data", {})]
    bare = [k for k, o in outputs if PLOTLY_MIME in o.get("data", {}) and "text/html" not in o["data"]]
    assert not bare, (
        f"plotly figures without a text/html fallback in cells {bare}: "
        "the notebook's first code cell must call rmlab.plots.setup_notebook()"
    )
    remote = sorted(
        {k for k, o in outputs for mime in ("text/html", "application/javascript") if REMOTE_SCRIPT.search(_text(o.get("data", {}).get(mime, "")))}
    )
    assert not remote, f"outputs of cells {remote} load a script from the network"

    html, _ = nbconvert.HTMLExporter().from_notebook_node(notebook)
    copies = len(PLOTLYJS_INLINE.findall(html))
    assert copies == (1 if figures else 0), f"plotly.js is inlined {copies} times in the HTML export ({len(figures)} figures)"
    shown = html.count('class="plotly-graph-div"')
    assert shown == len(figures), f"the HTML export shows {shown} of the notebook's {len(figures)} plotly figures"
