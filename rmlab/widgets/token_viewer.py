"""A token-reward viewer: one pair's chosen and rejected responses, each token coloured by its reward."""

from __future__ import annotations

import html

import ipywidgets as widgets
import pandas as pd
import plotly.graph_objects as go

from rmlab import plots
from rmlab.errors import ArgumentError
from rmlab.io.models import LOAD_ONLY_OPTIONS, LOAD_OPTIONS, load_causal_lm, load_reward_model
from rmlab.io.pairs import load_pairs
from rmlab.widgets.base import Explorer, Selection, replace_figure

IMPLICIT, DENSE, ATTRIBUTION = "implicit DPO reward", "dense RM reward", "attribution"
MODES = (IMPLICIT, DENSE, ATTRIBUTION)


def _text_html(value) -> str:
    """A prompt (string or chat messages) as escaped HTML."""
    if isinstance(value, (list, tuple)):
        return "<br>".join(
            f"<i>{html.escape(str(m.get('role', '?')))}</i>: {html.escape(str(m.get('content', '')))}"
            if isinstance(m, dict) else html.escape(str(m))
            for m in value
        )
    return html.escape(str(value))


class TokenRewardViewer(Explorer):
    """Pick a pair and a mode; see its responses as text coloured token by token (diverging at zero).

    Modes, each computed by rmlab's core for the selected pair only, when first shown (then kept):

    - ``"implicit DPO reward"``: :func:`rmlab.token_rewards`, ``beta * log(pi/pi_ref)`` per token
      (Rafailov et al. 2024, "From r to Q*"); needs ``policy`` and ``reference``.
    - ``"dense RM reward"``: :func:`rmlab.dense_rewards`, the reward model's score of each prefix
      minus the previous one; needs ``reward_model``.
    - ``"attribution"``: :func:`rmlab.attribute_reward` (integrated gradients by default) of the
      reward model's score, or of the policy's implicit reward when there is no reward model; prompt
      tokens are shown too.

    Args:
        data: the preference pairs (anything :func:`rmlab.load_pairs` reads).
        policy, reference: DPO policy and its reference (for the implicit mode, and attribution without
            a reward model); model objects or hub names / local paths (loaded once, here).
        reward_model: a sequence-classification reward model (dense mode, attribution).
        tokenizer: shared tokenizer (loaded from the models' paths when None).
        beta: DPO's beta for implicit rewards.
        attribution_method: ``"integrated_gradients"``, ``"feature_ablation"`` or ``"shapley"``.
        frames: precomputed per-token frames by mode (e.g. ``{"implicit DPO reward": tokens}``), used
            instead of computing; rows of any pair present are shown as they are.
        selection: the shared :class:`Selection`; pair 0 is selected when it has none.
        width, max_tokens: tokens per line and tokens drawn at once: a longer response gets a
            "from token" slider to page through it (see :func:`rmlab.plots.token_reward_text`).
        **options: passed to the core calls (``max_length``, ``device``, ``dtype``, ...).
    """

    def __init__(
        self,
        data,
        *,
        policy=None,
        reference=None,
        reward_model=None,
        tokenizer=None,
        beta: float = 0.1,
        attribution_method: str = "integrated_gradients",
        frames: dict[str, pd.DataFrame] | None = None,
        selection: Selection | None = None,
        width: int = 12,
        max_tokens: int = 600,
        **options,
    ):
        self.pairs = load_pairs(data)
        # names / paths are loaded once here, not once per pair shown
        loading = {k: options[k] for k in LOAD_OPTIONS if k in options}
        if policy is not None:
            policy = load_causal_lm(policy, role="policy", **loading)
        if reference is not None:
            reference = load_causal_lm(reference, role="reference", **loading)
        if reward_model is not None:
            reward_model = load_reward_model(reward_model, **loading)
        self.policy, self.reference, self.reward_model = policy, reference, reward_model
        self.tokenizer, self.beta = tokenizer, beta
        self.options = {k: v for k, v in options.items() if k not in LOAD_ONLY_OPTIONS}
        self.attribution_method = attribution_method
        self.width, self.max_tokens = width, max_tokens
        self.cache: dict[tuple[str, int], pd.DataFrame] = {}
        self._paging = False
        given = dict(frames or {})
        unknown = sorted(set(given) - set(MODES))
        if unknown:
            raise ArgumentError(f"frames has unknown modes {unknown}; use {list(MODES)}.")
        self.frames = given
        available = [m for m in MODES if m in given or self._can_compute(m)]
        if not available:
            raise ArgumentError(
                "TokenRewardViewer has nothing to show: pass policy= and reference= (implicit DPO rewards), "
                "reward_model= (dense rewards, attribution), or precomputed frames=."
            )
        self.mode = widgets.ToggleButtons(options=available, value=available[0], description="mode",
                                          style={"button_width": "150px"})
        self.pair = widgets.BoundedIntText(value=0, min=0, max=len(self.pairs) - 1, description="pair",
                                           layout=widgets.Layout(width="160px"))
        self.status = widgets.HTML()
        self.text = widgets.HTML()
        # long responses are drawn a page of max_tokens at a time; the slider appears when needed
        self.page = widgets.IntSlider(value=0, min=0, max=0, step=max_tokens, description="from token",
                                      continuous_update=False, layout=widgets.Layout(display="none", width="520px"))
        self.figure = go.FigureWidget()
        super().__init__([widgets.HBox([self.pair, self.status]), self.mode, self.text, self.page, self.figure],
                         selection=selection)
        self.pair.observe(self.callback(lambda change: self.select(change["new"])), "value")
        self.mode.observe(self.callback(lambda _change: self.redraw()), "value")
        self.page.observe(self.callback(lambda _change: None if self._paging else self.redraw()), "value")
        if self.selection.pair is None:
            self.select(0)
        else:
            self.guarded(self.redraw)

    def _can_compute(self, mode: str) -> bool:
        if mode == IMPLICIT:
            return self.policy is not None and self.reference is not None
        if mode == DENSE:
            return self.reward_model is not None
        return self.reward_model is not None or (self.policy is not None and self.reference is not None)

    def show_pair(self, pair: int | None) -> None:
        if pair is None or not hasattr(self, "figure"):
            return
        if not 0 <= pair < len(self.pairs):
            raise ArgumentError(f"pair {pair} is not in the data (pairs 0..{len(self.pairs) - 1}).")
        if self.pair.value != pair:
            self.pair.value = pair
        self._paging = True  # a new pair starts at its first token
        try:
            self.page.value = 0
        finally:
            self._paging = False
        self.redraw()

    def tokens(self, mode: str, pair: int) -> pd.DataFrame:
        """The per-token frame of ``pair`` in ``mode`` (computed once, then cached)."""
        if mode in self.frames:
            key = "row" if "row" in self.frames[mode].columns else "pair"
            rows = self.frames[mode][self.frames[mode][key] == pair]
            if not rows.empty or not self._can_compute(mode):
                return rows
        if (mode, pair) not in self.cache:
            one = self.pairs.iloc[[pair]]
            common = dict(tokenizer=self.tokenizer, progress=False, **self.options)
            if mode == IMPLICIT:
                from rmlab.rewards.implicit import token_rewards

                frame = token_rewards(self.policy, self.reference, one, beta=self.beta, **common)
            elif mode == DENSE:
                from rmlab.rewards.dense import dense_rewards

                frame = dense_rewards(self.reward_model, one, **common)
            else:
                from rmlab.rewards.attribution import attribute_reward

                if self.reward_model is not None:
                    frame = attribute_reward(self.reward_model, one, method=self.attribution_method, **common)
                else:
                    frame = attribute_reward(self.policy, one, reference=self.reference, beta=self.beta,
                                             method=self.attribution_method, **common)
            frame = frame.copy()
            frame["pair"] = pair
            self.cache[(mode, pair)] = frame
        return self.cache[(mode, pair)]

    def redraw(self) -> None:
        """Recompute (if needed) and redraw the selected pair in the current mode."""
        pair, mode = self.pair.value, self.mode.value
        self.status.value = f"<i>computing {mode} for pair {pair} ...</i>"
        try:
            tokens = self.tokens(mode, pair)
            value = "attribution" if mode == ATTRIBUTION else "reward"
            if tokens.empty:
                raise ArgumentError(f"the precomputed {mode} frame has no rows for pair {pair}.")
            longest = int(tokens.groupby("side").size().max())
            self.page.max = max(0, (longest - 1) // self.max_tokens * self.max_tokens)
            self.page.layout.display = None if longest > self.max_tokens else "none"
            fig = plots.token_reward_text(tokens, pair, value=value, width=self.width, max_tokens=self.max_tokens,
                                          start=min(self.page.value, self.page.max))
            replace_figure(self.figure, fig)
            prompt = self.pairs.iloc[pair]["prompt"]
            self.text.value = (
                "<div style='font-size:0.9em;color:#444;max-height:4.5em;overflow:auto'><b>prompt</b>: "
                + _text_html(prompt) + "</div>"
            )
        finally:
            self.status.value = ""
