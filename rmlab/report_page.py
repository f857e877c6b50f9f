"""A static HTML report of rmlab figures: shareable without Jupyter, a kernel or a network.

:func:`report` computes the figures for a policy / reference / reward model on preference data, or
for the embedded toy world with no arguments; :func:`write_report` writes any figures and tables.

plotly.js is embedded once, inline (no CDN, no requirejs), so the file opens offline in any
browser. All text taken from models or data is HTML-escaped.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go

from rmlab.errors import ArgumentError
from rmlab.options import CACHING, LOADING, RUNNING, TOKENIZING, Options, with_options


def write_report(
    path: str | Path,
    figures: dict[str, go.Figure],
    *,
    title: str = "rmlab report",
    tables: dict[str, pd.DataFrame] | None = None,
    notes: list[str] | None = None,
) -> Path:
    """Write figures (and small tables) into one self-contained HTML file.

    Args:
        path: output file.
        figures: section heading -> plotly figure.
        title: page title.
        tables: section heading -> DataFrame, rendered as escaped HTML tables.
        notes: paragraphs of plain text shown under the title.

    Returns:
        The path written.
    """
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;font-size:0.9em}td,th{border:1px solid #ccc;padding:2px 8px;"
        "text-align:right}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    parts += [f"<p>{html.escape(n)}</p>" for n in notes or []]
    for name, table in (tables or {}).items():
        parts.append(f"<h2>{html.escape(name)}</h2>")
        parts.append(table.to_html(escape=True, float_format=lambda v: f"{v:.4g}", index=False))
    first = True
    for name, fig in figures.items():
        parts.append(f"<h2>{html.escape(name)}</h2>")
        parts.append(fig.to_html(full_html=False, include_plotlyjs=True if first else False))
        first = False
    parts.append("</body></html>")
    path = Path(path)
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# what goes into a report
# ---------------------------------------------------------------------------------------------
@dataclass
class ReportContents:
    """Everything a report shows: figures, small tables and notes (plain text), under a title."""

    title: str
    figures: dict[str, go.Figure] = field(default_factory=dict)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _pair_options(options: Options) -> Options:
    """``options`` for the DPO calls: ``add_eos=None`` becomes implicit_rewards' default (True, as
    TRL's DPOTrainer appends EOS)."""
    return options.replace(add_eos=True) if options.add_eos is None else options


def _largest_margin_tokens(policy, reference, pairs, rewards, *, beta, options: Options):
    shown = int(rewards["margin"].abs().idxmax())
    from rmlab.rewards.implicit import token_rewards

    tokens = token_rewards(policy, reference, pairs.iloc[[shown]], beta=beta, options=options)
    tokens["pair"] = shown
    return shown, tokens


def _dpo_section(contents, policy, reference, pairs, *, beta, options: Options):
    from rmlab import plots
    from rmlab.rewards.implicit import dpo_metrics, implicit_rewards

    options = _pair_options(options)
    rewards = implicit_rewards(policy, reference, pairs, beta=beta, options=options)
    metrics = dpo_metrics(rewards)
    contents.tables["DPO policy: the metrics TRL's DPOTrainer logs"] = pd.DataFrame(
        {"metric": list(metrics.index), "value": metrics.to_numpy(dtype=float)}
    )
    contents.figures["Implicit reward margins"] = plots.reward_margins(rewards)
    shown, tokens = _largest_margin_tokens(policy, reference, pairs, rewards, beta=beta, options=options)
    contents.figures[f"Token-level implicit rewards (pair {shown}, the largest |margin|)"] = plots.token_reward_text(tokens, shown)
    return rewards


def _reward_model_section(contents, reward_model, pairs, *, name, implicit, options: Options):
    from rmlab import plots
    from rmlab.diagnostics.reward_model import reward_model_report
    from rmlab.rewards.scores import reward_scores

    scores = reward_scores(reward_model, pairs, options=options)
    report_ = reward_model_report(scores, implicit=implicit)
    lengths = report_.length_bias.set_index("slice")
    row = {"reward_model": name, "accuracy": report_.summary["accuracy"], "ece": report_.summary["ece"]}
    if "rejected longer" in lengths.index:
        row["accuracy_longer_rejected"] = lengths.at["rejected longer", "accuracy"]
    contents.figures[f"Calibration of {name}"] = plots.calibration_diagram(report_.calibration)
    contents.figures[f"Length bias of {name}"] = plots.length_bias(scores)
    return row


#: The options of the report's core calls; ``add_eos=None`` gives each call its own default.
REPORT_OPTIONS = (*TOKENIZING, *RUNNING, *LOADING, *CACHING)


