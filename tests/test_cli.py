"""The README's main job, `rmlab report`, and the self-contained HTML it writes."""

from __future__ import annotations

import json
import re

import pytest

import rmlab
from rmlab.cli import main
from rmlab.toy import tiny_causal_lm, tiny_reward_model, tiny_tokenizer


def _self_contained(page: str) -> None:
    # plotly.js is inline: no CDN or requirejs, the file opens offline
    assert not re.search(r"<script[^>]+src=", page) and "require.config" not in page
    assert page.count("Plotly.newPlot") >= 1 and "plotly.js v" in page


def test_report_on_the_toy_world_prints_summary_and_writes_self_contained_html(tmp_path, capsys):
    out = tmp_path / "report.html"
    assert main(["report", "--pairs", "24", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "implicit-reward accuracy" in printed and "Proxy reward models" in printed
    # one accuracy line per beta, with a number in [0, 1]
    rows = re.findall(r"^\s*(0\.\d+)\s+([01]\.\d{3})", printed, flags=re.M)
    assert len(rows) >= 3
    assert "likely mislabelled" in printed and "Gradient entanglement" in printed
    page = out.read_text(encoding="utf-8")
    _self_contained(page)
    # margins, token rewards, calibration, length bias, preference strength, entanglement, best-of-n
    assert page.count('class="plotly-graph-div"') == 7


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    """A policy, a reference and a reward model saved as a user would have them: local folders."""
    root = tmp_path_factory.mktemp("models")
    tok = tiny_tokenizer()
    paths = {}
    for name, model in (
        ("policy", tiny_causal_lm("gpt2", seed=1)),
        ("reference", tiny_causal_lm("gpt2", seed=0)),
        ("rm", tiny_reward_model("gpt2", seed=2)),
    ):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        paths[name] = str(root / name)
    pairs = root / "pairs.jsonl"
    rows = [
        {"prompt": "Review: the film", "chosen": " was great <b>&</b> fun", "rejected": " was dull"},
        {"prompt": "Review: the book", "chosen": " moving and clever", "rejected": " too long and slow"},
        {"prompt": "Review: the show", "chosen": " funny", "rejected": " <script>alert(1)</script>"},
    ]
    pairs.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    paths["data"] = str(pairs)
    return paths


def test_report_on_models_loaded_from_local_paths(saved_models, tmp_path, capsys):
    out = tmp_path / "mine.html"
    argv = ["report", "--policy", saved_models["policy"], "--reference", saved_models["reference"],
            "--reward-model", saved_models["rm"], "--data", saved_models["data"], "--out", str(out), "--quiet"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "rewards/accuracies" in printed and "3 preference pairs scored" in printed
    page = out.read_text(encoding="utf-8")
    _self_contained(page)
    # margins, token rewards, calibration, length bias
    assert page.count('class="plotly-graph-div"') == 4
    assert "<script>alert(1)</script>" not in page


def test_report_function_matches_the_core(saved_models, tmp_path):
    from rmlab.report_page import collect_report

    contents = collect_report(saved_models["policy"], saved_models["reference"], saved_models["data"], beta=0.2,
                              progress=False)
    table = contents.tables["DPO policy: the metrics TRL's DPOTrainer logs"].set_index("metric")["value"]
    frame = rmlab.implicit_rewards(saved_models["policy"], saved_models["reference"], saved_models["data"], beta=0.2,
                                   progress=False)
    assert table["rewards/margins"] == pytest.approx(frame["margin"].mean(), rel=1e-9)
    path = rmlab.html_report(saved_models["policy"], saved_models["reference"], saved_models["data"],
                        out=tmp_path / "r.html", progress=False)
    assert path.exists()


def test_report_takes_options_flat_or_as_one_object(saved_models):
    from rmlab.report_page import collect_report

    args = (saved_models["policy"], saved_models["reference"], saved_models["data"])
    flat = collect_report(*args, reward_model=saved_models["rm"], max_length=16, progress=False)
    given = collect_report(*args, reward_model=saved_models["rm"],
                           options=rmlab.Options(max_length=16, add_eos=None, progress=False))
    assert flat.tables.keys() == given.tables.keys() and flat.tables
    for name, table in flat.tables.items():
        assert table.equals(given.tables[name]), name


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(policy="p"), "needs data="),
        (dict(max_lenght=8), "Did you mean 'max_length'"),
        (dict(policy="p", data=[{"chosen": "a", "rejected": "b"}]), "both policy and reference"),
        (dict(data=[{"chosen": "a", "rejected": "b"}]), "a policy and reference, a reward_model="),
        (dict(beta=0), "beta"),
        (dict(pairs=0), "positive number of pairs"),
    ],
)
def test_report_checks_its_arguments_before_loading_anything(kwargs, message):
    with pytest.raises(rmlab.RmlabError, match=message):
        rmlab.html_report(**kwargs)
