"""The explorers, driven from Python: set values, simulate clicks, check figures and the shared selection.

No kernel or browser is needed: ipywidgets and plotly FigureWidgets keep their state in Python.
"""

from __future__ import annotations

import types

import numpy as np
import pandas as pd
import pytest

import rmlab
from rmlab import widgets as W
from rmlab.diagnostics import predict_entanglement


@pytest.fixture(scope="module")
def held(world):
    return world.heldout.head(12).reset_index(drop=True)


@pytest.fixture(scope="module")
def rewards(world, held):
    return rmlab.implicit_rewards(world.dpo[0.1], world.sft, held, beta=0.1, progress=False)


@pytest.fixture(scope="module")
def entangled(world, held):
    return rmlab.gradient_entanglement(world.dpo[0.1], held, reference=world.sft, beta=0.1, realised=True,
                                       lr=1e-3, progress=False)


@pytest.fixture(scope="module")
def run(world, held):
    return rmlab.track_dpo(world.sft, world.sft, held, steps=3, lr=0.5, beta=0.1, optimizer="sgd", progress=False)


@pytest.fixture(scope="module")
def ches(world, held):
    return rmlab.ches(world.sft, held, progress=False)


def _click(figure, trace_index, point_index):
    """What plotly's frontend does on a click: call the trace's click handlers with the point."""
    trace = figure.data[trace_index]
    points = types.SimpleNamespace(point_inds=[point_index], xs=[], ys=[], trace_index=trace_index)
    for handler in trace._click_callbacks:
        handler(trace, points, None)


# ---------------------------------------------------------------------------------------------
# predict_entanglement: the model-free re-prediction behind the lr and beta sliders
# ---------------------------------------------------------------------------------------------
def test_predict_entanglement_matches_a_full_recomputation(world, held, entangled):
    again = predict_entanglement(entangled, beta=0.3, lr=2e-3)
    direct = rmlab.gradient_entanglement(world.dpo[0.1], held, reference=world.sft, beta=0.3, lr=2e-3, progress=False)
    for column in ("margin", "loss_weight", "pred_delta_chosen", "pred_delta_rejected"):
        np.testing.assert_allclose(again[column], direct[column], rtol=1e-6, atol=1e-12)
    assert "real_delta_chosen" not in again.columns  # measured at lr=1e-3, beta=0.1 only
    same = predict_entanglement(entangled)
    pd.testing.assert_frame_equal(same, entangled)


def test_predict_entanglement_hand_worked_case():
    frame = pd.DataFrame({
        "pair": [0], "logps_chosen": [-3.0], "logps_rejected": [-5.0], "ref_logps_chosen": [-4.0],
        "ref_logps_rejected": [-4.0], "grad_sq_chosen": [2.0], "grad_sq_rejected": [3.0], "grad_inner": [2.5],
    })
    frame.attrs.update(beta=0.1, lr=1.0, loss_weight="dpo")
    out = predict_entanglement(frame, beta=0.5, lr=0.1)
    margin = 0.5 * ((-3 + 4) - (-5 + 4))  # 1.0
    c = 0.5 / (1 + np.exp(margin))
    assert out["margin"].iloc[0] == pytest.approx(margin)
    assert out["pred_delta_chosen"].iloc[0] == pytest.approx(0.1 * c * (2.0 - 2.5))
    assert out["pred_delta_rejected"].iloc[0] == pytest.approx(0.1 * c * (2.5 - 3.0))


def test_predict_entanglement_rejects_other_frames(rewards):
    with pytest.raises(rmlab.DataError, match="gradient_entanglement"):
        predict_entanglement(rewards, lr=1.0)


# ---------------------------------------------------------------------------------------------
# explorers
# ---------------------------------------------------------------------------------------------
def test_pair_table_sorts_filters_and_selects(rewards):
    table = W.PairTable(rewards)
    assert table.count.value == f"{len(rewards)} of {len(rewards)} pairs"
    order = [pair for _, pair in table.list.options]
    assert order == rewards.sort_values("margin", kind="stable")["pair"].tolist()
    table.descending.value = True
    assert [p for _, p in table.list.options][0] == int(rewards.loc[rewards["margin"].idxmax(), "pair"])
    table.correct.value = "wrong"
    wrong = set(rewards.loc[~rewards["correct"], "pair"])
    assert {p for _, p in table.list.options} == wrong
    table.correct.value = "all"
    lo = float(rewards["margin"].median())
    table.filters["margin"].value = (lo, table.filters["margin"].max)
    assert {p for _, p in table.list.options} == set(rewards.loc[rewards["margin"] >= lo, "pair"])
    # clicking a row selects the pair
    pair = table.list.options[0][1]
    table.list.value = pair
    assert table.selection.pair == pair
    assert "<script>" not in table.header.value


def test_pair_table_escapes_and_needs_pairs(rewards):
    with pytest.raises(rmlab.DataError, match="'pair' column"):
        W.PairTable(rewards.drop(columns="pair"))
    with pytest.raises(rmlab.DataError, match="not in the frame"):
        W.PairTable(rewards, columns=["margn"])


