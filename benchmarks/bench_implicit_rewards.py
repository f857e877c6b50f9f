"""Benchmark: per-pair DPO log-probs with rmlab vs a naive loop vs TRL's DPOTrainer.evaluate().

All three compute, for every preference pair, the summed log-prob of the chosen and the rejected
response under a policy and a reference model. They run in one process, on the same model objects
and the same synthetic pairs; the script prints throughput, peak memory, and checks that the three
agree.

    python benchmarks/bench_implicit_rewards.py --size tiny
    python benchmarks/bench_implicit_rewards.py --size gpt2-small --pairs 32
    python benchmarks/bench_implicit_rewards.py --size 1b --device cuda --methods rmlab,trl

Methods:
  rmlab  rmlab.implicit_rewards(policy, reference, pairs, tokenizer=tok, progress=False), timed end to
         end (tokenisation, validation, both models, the result frame).
  naive  one sequence at a time: tokenise, model(input_ids).logits, full log_softmax, gather, sum over
         response tokens; policy and reference (tokenisation included in the time).
  trl    trl.DPOTrainer(...).evaluate() with ref_model given; only evaluate() is timed. The dataset
         is tokenised when the trainer is built; that time is reported separately, not included.

Timing: --warmup runs, then --repeats timed runs per method; throughput comes from the fastest timed
run (the median is printed too). Each run also records the CPU time other processes used meanwhile
("other load", in cores, from /proc/stat): on a shared machine a run with other load well above 0 is
slowed by contention, and the table says so.

Peak memory: on CUDA, torch.cuda.max_memory_allocated() during one call minus what was allocated
before it (models included in "before"). On CPU, each method runs once more in a fresh process
(multiprocessing "spawn") that rebuilds the same models from the same seeds; the kernel's peak-RSS
counter (VmHWM) is reset after setup and read after the call, so the number is the peak resident
memory of that call above the process's resident memory after setup (models, data, trainer).
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing as mp
import os
import random
import re
import statistics
import sys
import tempfile
import time
import warnings

import numpy as np
import torch

SIZES = ("tiny", "gpt2-small", "1b")
METHODS = ("rmlab", "naive", "trl")
H100_BF16_DENSE_TFLOPS = 989.0

# ---------------------------------------------------------------------------------------------
# models and data
# ---------------------------------------------------------------------------------------------
_WORDS = (
    "the movie was great and acting wonderful film dull slow far too long I loved music story cast "
    "what a boring plot ending made no sense charming funny clever little terrible pacing weak jokes "
    "flat script short review book good it this that but with very really quite scenes director "
    "score camera actors dialogue moments is had felt end first half second best worst"
).split()
_PROMPTS = (
    "Write a short review of the movie.",
    "Describe the film in one sentence.",
    "Write a review of the book.",
    "What did you think of the story and the cast?",
)


def _sentence(rng: random.Random, n_words: int) -> str:
    words = [rng.choice(_WORDS) for _ in range(max(1, n_words))]
    out, since = [], 0
    for w in words:
        since += 1
        if since > rng.randint(6, 14):  # a sentence break now and then
            out[-1] += rng.choice((".", ",", ";", "!"))
            since = 0
        out.append(w)
    text = " ".join(out)
    return text[0].upper() + text[1:] + "."


def make_pairs(n: int, prompt_words: int, response_words: int, seed: int) -> list[dict]:
    """Synthetic review-style preference pairs with varied lengths (uniform in [0.5, 1.5] x mean)."""
    rng = random.Random(seed)
    vary = lambda mean: max(1, round(mean * rng.uniform(0.5, 1.5)))  # noqa: E731
    pairs = []
    for _ in range(n):
        prompt = rng.choice(_PROMPTS) + " Context: " + _sentence(rng, vary(prompt_words)) + "\nReview:"
        pairs.append(
            {
                "prompt": prompt,
                "chosen": " " + _sentence(rng, vary(response_words)),
                "rejected": " " + _sentence(rng, vary(response_words)),
            }
        )
    return pairs


def build_models(size: str, device: torch.device, dtype: torch.dtype):
    """(policy, reference, tokenizer): same architecture, different seeds, identical on every call."""
    from rmlab.toy import tiny_causal_lm, tiny_tokenizer

    tok = tiny_tokenizer()
    if size == "tiny":
        cfg = dict(arch="gpt2")  # tiny_causal_lm's default GPT-2: 2 layers, d=32, vocab 384
    elif size == "gpt2-small":
        # GPT2Config() defaults: 12 layers, d=768, 12 heads, 1024 positions, vocab 50257 (124M params).
        # The tiny tokenizer's ids (< 384) are valid ids of this vocabulary.
        cfg = dict(arch="gpt2", vocab_size=50257, n_embd=768, n_layer=12, n_head=12, n_positions=1024)
    elif size == "1b":
        # Llama-3.2-1B shapes: 16 layers, d=2048, MLP 8192, 32 heads / 8 KV heads, vocab 128256, tied
        # embeddings (~1.24B params).
        cfg = dict(
            arch="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
            num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
            max_position_embeddings=4096, tie_word_embeddings=True,
        )
    else:
        raise ValueError(size)
    models = []
    for seed in (1, 0):  # policy, reference
        model = tiny_causal_lm(**cfg, seed=seed)
        models.append(model.to(device=device, dtype=dtype).eval())
    return models[0], models[1], tok


def resolve(device_arg: str, dtype_arg: str) -> tuple[torch.device, torch.dtype]:
    if device_arg == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(device_arg)
    if dtype_arg == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            dtype = torch.bfloat16
        else:
            dtype = torch.float32
    else:
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype_arg]
    return device, dtype


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------
# the three methods
# ---------------------------------------------------------------------------------------------
def run_rmlab(policy, reference, pairs, tok, dtype):
    import rmlab

    return rmlab.implicit_rewards(policy, reference, pairs, tokenizer=tok, dtype=dtype, progress=False)


def _common_prefix(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def run_naive(policy, reference, pairs, tok):
    """One sequence at a time, full logits and log_softmax. Returns an (n, 4) float64 array:
    logps_chosen, logps_rejected, ref_logps_chosen, ref_logps_rejected."""
    device = next(policy.parameters()).device
    eos = tok.eos_token
    out = np.zeros((len(pairs), 4))
    with torch.no_grad():
        for i, pair in enumerate(pairs):
            prompt_ids = tok(pair["prompt"])["input_ids"]
            seqs = [
                tok(pair["prompt"] + pair[side] + ("" if pair[side].endswith(eos) else eos))["input_ids"]
                for side in ("chosen", "rejected")
            ]
            start = max(1, min(_common_prefix(prompt_ids, s) for s in seqs))
            for m, model in enumerate((policy, reference)):
                for s, seq in enumerate(seqs):
                    ids = torch.tensor([seq], device=device)
                    logits = model(input_ids=ids).logits[0].float()
                    logp = torch.log_softmax(logits[:-1], dim=-1)
                    picked = logp.gather(1, ids[0, 1:, None]).squeeze(1)
                    out[i, 2 * m + s] = picked[start - 1 :].sum().item()
    return out


def build_trl(policy, reference, pairs, tok, batch_size: int, device: torch.device, dtype, workdir: str):
    """A DPOTrainer over the pairs (eval set = all pairs), with the dataset tokenised."""
    import datasets
    from datasets import Dataset
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import DPOConfig, DPOTrainer

    datasets.disable_progress_bars()
    ds = Dataset.from_list(pairs)
    args = DPOConfig(
        output_dir=workdir,
        report_to="none",
        use_cpu=device.type == "cpu",
        per_device_eval_batch_size=batch_size,
        per_device_train_batch_size=batch_size,
        max_length=None,  # no truncation, as rmlab and the naive loop
        beta=0.1,
        bf16=False,  # the models are already in the benchmark dtype; no autocast on top
        fp16=False,
        disable_tqdm=True,
        dataloader_num_workers=0,
        save_strategy="no",
        logging_strategy="no",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = DPOTrainer(
            model=policy,
            ref_model=reference,
            args=args,
            train_dataset=ds.select([0]),  # required by the constructor; never trained on
            eval_dataset=ds,
            processing_class=tok,
        )
    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)
    return trainer


def run_trl(trainer):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return trainer.evaluate()


# ---------------------------------------------------------------------------------------------
# memory in a fresh process (CPU)
# ---------------------------------------------------------------------------------------------
def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        return int(re.search(rf"{field}:\s+(\d+)", handle.read()).group(1))


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _memory_child(conf: dict, queue) -> None:
    try:
        torch.set_num_threads(conf["threads"])
        warnings.simplefilter("ignore")
        device, dtype = resolve(conf["device"], conf["dtype"])
        policy, reference, tok = build_models(conf["size"], device, dtype)
        pairs = make_pairs(conf["pairs"], conf["prompt_words"], conf["response_words"], conf["seed"])
        with tempfile.TemporaryDirectory() as workdir:
            trainer = None
            if conf["method"] == "trl":
                trainer = build_trl(policy, reference, pairs, tok, conf["trl_batch_size"], device, dtype, workdir)
            gc.collect()
            base = _rss_kib("VmRSS")
            if not _reset_peak_rss():
                queue.put({"error": "cannot reset the peak RSS counter (/proc/self/clear_refs)"})
                return
            if conf["method"] == "rmlab":
                run_rmlab(policy, reference, pairs, tok, dtype)
            elif conf["method"] == "naive":
                run_naive(policy, reference, pairs, tok)
            else:
                run_trl(trainer)
            peak = _rss_kib("VmHWM")
        queue.put({"base_mib": base / 1024, "peak_mib": peak / 1024, "extra_mib": (peak - base) / 1024})
    except Exception as err:  # reported in the table, not fatal
        queue.put({"error": f"{type(err).__name__}: {err}"})


def cpu_peak_memory(conf: dict) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_memory_child, args=(conf, queue))
    proc.start()
    try:
        result = queue.get(timeout=conf.get("timeout", 3600))
    except Exception as err:
        result = {"error": f"no result from the memory subprocess ({type(err).__name__})"}
    proc.join()
    return result


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------
def _busy_cpu_seconds() -> float | None:
    """CPU seconds all processes of the machine spent busy so far (from /proc/stat), or None."""
    try:
        with open("/proc/stat") as handle:
            fields = [int(v) for v in handle.readline().split()[1:]]
    except OSError:
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def timed(fn, device, warmup: int, repeats: int, cuda_memory: bool):
    """Run fn warmup + repeats times.

    Returns (wall times of the timed runs, other load of each run, last result, peak MiB or None).
    "Other load" is the CPU time other processes used during the run, in cores (busy CPU seconds
    of the machine minus this process's, over the wall time): a contended run reads well above 0.
    """
    result = None
    for _ in range(warmup):
        result = fn()
    times, others, peak = [], [], None
    for r in range(repeats):
        gc.collect()
        if cuda_memory and r == 0:
            torch.cuda.empty_cache()
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        sync(device)
        busy0, cpu0, t0 = _busy_cpu_seconds(), time.process_time(), time.perf_counter()
        result = fn()
        sync(device)
        wall = time.perf_counter() - t0
        busy1, cpu1 = _busy_cpu_seconds(), time.process_time()
        times.append(wall)
        others.append(max(0.0, (busy1 - busy0) - (cpu1 - cpu0)) / wall if busy0 is not None else float("nan"))
        if cuda_memory and r == 0:
            peak = (torch.cuda.max_memory_allocated(device) - before) / 2**20
    return times, others, result, peak


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=SIZES, default="tiny")
    p.add_argument("--pairs", type=int, default=32)
    p.add_argument("--prompt-words", type=int, default=8, help="mean words of the prompt's context")
    p.add_argument("--response-words", type=int, default=17, help="mean words per response")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic pairs")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="model dtype (auto: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--methods", default="rmlab,naive,trl", help="comma-separated subset of rmlab,naive,trl")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per method (>= 2)")
    p.add_argument("--trl-batch-size", type=int, default=8, help="per_device_eval_batch_size of TRL")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_TFLOPS,
                   help="accelerator peak for MFU (default: H100 SXM bf16 dense, 989 TFLOP/s)")
    p.add_argument("--force", action="store_true", help="allow --size 1b on a CPU")
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in args.methods if m not in METHODS]
    if bad or not args.methods:
        p.error(f"--methods: unknown {bad}; choose from {METHODS}")
    if args.repeats < 1 or args.warmup < 0 or args.pairs < 1:
        p.error("--repeats >= 1, --warmup >= 0 and --pairs >= 1 are required")
    return args


def _runs(times, others) -> str:
    return ", ".join(f"{t:.3f}s (other load {o:.2f} cores)" for t, o in zip(times, others))


def fmt_ratio(a, b) -> str:
    return f"{a / b:.2f}x" if a and b else "n/a"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = resolve(args.device, args.dtype)
    if args.size == "1b" and device.type != "cuda" and not args.force:
        print("--size 1b is meant for a GPU (pass --force to run it on a CPU anyway).", file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore", category=FutureWarning)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import rmlab
    from rmlab.io.pairs import load_pairs
    from rmlab.io.tokenize import encode_pairs

    t0 = time.perf_counter()
    policy, reference, tok = build_models(args.size, device, dtype)
    build_s = time.perf_counter() - t0
    pairs = make_pairs(args.pairs, args.prompt_words, args.response_words, args.seed)
    encoded = encode_pairs(load_pairs(pairs), tok)
    seq_lens = [len(s.ids) for e in encoded for s in (e.chosen, e.rejected)]
    resp_lens = [s.n_response for e in encoded for s in (e.chosen, e.rejected)]
    total_tokens = sum(seq_lens)
    n_params = sum(p.numel() for p in policy.parameters())

    print("== rmlab implicit-reward benchmark ==")
    print(f"size={args.size}  model={type(policy).__name__}  params/model={n_params / 1e6:.2f}M  "
          f"vocab={policy.config.vocab_size}  device={device}  dtype={str(dtype).replace('torch.', '')}  "
          f"torch threads={torch.get_num_threads()}  (models built in {build_s:.1f}s)")
    print(f"torch {torch.__version__}, transformers {__import__('transformers').__version__}, "
          f"trl {__import__('trl').__version__}, rmlab {rmlab.__version__}")
    print(f"data: {args.pairs} pairs (seed {args.seed}); tokens per sequence (prompt+response+EOS): "
          f"mean {statistics.mean(seq_lens):.1f}, min {min(seq_lens)}, max {max(seq_lens)}; response tokens "
          f"mean {statistics.mean(resp_lens):.1f}; total tokens (chosen+rejected) = {total_tokens}")
    print(f"timing: {args.warmup} warm-up + {args.repeats} timed runs per method; throughput from the "
          f"BEST (fastest) timed run, median shown too (other processes on a shared machine only ever "
          f"slow a run down)")
    print()

    results: dict[str, dict] = {}
    outputs: dict[str, object] = {}
    cuda_mem = device.type == "cuda"

    if "rmlab" in args.methods:
        times, others, frame, peak = timed(lambda: run_rmlab(policy, reference, pairs, tok, dtype), device,
                                   args.warmup, args.repeats, cuda_mem)
        results["rmlab"] = dict(times=times, other_load=others, cuda_peak=peak)
        outputs["rmlab"] = frame
        print(f"rmlab done: {_runs(times, others)}", flush=True)
    if "naive" in args.methods:
        times, others, arr, peak = timed(lambda: run_naive(policy, reference, pairs, tok), device,
                                 args.warmup, args.repeats, cuda_mem)
        results["naive"] = dict(times=times, other_load=others, cuda_peak=peak)
        outputs["naive"] = arr
        print(f"naive done: {_runs(times, others)}", flush=True)
    trl_setup_s = None
    if "trl" in args.methods:
        with tempfile.TemporaryDirectory() as workdir:
            t0 = time.perf_counter()
            trainer = build_trl(policy, reference, pairs, tok, args.trl_batch_size, device, dtype, workdir)
            trl_setup_s = time.perf_counter() - t0
            times, others, metrics, peak = timed(lambda: run_trl(trainer), device, args.warmup, args.repeats, cuda_mem)
            del trainer
        results["trl"] = dict(times=times, other_load=others, cuda_peak=peak)
        outputs["trl"] = metrics
        print(f"trl done: {_runs(times, others)}  (DPOTrainer construction incl. "
              f"dataset tokenisation: {trl_setup_s:.2f}s, not included)", flush=True)

    # peak memory
    if not args.no_memory:
        for method in results:
            if cuda_mem:
                results[method]["mem"] = {"extra_mib": results[method]["cuda_peak"]}
            else:
                print(f"memory: running {method} once in a fresh process...", flush=True)
                conf = dict(
                    method=method, size=args.size, device=str(device), dtype=args.dtype, pairs=args.pairs,
                    prompt_words=args.prompt_words, response_words=args.response_words, seed=args.seed,
                    trl_batch_size=args.trl_batch_size, threads=torch.get_num_threads(),
                )
                results[method]["mem"] = cpu_peak_memory(conf)

    # table
    print()
    peak_note = (
        "peak MiB = torch.cuda.max_memory_allocated during one timed call minus memory allocated before it "
        "(weights excluded)"
        if cuda_mem
        else "peak MiB = peak RSS of one call in a fresh process, above that process's RSS after setup "
        "(weights, data and, for trl, the built trainer excluded); base = RSS after setup"
    )
    header = f"{'method':<7} {'best s':>8} {'median s':>9} {'pairs/s':>9} {'tokens/s':>10} {'peak MiB':>9} {'base MiB':>9}"
    header += f" {'GFLOP/s':>8}"
    if cuda_mem:
        header += f" {'MFU':>7}"
    print(header)
    print("-" * len(header))
    flops_per_run = 2 * 2 * n_params * total_tokens  # 2 models x (2 x params x tokens) per forward
    for method, res in results.items():
        med, best = statistics.median(res["times"]), min(res["times"])
        res["pairs_s"] = args.pairs / best
        res["tokens_s"] = total_tokens / best
        mem = res.get("mem") or {}
        if "error" in mem:
            peak_s, base_s = "err", "err"
        else:
            peak_s = f"{mem['extra_mib']:.0f}" if mem.get("extra_mib") is not None else "-"
            base_s = f"{mem['base_mib']:.0f}" if mem.get("base_mib") is not None else "-"
        line = (f"{method:<7} {best:>8.3f} {med:>9.3f} {res['pairs_s']:>9.2f} {res['tokens_s']:>10.0f} "
                f"{peak_s:>9} {base_s:>9}")
        gflops = flops_per_run / best / 1e9
        line += f" {gflops:>8.1f}"
        if cuda_mem:
            line += f" {100 * gflops / 1e3 / args.peak_tflops:>6.1f}%"
        print(line)
    print(f"  GFLOP/s by the convention 2 models x 2 x params ({n_params / 1e6:.2f}M) x tokens per run "
          f"(= {flops_per_run / 1e12:.3f} TFLOP), whatever each method really computes")
    print(f"  tokens = all prompt+response tokens of chosen and rejected ({total_tokens} per run); "
          f"each run scores them under both models")
    print(f"  {peak_note}" if not args.no_memory else "  peak memory not measured (--no-memory)")
    for method, res in results.items():
        if "error" in (res.get("mem") or {}):
            print(f"  memory of {method}: {res['mem']['error']}")
    if trl_setup_s is not None:
        print(f"  trl: timed evaluate() only (eval batch {args.trl_batch_size} pairs); building the trainer "
              f"and tokenising the dataset took {trl_setup_s:.2f}s more")
    if "rmlab" in results:
        print("  rmlab: timed end to end (validation + tokenisation + both models + result frame)")
    if "naive" in results:
        print("  naive: timed end to end (tokenisation + 4 unbatched forwards per pair)")
    if cuda_mem:
        print(f"  MFU = GFLOP/s above over a peak of {args.peak_tflops:.0f} TFLOP/s "
              f"({'H100 SXM bf16 dense, an assumption' if args.peak_tflops == H100_BF16_DENSE_TFLOPS else 'given by --peak-tflops'})")
    noisy = [m for m, res in results.items() if len(res["times"]) > 1 and max(res["times"]) > 1.2 * min(res["times"])]
    if noisy:
        print(f"  note: timed runs of {', '.join(noisy)} differ by more than 20% (a noisy machine)")
    for method, res in results.items():
        k = res["times"].index(min(res["times"]))
        if res["other_load"][k] > 0.25:
            print(f"  WARNING: other processes used {res['other_load'][k]:.2f} cores during the best run of "
                  f"{method}; its number is not clean, rerun on a quiet machine or raise --repeats")

    print()
    print("ratios (throughput, from best times):")
    r = {m: res["pairs_s"] for m, res in results.items()}
    if "rmlab" in r and "naive" in r:
        print(f"  rmlab / naive = {fmt_ratio(r['rmlab'], r['naive'])}")
    if "trl" in r and "naive" in r:
        print(f"  trl   / naive = {fmt_ratio(r['trl'], r['naive'])}")
    if "rmlab" in r and "trl" in r:
        print(f"  rmlab / trl   = {fmt_ratio(r['rmlab'], r['trl'])}")

    # agreement
    print()
    print("agreement:")
    frame = outputs.get("rmlab")
    if frame is not None and "naive" in outputs:
        cols = ["logps_chosen", "logps_rejected", "ref_logps_chosen", "ref_logps_rejected"]
        ours = frame[cols].to_numpy(dtype=np.float64)
        naive = outputs["naive"]
        diff = np.abs(ours - naive)
        scale = np.abs(naive).max()
        print(f"  rmlab vs naive, per-pair summed log-probs ({len(cols)} columns x {args.pairs} pairs): "
              f"max abs diff {diff.max():.3e} (max |logp| {scale:.1f}, rel {diff.max() / scale:.1e})")
    if frame is not None and "trl" in outputs:
        metrics = outputs["trl"]
        overall = rmlab.dpo_metrics(frame)
        bs = args.trl_batch_size
        # TRL logs the mean over eval batches of per-batch means (batches of bs pairs, in order);
        # eval_loss is Trainer's mean over pairs. Rebuild both from rmlab's frame.
        batches = [frame.iloc[s : s + bs] for s in range(0, len(frame), bs)]
        per_batch = {
            "rewards/chosen": np.mean([b["reward_chosen"].mean() for b in batches]),
            "rewards/rejected": np.mean([b["reward_rejected"].mean() for b in batches]),
            "rewards/margins": np.mean([b["margin"].mean() for b in batches]),
            "rewards/accuracies": np.mean([b["correct"].astype(float).mean() for b in batches]),
            "logps/chosen": np.mean([b["logps_chosen"].mean() for b in batches]),
            "logps/rejected": np.mean([b["logps_rejected"].mean() for b in batches]),
            "loss": overall["loss"],
        }
        same_batches = len(frame) % bs == 0
        print(f"  rmlab.dpo_metrics vs TRL evaluate() ({len(batches)} eval batches of <= {bs} pairs; "
              + ("equal batches, so TRL's mean of batch means equals the mean over pairs)"
                 if same_batches else "unequal last batch: rmlab values re-averaged per TRL batch)"))
        print(f"    {'metric':<20} {'rmlab':>14} {'trl':>14} {'abs diff':>10}")
        worst = 0.0
        for key, ours_v in per_batch.items():
            theirs = metrics.get(f"eval_{key}")
            if theirs is None:
                print(f"    {key:<20} {ours_v:>14.6f} {'missing':>14}")
                continue
            shown = overall[key] if same_batches else ours_v
            d = abs(shown - theirs)
            worst = max(worst, d) if key != "rewards/accuracies" else worst
            print(f"    {key:<20} {shown:>14.6f} {theirs:>14.6f} {d:>10.2e}")
        print(f"    max abs diff (excluding accuracies): {worst:.3e}")
    if frame is None:
        print("  (rmlab not run: nothing to compare)")

    summary = {m: {k: v for k, v in res.items() if k != "cuda_peak"} for m, res in results.items()}
    print()
    print("json:", json.dumps({"size": args.size, "pairs": args.pairs, "tokens": total_tokens,
                               "device": str(device), "dtype": str(dtype), "results": summary}, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
