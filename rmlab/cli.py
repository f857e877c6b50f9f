"""The ``rmlab`` command line: ``rmlab demo`` and ``rmlab build-toy``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def _demo(args) -> int:
    import numpy as np
    import pandas as pd

    import rmlab
    from rmlab import plots
    from rmlab.report import write_report
    from rmlab.rewards.scores import reward_scores
    from rmlab.toy import load

    start = time.time()
    world = load(args.world)
    held = world.heldout.iloc[: args.pairs]
    print(f"toy world: {world.root}  ({len(world.pairs)} pairs, {len(held)} held-out pairs scored)")
    print(f"gold reward accuracy on these pairs (ties = 1/2): {_gold_accuracy(held):.3f}")

    frames = []
    for beta, policy in sorted(world.dpo.items()):
        frame = rmlab.implicit_rewards(
            policy, world.sft, held, tokenizer=world.tokenizer, beta=beta, progress=not args.quiet
        )
        frame["beta"] = beta
        frames.append(frame)
    rewards = pd.concat(frames, ignore_index=True)
    summary = rewards.groupby("beta").agg(
        accuracy=("correct", "mean"),
        margin=("margin", "mean"),
        chosen_logp_fell=("logps_chosen", lambda s: float(np.mean(s < rewards.loc[s.index, "ref_logps_chosen"]))),
    ).reset_index()
    print("\nDPO policies: implicit-reward accuracy on held-out pairs")
    print(summary.to_string(index=False, float_format=lambda v: f"{v:.3f}"))

    rm_rows, first_scores = [], None
    for k, rm in enumerate(world.reward_models):
        scores = reward_scores(rm, held, tokenizer=world.tokenizer, progress=False)
        report = rmlab.reward_model_report(scores)
        lengths = report.length_bias.set_index("slice")
        rm_rows.append(
            {
                "reward_model": k,
                "accuracy": report.summary["accuracy"],
                "ece": report.summary["ece"],
                "accuracy_longer_rejected": lengths.at["rejected longer", "accuracy"],
            }
        )
        if first_scores is None:
            first_scores, first_report = scores, report
    rm_table = pd.DataFrame(rm_rows)
    print("\nproxy reward models on held-out pairs (accuracy, calibration error, accuracy when the longer answer was rejected)")
    print(rm_table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    strength = rmlab.preference_strength(world.reward_models, held, tokenizer=world.tokenizer, progress=False)
    flagged, flipped = strength["likely_mislabelled"], strength["flipped"].astype(bool)
    print(
        f"preference strength over the 3 proxies: {int(flagged.sum())} pairs flagged as likely mislabelled, "
        f"{flipped[flagged].mean():.0%} of them really flipped (base rate {flipped.mean():.0%})"
    )
    entangled = rmlab.gradient_entanglement(
        world.dpo[0.1], held.head(60), reference=world.sft, tokenizer=world.tokenizer, beta=0.1, progress=False
    )
    print(
        f"gradient entanglement (DPO beta=0.1, 60 pairs): a DPO step lowers the chosen log-prob of "
        f"{entangled['chosen_falls'].mean():.0%} of pairs; median gradient cosine {entangled['grad_cosine'].median():.2f}"
    )

    beta = sorted(world.dpo)[len(world.dpo) // 2]
    shown = int(rewards[rewards["beta"] == beta]["margin"].abs().idxmax() % len(held))
    tokens = rmlab.token_rewards(
        world.dpo[beta], world.sft, held.iloc[[shown]], tokenizer=world.tokenizer, beta=beta, progress=False
    )
    figures = {
        "Implicit reward margins of the DPO policies": plots.reward_margins(rewards, by="beta"),
        f"Token-level implicit rewards (beta={beta:g}, the pair with the largest margin)": plots.token_reward_text(
            tokens, 0
        ),
    }
    figures["Calibration of proxy reward model 0"] = plots.calibration_diagram(first_report)
    figures["Length bias of proxy reward model 0"] = plots.length_bias(first_scores)
    figures["Preference strength over the three proxies (open circles: labels the noise flipped)"] = (
        plots.preference_strength_map(strength)
    )
    figures["Gradient entanglement of the DPO beta=0.1 policy"] = plots.entanglement_scatter(entangled)
    curve = pd.DataFrame(world.manifest["metrics"]["best_of_n"])
    figures["Best-of-n against proxy 0, measured at build time"] = plots.overoptimization_curve(curve)
    out = write_report(
        args.out,
        figures,
        title="rmlab demo: the toy RLHF world",
        tables={"DPO policies (held-out pairs)": summary, "Proxy reward models (held-out pairs)": rm_table},
        notes=[
            "Implicit DPO rewards r = beta * log(pi/pi_ref) of DPO policies trained on the toy world's "
            "preference pairs, with the SFT policy as reference."
        ],
    )
    print(f"\nwrote {out} in {time.time() - start:.1f} s")
    return 0


def _gold_accuracy(pairs) -> float:
    import numpy as np

    gc, gr = pairs["gold_chosen"].to_numpy(), pairs["gold_rejected"].to_numpy()
    return float(np.mean(np.where(gc == gr, 0.5, (gc > gr).astype(float))))


def _build_toy(args) -> int:
    import json

    from rmlab.toy.build import BuildConfig, build

    cfg = BuildConfig.quick() if args.quick else BuildConfig()
    cfg.seed = args.seed
    out = Path(args.out)
    print(f"building the {'quick ' if args.quick else ''}toy world into {out} (seed {cfg.seed}) ...")
    manifest = build(out, cfg, progress=not args.quiet)
    metrics = manifest["metrics"]
    print(json.dumps({k: metrics[k] for k in ("gold_accuracy", "proxy_accuracy", "flipped_fraction")}, indent=1))
    print(f"done in {manifest['build_seconds']} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rmlab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="score the toy world's DPO policies and reward models; write an HTML report")
    demo.add_argument("--world", default=None, help="toy world folder (default: the shipped data/toy)")
    demo.add_argument("--pairs", type=int, default=200, help="held-out pairs to score (default 200)")
    demo.add_argument("--out", default="rmlab-demo.html", help="HTML report to write")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(run=_demo)

    build = sub.add_parser("build-toy", help="rebuild the toy world from seeds")
    build.add_argument("--out", default="data/toy", help="output folder (replaced)")
    build.add_argument("--quick", action="store_true", help="the same pipeline at a tiny size, in a minute or two")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--quiet", action="store_true", help="no progress bars")
    build.set_defaults(run=_build_toy)

    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