@with_options(*REPORT_OPTIONS, defaults={"add_eos": None})
def collect_report(
    policy=None,
    reference=None,
    data=None,
    *,
    reward_model=None,
    beta: float = 0.1,
    pairs: int | None = 200,
    world=None,
    options: Options,
) -> ReportContents:
    """The figures, tables and notes of :func:`report`, without writing them (see there for the
    analyses and the papers they follow)."""
    from rmlab.engine.pairs import check_beta
    from rmlab.io.pairs import load_pairs

    beta = check_beta(beta)
    if pairs is not None and (isinstance(pairs, bool) or not isinstance(pairs, int) or pairs < 1):
        raise ArgumentError(f"pairs={pairs!r} must be a positive number of pairs, or None for all of them.")
    if policy is None and reference is None and data is None and reward_model is None:
        return _toy_contents(world, pairs or 200, options.progress)
    if data is None:
        raise ArgumentError("report needs data= (preference pairs) to score the models on.")
    if (policy is None) != (reference is None):
        raise ArgumentError(
            "report needs both policy and reference for implicit DPO rewards (reference: usually the SFT "
            "model the policy started from); pass neither to report on reward_model= alone."
        )
    if policy is None and reward_model is None:
        raise ArgumentError("report needs a policy and reference, a reward_model=, or both.")
    frame = load_pairs(data)
    # names / paths are loaded once, not once per section
    from rmlab.io.models import load_causal_lm, load_reward_model

    if policy is not None:
        policy = load_causal_lm(policy, role="policy", **options.loading)
        reference = load_causal_lm(reference, role="reference", **options.loading)
    if reward_model is not None:
        reward_model = load_reward_model(reward_model, **options.loading)
    if pairs is not None:
        frame = frame.iloc[:pairs].reset_index(drop=True)
    contents = ReportContents(title="rmlab report")
    contents.notes.append(f"{len(frame)} preference pairs scored.")
    implicit = None
    if policy is not None:
        implicit = _dpo_section(contents, policy, reference, frame, beta=beta, options=options)
        contents.notes.append(
            f"Implicit DPO rewards r = beta * log(pi/pi_ref) with beta = {beta:g} (Rafailov et al. 2023)."
        )
    if reward_model is not None:
        row = _reward_model_section(contents, reward_model, frame, name="the reward model", implicit=implicit,
                                    options=options)
        contents.tables["Reward model: accuracy, calibration error, accuracy when the longer answer was rejected"] = (
            pd.DataFrame([row])
        )
    return contents


