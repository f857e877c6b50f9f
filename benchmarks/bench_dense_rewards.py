"""Benchmark: dense reward-model rewards in one pass vs by scoring every prefix (same run).

``rmlab.dense_rewards(method="one_pass")`` applies a causal reward model's score head to every
hidden state in one forward pass; ``method="prefix"`` scores each of the T+1 prefixes of a response
as its own (batched) input, which is what encoders need and what a naive implementation does. Both
run here in one process on the same model and the same synthetic pairs, for several response
lengths T; the script checks that they agree and prints the speed-up beside 0.8*T (the target: a
response of T tokens needs T+1 prefix scores, so the one-pass method should be close to T times
faster when the prompt is not much longer than the response). The one-pass method runs the
prompt of a pair once and continues both responses from its KV cache (``share_prompt=True``, the
default); the "(no share)" columns run each sequence whole.

    python benchmarks/bench_dense_rewards.py                  # toy-size model, T = 16, 32, 64
    python benchmarks/bench_dense_rewards.py --size small --lengths 32,64,128

Timing: one warm-up run per method, then --repeats timed runs; the fastest is used (the median is
printed too). Times are end to end (tokenisation, validation, batching, result frame).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import numpy as np
import torch

import rmlab
from rmlab.toy import tiny_reward_model, tiny_tokenizer

SIZES = {
    "tiny": dict(n_embd=96, n_layer=3, n_head=4),  # the toy world's reward models
    "small": dict(n_embd=384, n_layer=6, n_head=6),  # ~11M parameters besides the embedding
}
WORDS = (
    "the movie was great and acting wonderful film dull slow far too long I loved music story cast what "
    "a boring plot ending made no sense charming funny clever little terrible pacing weak jokes flat script"
).split()


def make_pairs(n: int, prompt_tokens: int, response_tokens: int, tok, seed: int) -> list[dict]:
    """Pairs whose prompt and responses have about the requested number of tokens."""
    rng = random.Random(seed)

    def text(tokens: int) -> str:
        out = ""
        while len(tok(out)["input_ids"]) < tokens:
            out += " " + rng.choice(WORDS)
        return out

    return [
        {"prompt": "Review:" + text(prompt_tokens - 2), "chosen": text(response_tokens - 1), "rejected": text(response_tokens - 1)}
        for _ in range(n)
    ]


def timed(fn, repeats: int) -> tuple[float, float, object]:
    fn()  # warm-up
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times), result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--pairs", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--lengths", default="16,32,64", help="response lengths T in tokens, comma-separated")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tok = tiny_tokenizer(vocab_size=512)
    rm = tiny_reward_model("gpt2", vocab_size=512, seed=0, n_positions=1024, **SIZES[args.size])
    params = sum(p.numel() for p in rm.parameters()) / 1e6
    print(
        f"causal reward model: GPT-2 {args.size} ({params:.1f}M parameters), {args.pairs} pairs, "
        f"prompt ~{args.prompt_tokens} tokens, torch threads {torch.get_num_threads()}, device cpu"
    )
    header = (
        f"{'T':>5} {'one_pass s':>11} {'(no share)':>11} {'prefix s':>10} {'speed-up':>9} {'(no share)':>11} "
        f"{'0.8*T':>7} {'target':>7} {'max |diff|':>11}"
    )
    print(header)
    print("-" * len(header))
    for length in [int(x) for x in args.lengths.split(",")]:
        pairs = make_pairs(args.pairs, args.prompt_tokens, length, tok, seed=length)

        def run(method, share=True):
            return lambda: rmlab.dense_rewards(
                rm, pairs, tokenizer=tok, method=method, share_prompt=share, progress=False
            )

        one_best, one_median, one = timed(run("one_pass"), args.repeats)
        whole_best, whole_median, whole = timed(run("one_pass", share=False), args.repeats)
        pre_best, pre_median, pre = timed(run("prefix"), max(1, args.repeats - 1))
        diff = max(
            float(np.abs(f["prefix_score"].to_numpy() - pre["prefix_score"].to_numpy()).max()) for f in (one, whole)
        )
        t_mean = float(one.groupby(["pair", "side"], observed=True).size().mean())
        speedup = pre_best / one_best
        print(
            f"{t_mean:5.1f} {one_best:11.3f} {whole_best:11.3f} {pre_best:10.3f} {speedup:8.1f}x "
            f"{pre_best / whole_best:10.1f}x {0.8 * t_mean:7.1f} "
            f"{'met' if speedup >= 0.8 * t_mean else 'MISSED':>7} {diff:11.2e}"
            f"   (medians {one_median:.3f} / {whole_median:.3f} / {pre_median:.3f} s)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
