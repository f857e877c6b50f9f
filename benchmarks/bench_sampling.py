"""Batched sampling (``rmlab.sample``) against the naive loop of one ``model.generate`` per sample.

Same process, same model, same prompts, ``n`` and ``max_new_tokens``:

- naive: for every prompt and every sample, ``model.generate(prompt, do_sample=True,
  num_return_sequences=1)`` (what a first implementation does);
- HF per prompt: one ``model.generate`` per prompt with ``num_return_sequences=n``;
- rmlab: ``rmlab.sample`` (all prompts and samples batched), with and without the ``logp`` column
  (one extra batched forward pass).

Prints wall time, samples/s, generated tokens/s and the speed-up over the naive loop.

    python benchmarks/bench_sampling.py                      # the toy world's SFT policy (0.4M)
    python benchmarks/bench_sampling.py --size small         # GPT-2 6 x 384 (11M), random weights
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import rmlab.toy
from rmlab.engine.sampling import sample  # exported as rmlab.sample


def naive(model, tok, prompts, n, max_new_tokens, seed):
    tokens = 0
    for i, prompt in enumerate(prompts):
        ids = torch.tensor([tok(prompt)["input_ids"]])
        for k in range(n):
            torch.manual_seed(seed * 1_000_003 + i * n + k)
            with torch.inference_mode():
                out = model.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0, top_p=1.0,
                    temperature=1.0, max_new_tokens=max_new_tokens, num_return_sequences=1,
                    pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                )
            row = out[0, ids.shape[1]:].tolist()
            tokens += row.index(tok.eos_token_id) + 1 if tok.eos_token_id in row else len(row)
    return len(prompts) * n, tokens


def per_prompt(model, tok, prompts, n, max_new_tokens, seed):
    tokens = 0
    for i, prompt in enumerate(prompts):
        ids = torch.tensor([tok(prompt)["input_ids"]])
        torch.manual_seed(seed * 1_000_003 + i)
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0, top_p=1.0,
                temperature=1.0, max_new_tokens=max_new_tokens, num_return_sequences=n,
                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
            )
        for row in out[:, ids.shape[1]:].tolist():
            tokens += row.index(tok.eos_token_id) + 1 if tok.eos_token_id in row else len(row)
    return len(prompts) * n, tokens


def batched(model, tok, prompts, n, max_new_tokens, seed, logprobs=True):
    frame = sample(model, prompts, n=n, max_new_tokens=max_new_tokens, tokenizer=tok, seed=seed,
                   logprobs=logprobs, progress=False)
    return len(frame), int(frame["n_tokens"].sum())


def timed(fn, repeats):
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="tiny", help="comma-separated: tiny (toy SFT policy), small (GPT-2 6x384)")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of the batched methods (best kept)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    world = rmlab.toy.load()
    tok = world.tokenizer
    prompts = world.prompts[: args.prompts]
    print(f"{args.prompts} prompts x {args.n} samples, max_new_tokens={args.max_new_tokens}, "
          f"{args.threads} torch threads, torch {torch.__version__}")
    for size in args.size.split(","):
        if size == "tiny":
            model = world.sft
        elif size == "small":
            torch.manual_seed(0)
            model = GPT2LMHeadModel(GPT2Config(
                vocab_size=len(tok), n_embd=384, n_layer=6, n_head=6, n_positions=128,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
            )).eval()
        else:
            raise SystemExit(f"unknown size {size!r}")
        params = sum(p.numel() for p in model.parameters()) / 1e6
        # warm-up (first-call checks, allocator)
        batched(model, tok, prompts[:2], 2, 4, 0)
        naive(model, tok, prompts[:1], 1, 4, 0)
        rows = []
        for name, fn, repeats in [
            ("naive loop (generate per sample)", lambda: naive(model, tok, prompts, args.n, args.max_new_tokens, 0), 1),
            ("HF generate per prompt (num_return_sequences=n)",
             lambda: per_prompt(model, tok, prompts, args.n, args.max_new_tokens, 0), 1),
            ("rmlab.sample", lambda: batched(model, tok, prompts, args.n, args.max_new_tokens, 0), args.repeats),
            ("rmlab.sample, logprobs=False",
             lambda: batched(model, tok, prompts, args.n, args.max_new_tokens, 0, logprobs=False), args.repeats),
        ]:
            seconds, (samples, tokens) = timed(fn, repeats)
            rows.append((name, seconds, samples, tokens))
        base = rows[0][1]
        print(f"\n{size}: GPT-2 {params:.2f}M parameters")
        print(f"{'method':<50} {'s':>8} {'samples/s':>10} {'tokens/s':>10} {'vs naive':>9}")
        for name, seconds, samples, tokens in rows:
            print(f"{name:<50} {seconds:8.2f} {samples / seconds:10.1f} {tokens / seconds:10.0f} {base / seconds:8.1f}x")


if __name__ == "__main__":
    main()