def test_pair_table_filters_leave_out_pairs_without_result(rewards):
    """A pair whose response was truncated to nothing (``correct`` NA) is neither correct nor wrong."""
    frame = rewards.copy()
    frame["correct"] = frame["correct"].astype("boolean")
    frame.loc[0, ["margin", "correct"]] = [np.nan, pd.NA]
    table = W.PairTable(frame)
    for value, wanted in (("correct", True), ("wrong", False)):
        table.correct.value = value
        expected = {int(p) for p, c in zip(rewards["pair"], rewards["correct"]) if bool(c) == wanted} - {0}
        assert {p for _, p in table.list.options} == expected, value
    table.correct.value = "all"
    assert 0 in {p for _, p in table.list.options}


def test_token_viewer_modes_and_selection(world, held):
    sel = W.Selection()
    viewer = W.TokenRewardViewer(held, policy=world.dpo[0.1], reference=world.sft, reward_model=world.reward_models[0],
                                 beta=0.1, selection=sel)
    assert viewer.last_error is None
    assert list(viewer.mode.options) == ["implicit DPO reward", "dense RM reward", "attribution"]
    assert sel.pair == 0 and "pair 0" in viewer.figure.layout.title.text
    # the heatmap values are exactly the core's token rewards of that pair
    tokens = rmlab.token_rewards(world.dpo[0.1], world.sft, held.iloc[[3]], beta=0.1, progress=False)
    sel.pair = 3
    assert viewer.pair.value == 3
    shown = np.asarray(viewer.figure.data[0].z, dtype=float).ravel()
    chosen = tokens[tokens.side == "chosen"]["reward"].to_numpy()
    np.testing.assert_allclose(shown[: len(chosen)], chosen, rtol=1e-6)
    # dense mode: the reward model's per-token rewards, for the same pair
    viewer.mode.value = "dense RM reward"
    dense = rmlab.dense_rewards(world.reward_models[0], held.iloc[[3]], progress=False)
    shown = np.asarray(viewer.figure.data[0].z, dtype=float).ravel()
    np.testing.assert_allclose(shown[: (dense.side == "chosen").sum()], dense[dense.side == "chosen"]["reward"], rtol=1e-5)
    viewer.mode.value = "attribution"
    assert viewer.last_error is None and "attribution" in viewer.figure.layout.title.text
    # the pair box drives the shared selection
    viewer.pair.value = 4
    assert sel.pair == 4


def test_token_viewer_shows_callback_errors_in_the_widget(world, held):
    viewer = W.TokenRewardViewer(held, policy=world.dpo[0.1], reference=world.sft)
    viewer.selection.pair = 999  # not a pair of the data: shown, not raised into the kernel log
    assert isinstance(viewer.last_error, rmlab.ArgumentError)
    assert "pair 999" in viewer.error_box.value and viewer.error_box.layout.display is None
    viewer.selection.pair = 1
    assert viewer.last_error is None and viewer.error_box.layout.display == "none"
    with pytest.raises(rmlab.ArgumentError, match="nothing to show"):
        W.TokenRewardViewer(held)


def test_entanglement_explorer_sliders_update_predictions(entangled):
    ex = W.EntanglementExplorer(entangled)
    falls = entangled["chosen_falls"].to_numpy(bool)
    before = np.concatenate([np.asarray(t.y, float) for t in ex.changes.data[:2]])
    ex.lr.value = ex.lr.value * 10
    after = np.concatenate([np.asarray(t.y, float) for t in ex.changes.data[:2]])
    np.testing.assert_allclose(after, 10 * before, rtol=1e-4)  # linear in lr (slider rounding aside)
    ex.beta.value = 0.5
    expected = predict_entanglement(entangled, beta=ex.beta.value, lr=ex.lr.value)
    shown = np.asarray(ex.changes.data[1].y, float)  # the "chosen falls" trace
    np.testing.assert_allclose(shown, expected.loc[falls, "pred_delta_chosen"], rtol=1e-9)
    assert f"beta = {ex.beta.value:.3g}" in ex.summary.value
    # realised changes are shown only at the frame's own settings
    assert not any(t.name == "realised step" for t in ex.changes.data)


def test_entanglement_click_selects_everywhere(entangled, rewards):
    sel = W.Selection()
    ex = W.EntanglementExplorer(entangled, selection=sel)
    table = W.PairTable(rewards, selection=sel)
    _click(ex.scatter, 0, 4)
    pair = int(entangled["pair"].iloc[4])
    assert sel.pair == pair and table.list.value == pair
    assert any(t.name == f"selected: pair {pair}" for t in ex.scatter.data)
    assert f"pair {pair}" in ex.summary.value


def test_displacement_explorer_step_slider(run, ches):
    ex = W.DisplacementExplorer(run, ches=ches)
    steps = list(ex.step.options)
    assert steps == sorted(run.trajectories["step"].unique())
    last_x = max(max(t.x) for t in ex.lines.data if t.x is not None)
    assert last_x == steps[-1]
    ex.step.value = steps[1]
    assert max(max(t.x) for t in ex.lines.data if t.x is not None) == steps[1]
    t = run.trajectories
    upto = t[t.step <= steps[1]].sort_values("step").groupby("pair")["logps_chosen"]
    fell = int(((upto.last() - upto.first()) < 0).sum())
    assert f"fell on {fell} of" in ex.summary.value
    _click(ex.points, 0, 2)
    assert ex.selection.pair is not None
    assert any(t.name and "(selected)" in t.name for t in ex.lines.data)


