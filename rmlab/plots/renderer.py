"""How rmlab figures display in a notebook: live in JupyterLab, and still there once exported.

JupyterLab, Notebook 7 and VS Code render plotly's own mimetype (``application/vnd.plotly.v1+json``)
with their plotly extension. An exported notebook (nbconvert HTML) or a viewer without a kernel only
shows ``text/html``, and plotly's built-in ``notebook`` renderer fills that with a script loading
MathJax from a CDN. The ``rmlab`` renderer registered here emits both: the mimetype for live
frontends and an HTML fallback that carries plotly.js inline (once per kernel: the first figure)
and loads nothing from the network. Figure text never needs MathJax (rmlab's titles are plain text).
"""

from __future__ import annotations

import plotly.io as pio
from plotly.io._base_renderers import MimetypeRenderer

RENDERER = "rmlab"
_state = {"plotlyjs_sent": False}  # module-level: plotly copies renderers before using them


class _InlineRenderer(MimetypeRenderer):
    """plotly mimetype + self-contained HTML (plotly.js inline the first time, no CDN, no requirejs)."""

    def to_mimebundle(self, fig_dict):
        bundle = pio.renderers["plotly_mimetype"].to_mimebundle(fig_dict)
        bundle["text/html"] = pio.to_html(
            fig_dict,
            include_plotlyjs=not _state["plotlyjs_sent"],
            include_mathjax=False,
            full_html=False,
            default_width="100%",
            default_height=480,
            validate=False,
        )
        _state["plotlyjs_sent"] = True
        return bundle


def setup_notebook() -> None:
    """Make every plotly figure in this kernel render live *and* survive export without a kernel.

    Registers the ``rmlab`` renderer and makes it plotly's default. Call it once at the top of a
    notebook (rmlab's notebooks do). The first figure shown afterwards embeds plotly.js (about
    4.8 MB) in its output, so the saved notebook or its nbconvert HTML shows every figure offline.
    Calling it again starts over (the next figure embeds plotly.js again), which keeps a notebook
    correct when it is re-run from the top.
    """
    pio.renderers[RENDERER] = _InlineRenderer()
    _state["plotlyjs_sent"] = False
    pio.renderers.default = RENDERER
