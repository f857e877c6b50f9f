"""The README's main job, `rmlab demo`, and the static report it writes."""

from __future__ import annotations

import re

from rmlab.cli import main


def test_demo_prints_summary_and_writes_self_contained_report(tmp_path, capsys):
    out = tmp_path / "demo.html"
    assert main(["demo", "--pairs", "24", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "implicit-reward accuracy" in printed and "proxy reward models" in printed
    # one accuracy line per beta, with a number in [0, 1]
    rows = re.findall(r"^\s*(0\.\d+)\s+([01]\.\d{3})", printed, flags=re.M)
    assert len(rows) >= 3
    page = out.read_text(encoding="utf-8")
    assert page.count("<h2>") >= 4
    # plotly.js is inline: no CDN or requirejs, the file opens offline
    assert not re.search(r"<script[^>]+src=", page) and "require.config" not in page
    # margins, token rewards, calibration, length bias, preference strength, entanglement, best-of-n
    assert page.count('class="plotly-graph-div"') == 7
    assert "likely mislabelled" in printed and "gradient entanglement" in printed