def test_overoptimization_explorer_controls(world):
    pool = pd.read_parquet(world.root / "bon_pool.parquet")
    part = pool[pool.prompt.isin(pool.prompt.unique()[:8])].copy()
    part["other"] = part["proxy"] + 0.1 * part["words"]
    curves = rmlab.best_of_n(part, proxy={"proxy 0": "proxy", "longer": "other"}, gold="gold", n_values=[1, 2, 4, 8, 16, 32])
    ex = W.OveroptimizationExplorer(curves, bootstrap=50)
    assert ex.last_error is None, ex.last_error
    names = {t.name for t in ex.figure.data}
    assert any("fit" in (n or "") for n in names)
    ex.fit.value = False
    assert not any("fit" in (t.name or "") for t in ex.figure.data)
    x_sqrt = np.asarray(ex.figure.data[0].x, float)
    ex.axis.value = "kl"
    np.testing.assert_allclose(np.asarray(ex.figure.data[0].x, float), x_sqrt**2, rtol=1e-9)
    assert ex.figure.layout.xaxis.title.text.startswith("KL")
    ex.proxy.value = "longer"
    assert {t.name for t in ex.figure.data if t.mode and "markers" in t.mode} == {"proxy", "gold"}


def test_dashboard_shares_one_selection(world, held, rewards, entangled, run, ches):
    table = W.PairTable(rewards)
    viewer = W.TokenRewardViewer(held, policy=world.dpo[0.1], reference=world.sft, beta=0.1)
    ex = W.EntanglementExplorer(entangled)
    disp = W.DisplacementExplorer(run, ches=ches)
    board = W.Dashboard({"pairs": table, "tokens": viewer, "entanglement": ex, "displacement": disp})
    assert all(e.selection is board.selection for e in (table, viewer, ex, disp))
    assert list(board.tabs.titles) == ["pairs", "tokens", "entanglement", "displacement"]
    table.list.value = 7  # a click in the table ...
    assert viewer.pair.value == 7 and "pair 7" in viewer.figure.layout.title.text  # ... shows in every tab
    assert any(t.name == "selected: pair 7" for t in ex.scatter.data)
    assert any(t.name == "pair 7 chosen (selected)" for t in disp.lines.data)
    assert "pair 7" in board.banner.value
    with pytest.raises(rmlab.ArgumentError, match="not rmlab explorers"):
        W.Dashboard({"x": object()})


def test_token_viewer_pages_through_long_responses():
    n = 1500
    tokens = pd.DataFrame({
        "pair": 0, "side": ["chosen"] * n + ["rejected"] * 5, "position": list(range(n)) + list(range(5)),
        "token": [f"t{i}" for i in range(n)] + list("abcde"), "reward": np.linspace(-1, 1, n + 5),
    })
    pairs = [{"prompt": "p", "chosen": "long", "rejected": "short"}]
    viewer = W.TokenRewardViewer(pairs, frames={"implicit DPO reward": tokens}, max_tokens=600)
    assert viewer.last_error is None and viewer.page.layout.display is None
    assert viewer.page.max == 1200
    z = np.asarray(viewer.figure.data[0].z, float).ravel()
    assert np.isfinite(z).sum() == 600 and z[0] == tokens["reward"].iloc[0]
    viewer.page.value = 1200
    z = np.asarray(viewer.figure.data[0].z, float).ravel()
    assert np.isfinite(z).sum() == 300
    np.testing.assert_allclose(z[:300], tokens["reward"].iloc[1200:1500])
    assert "tokens 1200-1499 of 1500" in viewer.figure.layout.title.text


def test_token_viewer_loads_models_given_by_path_once(world, held, tmp_path, monkeypatch):
    import rmlab.io.models as models

    for name, model in (("policy", world.dpo[0.1]), ("reference", world.sft)):
        model.save_pretrained(tmp_path / name)
        world.tokenizer.save_pretrained(tmp_path / name)
    loads = []
    real = models._loaded

    def counting(*args, **kwargs):
        loads.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(models, "_loaded", counting)
    viewer = W.TokenRewardViewer(held, policy=str(tmp_path / "policy"), reference=str(tmp_path / "reference"), beta=0.1)
    paths = [p for p in loads if isinstance(p, str)]
    assert len(paths) == 2
    viewer.selection.pair = 2
    viewer.selection.pair = 3
    assert viewer.last_error is None and [p for p in loads if isinstance(p, str)] == paths  # no reloads per pair
    direct = rmlab.token_rewards(world.dpo[0.1], world.sft, held.iloc[[3]], beta=0.1, progress=False)
    shown = np.asarray(viewer.figure.data[0].z, float).ravel()
    chosen = direct[direct.side == "chosen"]["reward"].to_numpy()
    np.testing.assert_allclose(shown[: len(chosen)], chosen, rtol=1e-5)
