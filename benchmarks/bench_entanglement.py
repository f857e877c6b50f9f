"""Benchmark: per-pair gradient entanglement with rmlab vs a naive loop of autograd.grad calls.

Every method computes, for each preference pair, ``|g_w|^2``, ``|g_l|^2`` and ``<g_w, g_l>``, where
``g`` is the gradient of a response's summed log-prob with respect to all the policy's parameters
(Yuan et al. 2024, "Gradient Entanglement"). They run in one process, on the same model object and
the same synthetic pairs; the script checks that they agree and prints time, pairs/s, the ratio to
the naive loop and the peak memory of each call.

    python benchmarks/bench_entanglement.py                        # toy-world size GPT-2 (0.4M)
    python benchmarks/bench_entanglement.py --size small --pairs 16  # GPT-2, 6 x 384 (~11M)
    python benchmarks/bench_entanglement.py --size tiny,small --threads 2

Methods:
  rmlab   gradient_entanglement(policy, pairs, tokenizer=tok, progress=False): per-example
          gradients by torch.func (vmap over the pairs of a length-bucketed batch), end to end
          (tokenisation, validation, the frame).
  loop    the same call with method="loop": one forward + backward pass per response through the
          engine's fused selective log-softmax (rmlab's fallback for models vmap cannot run).
  naive   per response: model(input_ids).logits, full log_softmax, gather, sum over response tokens,
          torch.autograd.grad with respect to every parameter, flatten; then the three dot products.
          Token ids are prepared once before timing (so tokenisation is not in its time).

Timing: one warm-up call per method, then --repeats timed calls; the fastest is reported (the
median too). Peak memory: on CUDA, torch.cuda.max_memory_allocated() during a call minus what was
allocated before it; on CPU, one more call in a fresh process (multiprocessing "spawn") that builds
the same model and pairs: its peak resident set (VmHWM, reset through /proc/self/clear_refs after
setup) minus its resident set before the call.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import random
import statistics
import time

import numpy as np
import torch

from rmlab.diagnostics.entanglement import gradient_entanglement
from rmlab.engine.pairs import prepare_pair_inputs
from rmlab.toy import tiny_causal_lm, tiny_tokenizer

SIZES = {
    "tiny": dict(n_embd=96, n_layer=3, n_head=4, vocab_size=512),  # the toy world's policies (0.4M)
    "small": dict(n_embd=384, n_layer=6, n_head=6, vocab_size=512),  # ~11M parameters
}
WORDS = (
    "the movie was great and acting wonderful film dull slow far too long I loved music story cast what "
    "a boring plot ending made no sense charming funny clever little terrible pacing weak jokes flat script"
).split()


def make_pairs(n: int, prompt_words: int, response_words: int, seed: int) -> list[dict]:
    """Synthetic pairs; lengths vary uniformly in [0.5, 1.5] x the given means."""
    rng = random.Random(seed)

    def text(mean: int) -> str:
        return " " + " ".join(rng.choice(WORDS) for _ in range(max(1, round(mean * rng.uniform(0.5, 1.5)))))

    return [{"prompt": "Review:" + text(prompt_words), "chosen": text(response_words), "rejected": text(response_words)}
            for _ in range(n)]


def naive(policy, encoded) -> np.ndarray:
    params = list(policy.parameters())  # tied tensors appear once
    rows = []
    for pair in encoded:
        grads = []
        for seq in (pair.chosen, pair.rejected):
            ids = torch.tensor([seq.ids], device=next(policy.parameters()).device)
            logits = policy(input_ids=ids).logits[0].float()
            logp = torch.log_softmax(logits[:-1], dim=-1).gather(1, ids[0, 1:, None])[:, 0]
            g = torch.autograd.grad(logp[seq.start - 1 :].sum(), params)
            grads.append(torch.cat([x.reshape(-1) for x in g]).double())
        gw, gl = grads
        rows.append([float(gw @ gw), float(gl @ gl), float(gw @ gl)])
    return np.array(rows)


def _kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _setup(size: str, n_pairs: int, prompt_words: int, response_words: int, device: torch.device):
    tok = tiny_tokenizer()
    policy = tiny_causal_lm("gpt2", seed=1, **SIZES[size]).to(device)
    pairs = make_pairs(n_pairs, prompt_words, response_words, seed=0)
    encoded = prepare_pair_inputs(policy, None, pairs, tokenizer=tok, device=device).encoded
    methods = {
        "rmlab": lambda: gradient_entanglement(policy, pairs, tokenizer=tok, device=device, progress=False),
        "loop": lambda: gradient_entanglement(policy, pairs, tokenizer=tok, device=device, method="loop", progress=False),
        "naive": lambda: naive(policy, encoded),
    }
    return policy, pairs, encoded, methods


def _child_peak(queue, setup_args, method: str, threads: int) -> None:
    torch.set_num_threads(threads)
    methods = _setup(*setup_args)[3]
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        queue.put(float("nan"))
        return
    before = _kib("VmRSS")
    methods[method]()
    queue.put((_kib("VmHWM") - before) / 1024)


def peak_mib(setup_args, method: str, fn, device: torch.device) -> float:
    """Peak memory of one call above what was in use before it (MiB); NaN where it cannot be read.

    On CUDA, from torch's allocator statistics in this process. On CPU, in a fresh process (spawn)
    that builds the same model and pairs, so that memory this process already holds does not hide
    the call's peak.
    """
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_peak, args=(queue, setup_args, method, torch.get_num_threads()))
    child.start()
    try:
        return queue.get(timeout=1800)
    finally:
        child.join()


def timed(fn, repeats: int, device: torch.device) -> tuple[float, float, object]:
    fn()  # warm-up
    times, result = [], None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times), result


def run(size: str, args, device: torch.device) -> None:
    setup_args = (size, args.pairs, args.prompt_words, args.response_words, device)
    policy, pairs, encoded, methods = _setup(*setup_args)
    tokens = sum(len(s.ids) for p in encoded for s in (p.chosen, p.rejected))
    n_params = sum(p.numel() for p in policy.parameters())
    print(
        f"\nmodel: GPT-2 {size} ({n_params / 1e6:.2f}M parameters), {args.pairs} pairs, "
        f"{tokens / (2 * args.pairs):.1f} tokens per sequence, device {device}, torch threads "
        f"{torch.get_num_threads()}, torch {torch.__version__}"
    )
    results, stats = {}, {}
    for name in [m for m in args.methods.split(",") if m]:
        best, median, out = timed(methods[name], args.repeats, device)
        mem = peak_mib(setup_args, name, methods[name], device) if args.memory else float("nan")
        results[name] = (best, median, mem)
        if isinstance(out, np.ndarray):
            stats[name] = out
        else:
            stats[name] = out[["grad_sq_chosen", "grad_sq_rejected", "grad_inner"]].to_numpy()
            print(f"  {name}: per-example gradients by {out.attrs['method']}")
    base = results.get("naive", (None,))[0]
    print(f"{'method':<8} {'best s':>9} {'median s':>9} {'pairs/s':>9} {'vs naive':>9} {'peak MiB':>9}")
    for name, (best, median, mem) in results.items():
        ratio = f"{base / best:.2f}x" if base else "-"
        print(f"{name:<8} {best:>9.3f} {median:>9.3f} {args.pairs / best:>9.1f} {ratio:>9} {mem:>9.1f}")
    if "naive" in stats:
        ref = stats["naive"]
        scale = np.sqrt(ref[:, [0]] * ref[:, [1]])
        for name, values in stats.items():
            if name != "naive":
                err = float(np.max(np.abs(values - ref) / scale))
                print(f"agreement {name} vs naive: max |diff| / (|g_w| |g_l|) = {err:.1e}")
                assert err < 1e-4, f"{name} disagrees with the naive loop ({err:.2e})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="tiny", help=f"one or more of {sorted(SIZES)}, comma-separated")
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--prompt-words", type=int, default=12)
    parser.add_argument("--response-words", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--methods", default="rmlab,loop,naive")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory runs")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    for size in args.size.split(","):
        if size not in SIZES:
            parser.error(f"--size {size!r}: choose from {sorted(SIZES)}")
        run(size, args, device)


if __name__ == "__main__":
    main()
