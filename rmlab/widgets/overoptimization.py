"""The overoptimization explorer: pick a proxy or an ensemble, the KL axis, and the fitted law."""

from __future__ import annotations

from collections.abc import Mapping

import ipywidgets as widgets
import pandas as pd
import plotly.graph_objects as go

from rmlab import plots
from rmlab.errors import DataError
from rmlab.widgets.base import Explorer, Selection, replace_figure

ALL = "all"


class OveroptimizationExplorer(Explorer):
    """Gold and proxy reward against KL (best-of-n or checkpoints), with Gao et al.'s fits on demand.

    Gao et al. 2022: optimising a proxy reward raises the proxy while the gold reward rises, peaks
    and falls; best-of-n follows ``R(d) = d (alpha - beta d)`` and RL ``R(d) = d (alpha - beta log d)``
    with ``d = sqrt(KL)``. Ensembles of proxies (Coste et al. 2023) are further curves to toggle.

    Args:
        curves: a :func:`rmlab.best_of_n` / :func:`rmlab.checkpoint_curve` frame (with ``proxy_name``
            when it holds several proxies or ensembles), or ``{name: frame}``.
        form: the law to fit, ``"bon"`` or ``"rl"``.
        bootstrap: bootstrap draws of each fit (its band): draws of the prompts for
            :func:`rmlab.best_of_n` frames, which carry their per-prompt values, of the points otherwise
            (see :func:`rmlab.fit_overoptimization`).
        selection: accepted for a :class:`~rmlab.widgets.Dashboard`; this view has no pairs.

    Controls: which proxy (or all), the x-axis (``sqrt(KL)`` or ``KL``), and the fit on or off. Fits
    are computed once per proxy (:func:`rmlab.fit_overoptimization`) and kept.
    """

    def __init__(self, curves, *, form: str = "bon", bootstrap: int = 300, selection: Selection | None = None):
        if isinstance(curves, Mapping):
            parts = []
            for name, frame in curves.items():
                part = frame.copy()
                part["proxy_name"] = str(name)
                parts.append(part)
            curves = pd.concat(parts, ignore_index=True)
        if not isinstance(curves, pd.DataFrame) or not {"kl", "proxy", "gold"} <= set(curves.columns):
            raise DataError("OveroptimizationExplorer needs a best-of-n or checkpoint curve (columns kl, proxy, gold).")
        self.curves, self.form, self.bootstrap = curves, form, bootstrap
        names = list(dict.fromkeys(curves["proxy_name"])) if "proxy_name" in curves.columns else []
        self.fits: dict = {}
        self.proxy = widgets.Dropdown(options=[ALL, *names] if names else [ALL], value=ALL, description="proxy",
                                      disabled=not names)
        self.axis = widgets.ToggleButtons(options=[("sqrt(KL)", "sqrt_kl"), ("KL", "kl")], value="sqrt_kl",
                                          description="x-axis", style={"button_width": "80px"})
        self.fit = widgets.Checkbox(value=True, description=f"fit ({form})", indent=False)
        self.summary = widgets.HTML()
        self.figure = go.FigureWidget()
        super().__init__([widgets.HBox([self.proxy, self.axis, self.fit]), self.summary, self.figure],
                         selection=selection)
        for control in (self.proxy, self.axis, self.fit):
            control.observe(self.callback(lambda _change: self.redraw()), "value")
        self.guarded(self.redraw)

    def shown(self) -> pd.DataFrame:
        """The curve(s) of the chosen proxy, or all of them."""
        if self.proxy.value == ALL or "proxy_name" not in self.curves.columns:
            return self.curves
        part = self.curves[self.curves["proxy_name"] == self.proxy.value].drop(columns="proxy_name")
        part.attrs = {**self.curves.attrs, "proxy_name": self.proxy.value}
        return part

    def fit_for(self, name):
        """The fitted law of one proxy's curve (computed once)."""
        from rmlab.diagnostics.scaling_laws import fit_overoptimization

        if name not in self.fits:
            if "proxy_name" in self.curves.columns:
                part = self.curves[self.curves["proxy_name"] == name].drop(columns="proxy_name")
            else:
                part = self.curves
            fit = fit_overoptimization(part, self.form, bootstrap=self.bootstrap)
            fit.name = name
            self.fits[name] = fit
        return self.fits[name]

    def redraw(self) -> None:
        """Redraw with the current controls."""
        if not hasattr(self, "figure"):
            return
        frame = self.shown()
        names = list(dict.fromkeys(frame["proxy_name"])) if "proxy_name" in frame.columns else [frame.attrs.get("proxy_name")]
        fits = {str(n): self.fit_for(n if "proxy_name" in self.curves.columns else None) for n in names} if self.fit.value else None
        fig = plots.overoptimization_curve(frame, fit=fits, x_axis=self.axis.value)
        fig.update_layout(height=520)
        replace_figure(self.figure, fig)
        if fits:
            self.summary.value = "<br>".join(
                f"{name}: fitted peak of gold at KL = {f.peak_kl:.3g} (gold {f.peak_gold:.3g}), R² = {f.r2:.3f}"
                for name, f in fits.items()
            )
        else:
            self.summary.value = ""
