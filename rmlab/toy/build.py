"""Build the toy RLHF world from seeds: ``rmlab build-toy`` (about 10 minutes on 2 CPU cores).

Steps, each seeded:

1. a byte-level BPE tokenizer trained on the review language (with a chat template);
2. an SFT policy (tiny GPT-2) trained on grammar reviews;
3. preference pairs: two responses sampled from the SFT policy per prompt, kept only when both are
   short (at most ``short_words`` words, as if labellers only saw short answers), labelled by the
   gold reward with Bradley-Terry noise: the first is preferred with probability
   ``sigmoid((gold_a - gold_b) / bt_temperature)``;
4. proxy reward models (GPT-2 sequence classifiers initialised from the SFT backbone), one per seed,
   each on its own random subset of the training pairs;
5. DPO policies from the SFT policy at several betas, saving checkpoints along training;
6. quality metrics: proxy and gold accuracy on held-out pairs, DPO implicit-reward accuracy,
   likelihood displacement, and a best-of-n curve against the first proxy, all in
   ``manifest.json``.

Models are saved as standard Hugging Face folders (safetensors, fp16), loadable with
``from_pretrained`` like hub models.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm
from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel, PreTrainedTokenizerFast

from rmlab.diagnostics.overoptimization import best_of_n, best_of_n_expectation
from rmlab.engine.logprobs import Scored
from rmlab.io.pairs import load_pairs
from rmlab.io.tokenize import encode_pairs
from rmlab.engine.reward_model import score_sequences
from rmlab.toy import language
from rmlab.toy.tiny import tiny_tokenizer
from rmlab.toy.train import train_dpo, train_lm, train_reward_model


@dataclass
class BuildConfig:
    """Every knob of the world, with the shipped values as defaults."""

    seed: int = 0
    vocab_size: int = 512
    n_embd: int = 96
    n_layer: int = 3
    n_head: int = 4
    n_positions: int = 128
    sft_corpus: int = 40000
    sft_steps: int = 1200
    sft_batch: int = 32
    sft_lr: float = 3e-3
    samples_per_prompt: int = 200
    max_new_tokens: int = 64
    short_words: int = 18
    train_pairs: int = 2400
    heldout_pairs: int = 600
    bt_temperature: float = 1.0
    reward_models: int = 3
    rm_subset: float = 0.8
    rm_epochs: float = 1.5
    rm_lr: float = 1e-3
    dpo_betas: tuple[float, ...] = (0.05, 0.1, 0.5)
    dpo_steps: int = 250
    dpo_batch: int = 16
    dpo_lr: float = 5e-4
    dpo_checkpoint_every: int = 50
    bon_prompts: int = 96
    bon_pool: int = 512
    bon_ns: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)
    threads: int = 1  # measured: tiny matrices train ~2x faster on one thread than on two
    extra: dict = field(default_factory=dict)

    @classmethod
    def quick(cls) -> "BuildConfig":
        """The same pipeline at toy-of-toy size: a couple of minutes at most, for CI."""
        return cls(
            n_embd=32, n_layer=1, n_head=2, sft_corpus=2000, sft_steps=40,
            samples_per_prompt=4, short_words=1000, train_pairs=120, heldout_pairs=40, reward_models=3, rm_epochs=1.0,
            dpo_steps=10, dpo_batch=8, dpo_checkpoint_every=2, bon_prompts=4, bon_pool=16,
            bon_ns=(1, 2, 4, 8, 16),
        )


def _save(model, path: Path) -> None:
    """Save a model as fp16 safetensors (half the room; loaded back as fp32 on CPU)."""
    copy.deepcopy(model).half().save_pretrained(path, safe_serialization=True)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def generate(
    model, tokenizer, prompts: list[str], *, n: int, max_new_tokens: int, seed: int, batch: int = 512,
    progress: bool = True,
) -> pd.DataFrame:
    """Sample ``n`` completions per prompt (temperature 1, the full distribution).

    Prompts of equal token length share a ``generate`` call, so no padding is ever needed; each
    call is seeded from ``seed`` and its index, so the result is reproducible. This is the sampler
    the shipped world was built with, kept so that ``rmlab build-toy`` reproduces ``data/toy``
    exactly; analyses sample with :func:`rmlab.sample`, which draws a different random stream.
    """
    encoded = {p: tokenizer(p)["input_ids"] for p in prompts}
    by_length: dict[int, list[str]] = {}
    for p in prompts:
        by_length.setdefault(len(encoded[p]), []).append(p)
    rows = []
    bar = tqdm(total=len(prompts) * n, desc="sampling", disable=not progress, leave=False)
    call = 0
    for length in sorted(by_length):
        items = [p for p in by_length[length] for _ in range(n)]
        for start in range(0, len(items), batch):
            chunk = items[start : start + batch]
            ids = torch.tensor([encoded[p] for p in chunk])
            torch.manual_seed(seed * 100003 + call)
            call += 1
            with torch.inference_mode():
                out = model.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0,
                    top_p=1.0, temperature=1.0, max_new_tokens=max_new_tokens,
                    pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                )
            for prompt, row in zip(chunk, out[:, length:].tolist()):
                if tokenizer.eos_token_id in row:
                    row = row[: row.index(tokenizer.eos_token_id)]
                rows.append({"prompt": prompt, "completion": tokenizer.decode(row, skip_special_tokens=True)})
            bar.update(len(chunk))
    bar.close()
    order = {p: i for i, p in enumerate(prompts)}
    frame = pd.DataFrame(rows)
    return frame.sort_values("prompt", key=lambda c: c.map(order), kind="stable").reset_index(drop=True)


def _label_pairs(samples: pd.DataFrame, cfg: BuildConfig, rng: np.random.Generator) -> pd.DataFrame:
    """Pair short responses to the same prompt and label them by gold with Bradley-Terry noise."""
    samples = samples.assign(words=[language.word_count(c) for c in samples["completion"]])
    short = samples[(samples["words"] <= cfg.short_words) & (samples["words"] > 0)]
    rows = []
    for prompt, group in short.groupby("prompt", sort=True):
        texts = group["completion"].tolist()
        order = rng.permutation(len(texts))
        for a, b in zip(order[0::2], order[1::2]):
            if texts[a] == texts[b]:
                continue
            rows.append((prompt, texts[a], texts[b]))
    order = rng.permutation(len(rows))
    need = cfg.train_pairs + cfg.heldout_pairs
    if len(rows) < need:
        raise RuntimeError(f"only {len(rows)} distinct short pairs were sampled; raise samples_per_prompt")
    rows = [rows[i] for i in order[:need]]
    a_text = [r[1] for r in rows]
    b_text = [r[2] for r in rows]
    ga, gb = language.gold_reward(a_text), language.gold_reward(b_text)
    p_a = 1.0 / (1.0 + np.exp(-(ga - gb) / cfg.bt_temperature))
    a_wins = rng.random(len(rows)) < p_a
    chosen = np.where(a_wins, a_text, b_text)
    rejected = np.where(a_wins, b_text, a_text)
    g_c, g_r = np.where(a_wins, ga, gb), np.where(a_wins, gb, ga)
    return pd.DataFrame(
        {
            "prompt": [r[0] for r in rows],
            "chosen": chosen,
            "rejected": rejected,
            "split": ["train"] * cfg.train_pairs + ["heldout"] * cfg.heldout_pairs,
            "gold_chosen": g_c,
            "gold_rejected": g_r,
            "true_prob": np.where(a_wins, p_a, 1 - p_a),
            "flipped": g_c < g_r,
        }
    )


def _rm_scores(model, tokenizer, prompts, completions) -> np.ndarray:
    """Proxy scores of prompt+completion+EOS, tokenised as the reward models were trained."""
    eos = tokenizer.eos_token
    ids = tokenizer([p + c + eos for p, c in zip(prompts, completions)])["input_ids"]
    return score_sequences(model, ids, pad_id=tokenizer.pad_token_id, progress=False)


#: The unbiased best-of-n estimator (Gao et al. 2022, appendix), kept under its old name here.
bon_expectation = best_of_n_expectation


def build(out: str | Path, cfg: BuildConfig | None = None, *, progress: bool = True) -> dict:
    """Build the whole world into ``out`` (replacing it) and return its manifest."""
    cfg = cfg or BuildConfig()
    out = Path(out)
    tmp = out.with_name(out.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.set_num_threads(cfg.threads)
    t0 = time.time()
    timings: dict[str, float] = {}
    rng = np.random.default_rng(cfg.seed)
    steps = tqdm(total=6, desc="build-toy", disable=not progress)

    def stage(name):
        timings[name] = round(time.time() - t0 - sum(timings.values()), 1)
        steps.update(1)

    # 1. language and tokenizer
    sft_rows = language.corpus(cfg.sft_corpus, seed=cfg.seed)
    texts = [p + r for p, r in sft_rows]
    tok: PreTrainedTokenizerFast = tiny_tokenizer(vocab_size=cfg.vocab_size, corpus=texts[:5000])
    tok.save_pretrained(tmp / "tokenizer")
    pad, eos = tok.pad_token_id, tok.eos_token
    stage("tokenizer")

    # 2. SFT policy
    config = GPT2Config(
        vocab_size=len(tok), n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head,
        n_positions=cfg.n_positions, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=pad,
    )
    torch.manual_seed(cfg.seed)
    sft = GPT2LMHeadModel(config)
    prompt_lens = [len(x) for x in tok([p for p, _ in sft_rows])["input_ids"]]
    full = tok([p + r + eos for p, r in sft_rows])["input_ids"]
    seqs = [Scored(ids, max(n, 1)) for ids, n in zip(full, prompt_lens) if len(ids) <= cfg.n_positions]
    sft_losses = train_lm(
        sft, seqs, steps=cfg.sft_steps, batch_size=cfg.sft_batch, lr=cfg.sft_lr, pad_id=pad,
        seed=cfg.seed, progress=progress,
    )
    _save(sft, tmp / "sft")
    tok.save_pretrained(tmp / "sft")
    stage("sft")

    # 3. preference pairs from the SFT policy
    prompts = language.prompts()
    samples = generate(
        sft, tok, prompts, n=cfg.samples_per_prompt, max_new_tokens=cfg.max_new_tokens,
        seed=cfg.seed + 1, progress=progress,
    )
    pairs = _label_pairs(samples, cfg, rng)
    pairs.to_parquet(tmp / "pairs.parquet", index=False)
    stage("pairs")

    # 4. proxy reward models from the SFT backbone
    train = pairs[pairs["split"] == "train"].reset_index(drop=True)
    held = pairs[pairs["split"] == "heldout"].reset_index(drop=True)
    enc_train = encode_pairs(load_pairs(train), tok)
    rm_paths, rm_acc = [], []
    for k in range(cfg.reward_models):
        sub = np.random.default_rng(cfg.seed + 100 + k).permutation(len(train))[: int(cfg.rm_subset * len(train))]
        torch.manual_seed(cfg.seed + 100 + k)
        rm_config = copy.deepcopy(config)
        rm_config.num_labels = 1
        rm = GPT2ForSequenceClassification(rm_config)
        rm.transformer.load_state_dict(sft.transformer.state_dict())
        train_reward_model(
            rm, [enc_train[i].chosen.ids for i in sub], [enc_train[i].rejected.ids for i in sub],
            epochs=cfg.rm_epochs, lr=cfg.rm_lr, pad_id=pad, seed=cfg.seed + 100 + k, progress=progress,
        )
        path = tmp / f"reward_model_{k}"
        _save(rm, path)
        tok.save_pretrained(path)
        rm_paths.append(path)
        sc = _rm_scores(rm, tok, held["prompt"], held["chosen"])
        sr = _rm_scores(rm, tok, held["prompt"], held["rejected"])
        rm_acc.append(float(np.mean(sc > sr)))
        if k == 0:
            proxy0 = rm
    stage("reward_models")

    # 5. DPO policies at several betas, with checkpoints
    checkpoints: dict[str, dict[str, str]] = {}
    for beta in cfg.dpo_betas:
        policy = copy.deepcopy(sft)
        saved: dict[str, str] = {}

        def keep(step, model, beta=beta, saved=saved):
            path = tmp / f"dpo_beta{beta:g}" / f"step_{step}"
            _save(model, path)
            tok.save_pretrained(path)
            saved[str(step)] = str(path.relative_to(tmp))

        train_dpo(
            policy, sft, enc_train, beta=beta, steps=cfg.dpo_steps, batch_size=cfg.dpo_batch,
            lr=cfg.dpo_lr, pad_id=pad, seed=cfg.seed + 200, checkpoint_every=cfg.dpo_checkpoint_every,
            on_checkpoint=keep, progress=progress,
        )
        checkpoints[f"{beta:g}"] = saved
    stage("dpo")

    # 6. the world's quality, measured
    metrics = _measure(tmp, cfg, tok, held, proxy0, rm_acc, checkpoints, progress=progress)
    stage("metrics")
    steps.close()

    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    manifest = {
        "config": {k: v for k, v in asdict(cfg).items() if k != "extra"},
        "parameters": {"policy": sum(p.numel() for p in sft.parameters())},
        "sft_final_loss": float(np.mean(sft_losses[-20:])),
        "checkpoints": checkpoints,
        "reward_models": [str(p.relative_to(tmp)) for p in rm_paths],
        "metrics": metrics,
        "timings_s": timings,
        "build_seconds": round(time.time() - t0, 1),
        "torch": torch.__version__,
        "files": {str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files},
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return manifest


def _measure(root, cfg, tok, held, proxy, rm_acc, checkpoints, *, progress) -> dict:
    """Accuracies, displacement and the best-of-n curve that the README and tests quote."""
    import rmlab
    from rmlab.toy.world import load_lm

    gc, gr = held["gold_chosen"].to_numpy(), held["gold_rejected"].to_numpy()
    gold_acc = float(np.mean(np.where(gc == gr, 0.5, (gc > gr).astype(float))))
    sft = load_lm(root / "sft")
    dpo = {}
    for beta, steps in checkpoints.items():
        per_step = {}
        for step, rel in steps.items():
            frame = rmlab.implicit_rewards(
                load_lm(root / rel), sft, held, tokenizer=tok, beta=float(beta), progress=False
            )
            per_step[step] = {
                "accuracy": float(frame["correct"].mean()),
                "chosen_logp_fell": float((frame["logps_chosen"] < frame["ref_logps_chosen"]).mean()),
                "mean_logps_chosen_change": float((frame["logps_chosen"] - frame["ref_logps_chosen"]).mean()),
            }
        dpo[beta] = per_step
    # best-of-n from the SFT policy against the first proxy
    prompts = language.prompts()[: cfg.bon_prompts]
    pool = generate(sft, tok, prompts, n=cfg.bon_pool, max_new_tokens=cfg.max_new_tokens,
                    seed=cfg.seed + 7, progress=progress)
    pool["proxy"] = _rm_scores(proxy, tok, pool["prompt"], pool["completion"])
    pool["gold"] = language.gold_reward(pool["completion"])
    pool["words"] = [language.word_count(c) for c in pool["completion"]]
    bon = best_of_n(pool, proxy="proxy", gold="gold", n_values=cfg.bon_ns, values=["words"], progress=False)
    curve = [
        {"n": int(r.n), "kl": float(r.kl), "proxy": float(r.proxy), "gold": float(r.gold), "words": float(r.words)}
        for r in bon.itertuples()
    ]
    pool.to_parquet(root / "bon_pool.parquet", index=False)
    return {
        "heldout_pairs": int(len(held)),
        "gold_accuracy": gold_acc,
        "proxy_accuracy": rm_acc,
        "flipped_fraction": float(held["flipped"].mean()),
        "dpo": dpo,
        "best_of_n": curve,
    }
