"""The ``rmlab`` command line: ``rmlab report`` (the toy world, or your models) and ``rmlab build-toy``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def _report(args) -> int:
    from rmlab.report_page import collect_report, write_report

    start = time.time()
    options = {}
    if args.max_length is not None:
        options["max_length"] = args.max_length
    if args.device is not None:
        options["device"] = args.device
    contents = collect_report(
        args.policy, args.reference, args.data, reward_model=args.reward_model, tokenizer=args.tokenizer,
        beta=args.beta, pairs=args.pairs, world=args.world, progress=not args.quiet, **options,
    )
    print(contents.title)
    for note in contents.notes:
        print(note)
    for name, table in contents.tables.items():
        print(f"\n{name}")
        print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    out = write_report(args.out, contents.figures, title=contents.title, tables=contents.tables, notes=contents.notes)
    print(f"\nwrote {out} ({len(contents.figures)} figures) in {time.time() - start:.1f} s")
    return 0


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

    report = sub.add_parser(
        "report",
        help="write a self-contained HTML report: the toy world with no arguments, or your models on your pairs",
        description="Without --policy/--reference/--reward-model/--data: the embedded toy world (no download). "
        "With them: implicit DPO rewards of the policy against the reference and/or the reward model's "
        "accuracy, calibration and length bias on the pairs (hub names or local paths).",
    )
    report.add_argument("--policy", help="DPO policy: hub name or local path")
    report.add_argument("--reference", help="its reference (usually the SFT model): hub name or local path")
    report.add_argument("--reward-model", dest="reward_model", help="reward model: hub name or local path")
    report.add_argument("--tokenizer", help="tokenizer (default: loaded from the model's path)")
    report.add_argument("--data", help="preference pairs: .jsonl / .json / .parquet / .csv (prompt, chosen, rejected)")
    report.add_argument("--beta", type=float, default=0.1, help="DPO beta (default 0.1)")
    report.add_argument("--pairs", type=int, default=200, help="score the first N pairs (default 200)")
    report.add_argument("--max-length", dest="max_length", type=int, default=None, help="truncate pairs to this many tokens")
    report.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: auto)")
    report.add_argument("--world", default=None, help="toy world folder (default: the shipped data/toy)")
    report.add_argument("--out", default="rmlab-report.html", help="HTML file to write (default rmlab-report.html)")
    report.add_argument("--quiet", action="store_true", help="no progress bars")
    report.set_defaults(run=_report)

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
