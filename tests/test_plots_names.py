"""One call shape for every figure (the frame first) and the renamed public names: old names and
keywords still work for one release and warn; the new ones do not."""

from __future__ import annotations

import inspect
import subprocess
import sys
import warnings

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest

import rmlab
from rmlab import plots
from rmlab.errors import DataError

FIGURES = [
    "calibration_diagram",
    "checkpoint_curves",
    "ches_vs_change",
    "displacement_trajectories",
    "entanglement_scatter",
    "length_bias",
    "overoptimization_curve",
    "predicted_changes",
    "preference_strength_map",
    "reward_margins",
    "similarity_heatmap",
    "token_reward_text",
]


def _no_warning(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fn(*args, **kwargs)


def _scores(n=20):
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"pair": np.arange(n), "margin": rng.normal(0.5, 1, n),
                          "tokens_chosen": rng.integers(3, 30, n), "tokens_rejected": rng.integers(3, 30, n)})
    frame["score_chosen"], frame["score_rejected"] = frame["margin"], 0.0
    return frame


def _trajectories():
    return pd.DataFrame({"step": [0, 1, 0, 1], "pair": [0, 0, 1, 1], "logps_chosen": [-5.0, -6.0, -4.0, -3.5],
                         "logps_rejected": [-6.0, -8.0, -5.0, -5.5]})


def _tokens():
    return pd.DataFrame({"pair": 0, "side": ["chosen"] * 2 + ["rejected"] * 2, "position": [0, 1, 0, 1],
                         "token": list("abcd"), "reward": [0.1, -0.2, 0.3, -0.4]})


def _strength():
    return pd.DataFrame({"pair": [0, 1, 2], "strength_mean": [1.0, -0.5, 0.05], "strength_std": [0.1, 0.2, 0.3],
                         "likely_mislabelled": [False, True, False], "ambiguous": [False, False, True]})


def _similarity():
    return pd.DataFrame([(a, b, float(a - b)) for a in range(3) for b in range(3)], columns=["pair_a", "pair_b", "inner"])


#: figure -> (old keyword of its first argument, the frame, further arguments)
RENAMED = {
    "token_reward_text": ("tokens", _tokens, dict(pair=0)),
    "displacement_trajectories": ("trajectories", _trajectories, {}),
    "ches_vs_change": ("ches", lambda: pd.DataFrame({"pair": [0, 1], "ln_ches": [1.0, 2.0]}),
                       dict(change=_trajectories())),
    "length_bias": ("scores", _scores, {}),
    "preference_strength_map": ("strength", _strength, {}),
    "calibration_diagram": ("report", lambda: rmlab.reward_model_report(_scores(), bins=4).calibration, {}),
}


@pytest.mark.parametrize("name", FIGURES)
def test_every_figure_takes_the_frame_first(name):
    fn = getattr(plots, name)
    first = next(iter(inspect.signature(fn).parameters.values()))
    assert first.name == "frame" and first.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    assert fn.__doc__ and "frame" in fn.__doc__


@pytest.mark.parametrize("name", sorted(RENAMED))
def test_the_old_first_keyword_still_works_and_warns(name):
    old, make, extra = RENAMED[name]
    fn = getattr(plots, name)
    positional = _no_warning(fn, make(), **extra)
    keyword = _no_warning(fn, frame=make(), **extra)
    with pytest.warns(DeprecationWarning, match=rf"{name}\({old}=\.\.\.\) is deprecated.*'frame'") as record:
        old_style = fn(**{old: make()}, **extra)
    assert record[0].filename == __file__  # points at the caller's line, not into rmlab
    assert isinstance(old_style, go.Figure)
    assert old_style.to_json() == positional.to_json() == keyword.to_json()
    with pytest.raises(TypeError, match="twice"):
        fn(make(), **{old: make()}, **extra)


def test_similarity_matrix_is_a_deprecated_alias_of_similarity_heatmap():
    new = _no_warning(plots.similarity_heatmap, _similarity())
    with pytest.warns(DeprecationWarning, match=r"rmlab\.plots\.similarity_matrix is deprecated: use rmlab\.plots\.similarity_heatmap"):
        old = plots.similarity_matrix(_similarity())
    assert old.to_json() == new.to_json()
    with pytest.warns(DeprecationWarning) as record:
        plots.similarity_matrix(similarity=_similarity(), value="inner")
    assert len(record) == 2 and {r.filename for r in record} == {__file__}
    assert "similarity_matrix" in plots.__all__ and "similarity_heatmap" in plots.__all__
    # the frame function of the same name is untouched
    from rmlab.diagnostics import similarity_matrix as table

    assert _no_warning(table, _similarity()).shape == (3, 3)


def test_calibration_diagram_still_takes_the_report_object_with_a_warning():
    report = rmlab.reward_model_report(_scores(), bins=4)
    new = _no_warning(plots.calibration_diagram, report.calibration)
    with pytest.warns(DeprecationWarning, match=r"calibration_diagram\(report\) is deprecated.*report\.calibration") as record:
        old = plots.calibration_diagram(report)
    assert record[0].filename == __file__
    assert old.to_json() == new.to_json()
    with pytest.raises(DataError, match="pandas DataFrame from rmlab.reward_model_report"):
        plots.calibration_diagram(report.summary.to_dict())


def test_report_is_a_deprecated_alias_of_html_report_that_warns_on_every_call():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        new, old = rmlab.html_report, rmlab.report  # looking a name up does not warn
    assert "html_report" in rmlab.__all__ and old.__wrapped__ is new
    for _ in range(2):
        with pytest.warns(DeprecationWarning, match=r"rmlab\.report is deprecated: use rmlab\.html_report") as record:
            with pytest.raises(rmlab.RmlabError, match="beta"):
                old(beta=0)
        assert len(record) == 1 and record[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(rmlab.RmlabError, match="beta"):
            new(beta=0)


def test_html_report_is_loaded_on_first_use_and_stays_the_function_once_its_module_is_imported():
    code = (
        "import sys, rmlab; assert 'rmlab.report_page' not in sys.modules; "
        "from rmlab.report_page import report, write_report; import rmlab.report_page; "
        "assert rmlab.html_report is report, rmlab.html_report; "
        "from rmlab import html_report; assert html_report is report"
    )
    subprocess.run([sys.executable, "-W", "error::DeprecationWarning", "-c", code], check=True)
