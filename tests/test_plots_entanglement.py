"""Entanglement and displacement figures, from hand-made frames with known answers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from rmlab import plots
from rmlab.errors import DataError


def test_entanglement_scatter_counts_pairs_above_the_boundary():
    frame = pd.DataFrame(
        {
            "pair": [0, 1, 2, 3],
            "grad_sq_chosen": [1.0, 2.0, 3.0, 4.0],
            "grad_inner": [2.0, 1.0, 3.5, -1.0],  # pairs 0 and 2 lie above <g_w,g_l> = |g_w|^2
            "pred_delta_chosen": [-1.0, 1.0, -0.5, 5.0],
        }
    )
    fig = plots.entanglement_scatter(frame)
    assert "50%" in fig.layout.title.text
    points, line = fig.data
    np.testing.assert_allclose(points.marker.color, frame["pred_delta_chosen"])
    assert points.marker.cmid == 0 and list(line.x) == list(line.y)
    realised = frame.assign(real_delta_chosen=[-2.0, 0.5, -1.0, 3.0])
    assert list(plots.entanglement_scatter(realised).data[0].marker.color) == [-2.0, 0.5, -1.0, 3.0]


def test_similarity_heatmap_is_the_pivot_of_the_long_frame():
    long = pd.DataFrame(
        [(a, b, float(10 * a + b)) for a in range(3) for b in range(3)], columns=["pair_a", "pair_b", "inner"]
    )
    fig = plots.similarity_heatmap(long)
    z = np.asarray(fig.data[0].z)
    assert z.shape == (3, 3) and z[1, 2] == 12.0 and z[2, 1] == 21.0
    with pytest.raises(DataError, match="rmlab.gradient_similarity"):
        plots.similarity_heatmap(long.drop(columns="inner"))


def trajectories():
    rows = []
    for pair, slope in enumerate([-1.0, 0.5, -0.2]):
        for step in range(4):
            rows.append({"step": step, "pair": pair, "logps_chosen": -10 + slope * step, "logps_rejected": -12 - step})
    return pd.DataFrame(rows)


def test_displacement_trajectories_are_relative_to_step_zero():
    fig = plots.displacement_trajectories(trajectories())
    assert "67%" in fig.layout.title.text  # pairs 0 and 2 fell
    first_pair = fig.data[0]  # the pair that fell most is drawn first
    np.testing.assert_allclose(first_pair.y, [0, -1, -2, -3])
    mean_chosen = [t for t in fig.data if t.name == "chosen (mean over all pairs)"][0]
    np.testing.assert_allclose(mean_chosen.y, np.arange(4) * (-1.0 + 0.5 - 0.2) / 3)
    with pytest.raises(DataError, match="not in the trajectories"):
        plots.displacement_trajectories(trajectories(), pairs=[7])


def test_ches_vs_change_reports_the_rank_correlation():
    ches = pd.DataFrame({"pair": [0, 1, 2], "ln_ches": [3.0, -1.0, 1.0]})
    fig = plots.ches_vs_change(ches, trajectories())
    # changes: pair 0 -3, pair 1 +1.5, pair 2 -0.6: ln_ches ranks them exactly in reverse
    assert "-1.00" in fig.layout.title.text
    np.testing.assert_allclose(sorted(fig.data[0].y), [-3.0, -0.6, 1.5])