def _toy_contents(world, n_pairs: int, progress: bool) -> ReportContents:
    """The toy world's report: its DPO policies, its three proxy reward models, data quality, entanglement."""
    import numpy as np

    from rmlab import plots
    from rmlab.diagnostics.data import preference_strength
    from rmlab.diagnostics.entanglement import gradient_entanglement
    from rmlab.rewards.implicit import implicit_rewards
    from rmlab.toy import load

    world = load(world)
    held = world.heldout.iloc[:n_pairs].reset_index(drop=True)
    tok = world.tokenizer
    gc, gr = held["gold_chosen"].to_numpy(), held["gold_rejected"].to_numpy()
    gold_acc = float(np.mean(np.where(gc == gr, 0.5, (gc > gr).astype(float))))
    contents = ReportContents(title="rmlab report: the toy RLHF world")
    contents.notes.append(
        f"toy world {world.root}: {len(world.pairs)} pairs, {len(held)} held-out pairs scored; gold reward "
        f"accuracy on these pairs (ties = 1/2): {gold_acc:.3f}. Implicit DPO rewards r = beta * log(pi/pi_ref) "
        "of DPO policies trained on the toy world's preference pairs, with the SFT policy as reference."
    )
    frames = []
    for beta, policy in sorted(world.dpo.items()):
        frame = implicit_rewards(policy, world.sft, held, tokenizer=tok, beta=beta, progress=progress)
        frame["beta"] = beta
        frames.append(frame)
    rewards = pd.concat(frames, ignore_index=True)
    fell = (rewards["logps_chosen"] < rewards["ref_logps_chosen"]).astype(float)
    summary = (
        rewards.assign(chosen_logp_fell=fell)
        .groupby("beta")
        .agg(accuracy=("correct", "mean"), margin=("margin", "mean"), chosen_logp_fell=("chosen_logp_fell", "mean"))
        .reset_index()
    )
    contents.tables["DPO policies: implicit-reward accuracy on held-out pairs"] = summary
    contents.figures["Implicit reward margins of the DPO policies"] = plots.reward_margins(rewards, by="beta")
    beta = sorted(world.dpo)[len(world.dpo) // 2]
    mid = rewards[rewards["beta"] == beta].reset_index(drop=True)
    quiet = Options(tokenizer=tok, progress=False, add_eos=None)  # each call's own EOS default
    shown, tokens = _largest_margin_tokens(world.dpo[beta], world.sft, held, mid, beta=beta,
                                           options=_pair_options(quiet))
    contents.figures[f"Token-level implicit rewards (beta={beta:g}, pair {shown}, the largest |margin|)"] = (
        plots.token_reward_text(tokens, shown)
    )
    rows = []
    for k, rm in enumerate(world.reward_models):
        section = ReportContents(title="") if k else contents  # figures of proxy 0 only
        rows.append(_reward_model_section(section, rm, held, name=f"proxy reward model {k}", implicit=None,
                                          options=quiet))
    contents.tables["Proxy reward models: accuracy, calibration error, accuracy when the longer answer was rejected"] = (
        pd.DataFrame(rows)
    )
    strength = preference_strength(world.reward_models, held, tokenizer=tok, progress=False)
    flagged, flipped = strength["likely_mislabelled"], strength["flipped"].astype(bool)
    contents.notes.append(
        f"Preference strength over the 3 proxies: {int(flagged.sum())} pairs flagged as likely mislabelled, "
        f"{flipped[flagged].mean():.0%} of them really flipped (base rate {flipped.mean():.0%})."
    )
    contents.figures["Preference strength over the three proxies (open circles: labels the noise flipped)"] = (
        plots.preference_strength_map(strength)
    )
    entangled = gradient_entanglement(world.dpo[0.1], held.head(60), reference=world.sft, tokenizer=tok, beta=0.1,
                                      progress=False)
    contents.notes.append(
        f"Gradient entanglement (DPO beta=0.1, {len(entangled)} pairs): a DPO step lowers the chosen log-prob of "
        f"{entangled['chosen_falls'].mean():.0%} of pairs; median gradient cosine {entangled['grad_cosine'].median():.2f}."
    )
    contents.figures["Gradient entanglement of the DPO beta=0.1 policy"] = plots.entanglement_scatter(entangled)
    curve = pd.DataFrame(world.manifest["metrics"]["best_of_n"])
    contents.figures["Best-of-n against proxy 0, measured when the toy world was built"] = plots.overoptimization_curve(curve)
    return contents


@with_options(*REPORT_OPTIONS, defaults={"add_eos": None})
def report(
    policy=None,
    reference=None,
    data=None,
    *,
    reward_model=None,
    beta: float = 0.1,
    pairs: int | None = 200,
    out: str | Path = "rmlab-report.html",
    world=None,
    options: Options,
) -> Path:
    """Write one self-contained HTML report (plotly inline, no network needed to view it).

    With no models and no data it reports on the embedded toy world (no download): its three DPO
    policies (implicit-reward accuracy and margins, Rafailov et al. 2023; token-level rewards), its
    three proxy reward models (accuracy, calibration, Guo et al. 2017; length bias, Singhal et al.
    2023), preference strength over the proxies (Wang et al. 2024), gradient entanglement (Yuan et al.
    2024) and the best-of-n overoptimization curve (Gao et al. 2022).

    With models, for the given preference ``data``: ``policy`` and ``reference`` give the DPO
    section (:func:`rmlab.implicit_rewards`, :func:`rmlab.dpo_metrics`, margins, the token rewards of
    the pair with the largest margin); ``reward_model`` the reward-model section
    (:func:`rmlab.reward_scores`, :func:`rmlab.reward_model_report`: calibration, length bias,
    agreement with the DPO policy when both are given). Models are objects or hub names / paths.

    Args:
        policy, reference: DPO policy and reference (both or neither).
        data: preference pairs (anything :func:`rmlab.load_pairs` reads).
        reward_model: a sequence-classification reward model.
        tokenizer: shared tokenizer (loaded from the models' paths when None).
        beta: DPO's beta (> 0).
        pairs: score the first ``pairs`` pairs (None: all).
        out: the HTML file to write.
        world: the toy world's folder (default: the shipped ``data/toy``), for the toy report.
        progress: show progress bars.
        max_length, truncation_mode, add_eos, chat_template_kwargs, batch_tokens, device, dtype,
            runner, trust_remote_code, revision, use_safetensors, cache_dir, overwrite_cache: how the
            models load and run, as in :func:`rmlab.implicit_rewards` and :func:`rmlab.reward_scores`
            (``add_eos=None``, the default, gives each its own: EOS appended for the DPO policy,
            appended for the reward model unless its tokenizer closes texts itself). The toy report
            uses the toy world's own settings.
        options: all of the above (and ``tokenizer``) as one :class:`rmlab.Options` (flat keywords
            override it).

    Returns:
        The path written. :func:`collect_report` returns the contents without writing.
    """
    contents = collect_report(policy, reference, data, reward_model=reward_model, beta=beta, pairs=pairs, world=world,
                              options=options)
    return write_report(out, contents.figures, title=contents.title, tables=contents.tables, notes=contents.notes)
