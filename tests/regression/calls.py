"""The calls behind the regression frames in ``tests/regression/frames``, defined once.

``build_frames.py`` runs every call and stores its result; ``tests/test_regression_frames.py`` runs the
same calls and compares. Each call takes a :class:`Context` (the toy world and the fixed subset of it)
and returns a DataFrame, a Series, or plain values (numbers, arrays, dicts of them). Results that
several frames share (one ``track_dpo`` run, one reward-model report, ...) are computed once per
context by the functions marked ``@shared``.

Stored forms: a DataFrame as parquet (column labels that are not strings are kept in the manifest);
a Series or plain values as JSON. :func:`compare` decides whether a stored and a new result are the
same: equal columns, dtype kinds and index; numbers within ``TOLERANCE`` (absolute and relative, NaN
equal to NaN), including numbers inside list cells; everything else exactly equal.
"""

from __future__ import annotations

import inspect
import json
import math
import textwrap
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

import rmlab
import rmlab.diagnostics as diagnostics

FRAMES_DIR = Path(__file__).resolve().parent / "frames"
MANIFEST = FRAMES_DIR / "manifest.json"
TOLERANCE = 1e-6

#: The fixed subset of the toy world every call runs on.
N_PAIRS = 16  # held-out pairs (world.heldout.head(N_PAIRS))
N_PROMPTS = 3  # prompts (world.prompts[:N_PROMPTS])
POOL_PROMPTS = 3  # best-of-n pool prompts for the scored ensembles
POOL_PER_PROMPT = 32  # completions of each of those prompts
NS = [1, 2, 4, 8, 16, 32, 64, 128, 256]  # n of the full-pool best-of-n curve


# --------------------------------------------------------------------------------------------------
# the context and the registry
# --------------------------------------------------------------------------------------------------
class Context:
    """The toy world, the subset the calls run on, and the shared results computed so far."""

    def __init__(self, world):
        self.world = world
        self.tok = world.tokenizer
        self.pairs = world.heldout.head(N_PAIRS).reset_index(drop=True)
        self.prompts = list(world.prompts[:N_PROMPTS])
        self._memo: dict[str, object] = {}

    def __getattr__(self, name):  # ctx.<shared name>: the shared result, computed on first use
        if name.startswith("_") or name not in SHARED:
            raise AttributeError(name)
        if name not in self._memo:
            self._memo[name] = SHARED[name](self)
        return self._memo[name]


@dataclass(frozen=True)
class Call:
    name: str
    compute: Callable[[Context], object]
    needs: tuple[str, ...] = ()  # optional packages (the test skips without them)

    @property
    def source(self) -> str:
        return textwrap.dedent(inspect.getsource(self.compute))


SHARED: dict[str, Callable[[Context], object]] = {}
CALLS: dict[str, Call] = {}


def shared(fn):
    SHARED[fn.__name__] = fn
    return fn


def frame(name: str, needs: tuple[str, ...] = ()):
    def register(fn):
        if name in CALLS:
            raise ValueError(f"two calls named {name!r}")
        CALLS[name] = Call(name, fn, tuple(needs))
        return fn

    return register


def shared_sources() -> dict[str, str]:
    return {name: textwrap.dedent(inspect.getsource(fn)) for name, fn in SHARED.items()}


def compute(ctx: Context, name: str):
    return CALLS[name].compute(ctx)


def _chat(pairs: pd.DataFrame) -> list[dict]:
    return [
        {
            "prompt": [{"role": "user", "content": row.prompt}],
            "chosen": [{"role": "assistant", "content": row.chosen.strip()}],
            "rejected": [{"role": "assistant", "content": row.rejected.strip()}],
        }
        for row in pairs.itertuples()
    ]


# --------------------------------------------------------------------------------------------------
# shared results
# --------------------------------------------------------------------------------------------------
@shared
def implicit(ctx):
    w = ctx.world
    return rmlab.implicit_rewards(w.dpo[0.1], w.sft, ctx.pairs, tokenizer=ctx.tok, beta=0.1, progress=False)


@shared
def scores(ctx):
    return rmlab.reward_scores(ctx.world.reward_models[0], ctx.pairs, tokenizer=ctx.tok, progress=False)


@shared
def rm_report(ctx):
    return rmlab.reward_model_report(ctx.scores, implicit=ctx.implicit, bins=5)


@shared
def ranking(ctx):
    w = ctx.world
    return rmlab.ranking_accuracy(w.dpo[0.1], w.sft, ctx.pairs, tokenizer=ctx.tok, beta=0.1, progress=False)


@shared
def entangled(ctx):
    w = ctx.world
    return rmlab.gradient_entanglement(w.dpo[0.1], ctx.pairs, reference=w.sft, tokenizer=ctx.tok, beta=0.1,
                                       params="last:1", lr=1e-3, progress=False)


@shared
def similarity(ctx):
    w = ctx.world
    return rmlab.gradient_similarity(w.dpo[0.1], ctx.pairs.head(6), reference=w.sft, tokenizer=ctx.tok,
                                     beta=0.1, params="last:1", progress=False)


@shared
def tracked(ctx):
    w = ctx.world
    return rmlab.track_dpo(w.sft, w.sft, ctx.pairs.head(4), tokenizer=ctx.tok, steps=2, lr=0.5, beta=0.1,
                           optimizer="sgd", top_k=3, progress=False)


@shared
def samples(ctx):
    return rmlab.sample(ctx.world.sft, ctx.prompts, n=2, max_new_tokens=12, tokenizer=ctx.tok, seed=0,
                        cache_dir=False, progress=False)


@shared
def policy_samples(ctx):
    return rmlab.sample(ctx.world.dpo[0.1], ctx.prompts, n=4, max_new_tokens=12, tokenizer=ctx.tok, seed=1,
                        cache_dir=False, progress=False)


@shared
def ref_logprobs(ctx):
    return rmlab.completion_logprobs(ctx.world.sft, ctx.policy_samples, tokenizer=ctx.tok, progress=False)


@shared
def checkpoints(ctx):
    w = ctx.world
    chosen = {0.1: {step: w.checkpoints[0.1][step] for step in (50, 250)}}
    return rmlab.checkpoint_curve(chosen, w.sft, ctx.prompts[:2], proxy=w.reward_models[0], gold=w.gold,
                                  n_samples=2, max_new_tokens=8, tokenizer=ctx.tok, return_samples=True,
                                  progress=False)


@shared
def pool(ctx):
    return pd.read_parquet(ctx.world.root / "bon_pool.parquet")


@shared
def bon_curve(ctx):
    return rmlab.best_of_n(ctx.pool, proxy="proxy", gold="gold", n_values=NS, values=["words"], progress=False)


@shared
def bon_fit(ctx):
    return rmlab.fit_overoptimization(ctx.bon_curve, form="bon", bootstrap=20)


@shared
def bon_fit_rl(ctx):
    return rmlab.fit_overoptimization(ctx.bon_curve, form="rl", bootstrap=20)


@shared
def pool_part(ctx):
    """A few prompts of the shipped pool, scored by each proxy reward model."""
    pool = ctx.pool
    part = pool[pool.prompt.isin(pool.prompt.unique()[:POOL_PROMPTS])]
    part = part.groupby("prompt", sort=False).head(POOL_PER_PROMPT).reset_index(drop=True)
    for k, rm in enumerate(ctx.world.reward_models):
        part[f"rm{k}"] = rmlab.reward_scores(rm, part[["prompt", "completion"]], tokenizer=ctx.tok,
                                             progress=False)["score"].to_numpy()
    return part


@shared
def ensembles(ctx):
    members = ["rm0", "rm1", "rm2"]
    return {"mean": rmlab.ensemble(members, "mean"), "worst": rmlab.ensemble(members, "worst"),
            "uwo": rmlab.ensemble(members, "uwo", lam=0.5)}


# --------------------------------------------------------------------------------------------------
# pairs and implicit rewards
# --------------------------------------------------------------------------------------------------
@frame("load_pairs")
def _(ctx):
    return rmlab.load_pairs(ctx.pairs)


@frame("load_pairs_chat")
def _(ctx):
    return rmlab.load_pairs(_chat(ctx.pairs.head(4)))


@frame("load_pairs_dataset", needs=("datasets",))
def _(ctx):
    import datasets

    return rmlab.load_pairs(datasets.Dataset.from_pandas(ctx.pairs.head(4)[["prompt", "chosen", "rejected"]]))


@frame("implicit_rewards")
def _(ctx):
    return ctx.implicit


@frame("implicit_rewards_by_beta")
def _(ctx):
    w = ctx.world
    return pd.concat([
        rmlab.implicit_rewards(w.dpo[beta], w.sft, ctx.pairs, tokenizer=ctx.tok, beta=beta, progress=False)
        .assign(beta=beta)
        for beta in sorted(w.dpo)
    ], ignore_index=True)


@frame("implicit_rewards_length_normalize")
def _(ctx):
    w = ctx.world
    return rmlab.implicit_rewards(w.dpo[0.1], w.sft, ctx.pairs, tokenizer=ctx.tok, beta=0.1,
                                  length_normalize=True, progress=False)


@frame("implicit_rewards_reference_free")
def _(ctx):
    w = ctx.world
    return rmlab.implicit_rewards(w.dpo[0.1], None, ctx.pairs, tokenizer=ctx.tok, beta=2.0,
                                  reference_free=True, length_normalize=True, progress=False)


@frame("implicit_rewards_keep_start")
def _(ctx):
    w = ctx.world
    return rmlab.implicit_rewards(w.dpo[0.1], w.sft, ctx.pairs, tokenizer=ctx.tok, beta=0.1, max_length=24,
                                  truncation_mode="keep_start", progress=False)


@frame("implicit_rewards_keep_end")
def _(ctx):
    w = ctx.world
    return rmlab.implicit_rewards(w.dpo[0.1], w.sft, ctx.pairs, tokenizer=ctx.tok, beta=0.1, max_length=24,
                                  truncation_mode="keep_end", progress=False)


@frame("implicit_rewards_chat")
def _(ctx):
    w = ctx.world
    return rmlab.implicit_rewards(w.dpo[0.1], w.sft, _chat(ctx.pairs.head(6)), tokenizer=ctx.tok, beta=0.1,
                                  progress=False)


@frame("dpo_metrics")
def _(ctx):
    return rmlab.dpo_metrics(ctx.implicit)


@frame("token_rewards")
def _(ctx):
    w = ctx.world
    return rmlab.token_rewards(w.dpo[0.1], w.sft, ctx.pairs.head(4), tokenizer=ctx.tok, beta=0.1, progress=False)


@frame("step_rewards")
def _(ctx):
    w = ctx.world
    return rmlab.step_rewards(w.dpo[0.1], w.sft, ctx.pairs.head(4), tokenizer=ctx.tok, beta=0.1, delimiter=",",
                              progress=False)


@frame("ranking_accuracy")
def _(ctx):
    return ctx.ranking


@frame("ranking_summary")
def _(ctx):
    return rmlab.ranking_summary(ctx.ranking)


# --------------------------------------------------------------------------------------------------
# reward models
# --------------------------------------------------------------------------------------------------
@frame("reward_scores")
def _(ctx):
    return ctx.scores


@frame("reward_scores_completions")
def _(ctx):
    rows = pd.DataFrame({"prompt": ctx.pairs.prompt.head(6), "completion": ctx.pairs.chosen.head(6)})
    return rmlab.reward_scores(ctx.world.reward_models[1], rows, tokenizer=ctx.tok, progress=False)


@frame("reward_scores_texts")
def _(ctx):
    texts = [p + c for p, c in zip(ctx.pairs.prompt.head(4), ctx.pairs.rejected.head(4))]
    return rmlab.reward_scores(ctx.world.reward_models[2], texts, tokenizer=ctx.tok, progress=False)


@frame("reward_model_report_summary")
def _(ctx):
    return ctx.rm_report.summary


@frame("reward_model_report_calibration")
def _(ctx):
    return ctx.rm_report.calibration


@frame("reward_model_report_length_bias")
def _(ctx):
    return ctx.rm_report.length_bias


@frame("reward_model_report_agreement")
def _(ctx):
    return ctx.rm_report.agreement


@frame("dense_rewards_one_pass")
def _(ctx):
    return rmlab.dense_rewards(ctx.world.reward_models[0], ctx.pairs.head(4), method="one_pass",
                               tokenizer=ctx.tok, progress=False)


@frame("dense_rewards_one_pass_unshared")
def _(ctx):
    return rmlab.dense_rewards(ctx.world.reward_models[0], ctx.pairs.head(4), method="one_pass",
                               share_prompt=False, tokenizer=ctx.tok, progress=False)


@frame("dense_rewards_prefix")
def _(ctx):
    return rmlab.dense_rewards(ctx.world.reward_models[0], ctx.pairs.head(4), method="prefix",
                               tokenizer=ctx.tok, progress=False)


@frame("attribute_reward_integrated_gradients", needs=("captum",))
def _(ctx):
    return rmlab.attribute_reward(ctx.world.reward_models[0], ctx.pairs.head(2), tokenizer=ctx.tok,
                                  target="margin", method="integrated_gradients", n_steps=8, progress=False)


@frame("attribute_reward_feature_ablation", needs=("captum",))
def _(ctx):
    return rmlab.attribute_reward(ctx.world.reward_models[0], ctx.pairs.head(2), tokenizer=ctx.tok,
                                  target="score", method="feature_ablation", progress=False)


@frame("attribute_reward_shapley", needs=("captum",))
def _(ctx):
    return rmlab.attribute_reward(ctx.world.reward_models[0], ctx.pairs.head(1), tokenizer=ctx.tok,
                                  target="score", method="shapley", n_samples=2, seed=0, progress=False)


@frame("attribute_reward_dpo", needs=("captum",))
def _(ctx):
    w = ctx.world
    return rmlab.attribute_reward(w.dpo[0.1], ctx.pairs.head(2), reference=w.sft, tokenizer=ctx.tok, beta=0.1,
                                  target="margin", n_steps=8, progress=False)


@frame("preference_strength")
def _(ctx):
    return rmlab.preference_strength(ctx.world.reward_models, ctx.pairs, tokenizer=ctx.tok, progress=False)


# --------------------------------------------------------------------------------------------------
# gradients and likelihood displacement
# --------------------------------------------------------------------------------------------------
@frame("gradient_entanglement")
def _(ctx):
    return ctx.entangled


@frame("gradient_entanglement_no_reference")
def _(ctx):
    return rmlab.gradient_entanglement(ctx.world.dpo[0.1], ctx.pairs, tokenizer=ctx.tok, params="last:1",
                                       lr=1e-3, progress=False)


@frame("gradient_entanglement_realised")
def _(ctx):
    w = ctx.world
    return rmlab.gradient_entanglement(w.dpo[0.1], ctx.pairs.head(2), reference=w.sft, tokenizer=ctx.tok,
                                       beta=0.1, params="last:1", lr=1e-4, realised=True, progress=False)


@frame("gradient_entanglement_projected")
def _(ctx):
    w = ctx.world
    return rmlab.gradient_entanglement(w.dpo[0.1], ctx.pairs.head(4), reference=w.sft, tokenizer=ctx.tok,
                                       beta=0.1, params="last:1", projection_dim=64, seed=0, lr=1e-3,
                                       progress=False)


@frame("predict_entanglement")
def _(ctx):
    return diagnostics.predict_entanglement(ctx.entangled, beta=0.5, lr=1e-2)


@frame("gradient_similarity")
def _(ctx):
    return ctx.similarity


@frame("similarity_matrix")
def _(ctx):
    return diagnostics.similarity_matrix(ctx.similarity)


@frame("token_entanglement")
def _(ctx):
    return rmlab.token_entanglement(ctx.world.dpo[0.1], ctx.pairs.head(2), tokenizer=ctx.tok, params="last:1",
                                    progress=False)


@frame("ches")
def _(ctx):
    return rmlab.ches(ctx.world.sft, ctx.pairs, tokenizer=ctx.tok, progress=False)


@frame("ches_from_sums")
def _(ctx):
    ches, ln_ches = diagnostics.ches_from_sums(np.array([[1.0, -2.0], [0.5, 0.5]]),
                                               np.array([[0.5, 1.0], [-1.0, 2.0]]), [3, 2], [4, 1])
    return {"ches": ches, "ln_ches": ln_ches}


@frame("track_dpo_trajectories")
def _(ctx):
    return ctx.tracked.trajectories


@frame("track_dpo_mass")
def _(ctx):
    return ctx.tracked.mass


@frame("track_dpo_summary")
def _(ctx):
    return ctx.tracked.summary


@frame("track_dpo_pairs")
def _(ctx):
    return ctx.tracked.pairs


@frame("track_dpo_adam_batches")
def _(ctx):
    w = ctx.world
    run = rmlab.track_dpo(w.dpo[0.1], w.sft, ctx.pairs.head(4), tokenizer=ctx.tok, steps=2, lr=1e-3, beta=0.1,
                          optimizer="adam", batch_size=2, seed=3, max_grad_norm=1.0, progress=False)
    return run.trajectories


@frame("diagnostics_callback", needs=("trl", "datasets"))
def _(ctx):
    import copy
    import tempfile

    import datasets
    import transformers
    import trl

    from rmlab.integrations import DiagnosticsCallback

    w = ctx.world
    # copies: the trainer changes the model it trains and may wrap the reference
    policy, reference = copy.deepcopy(w.sft), copy.deepcopy(w.sft)
    train = datasets.Dataset.from_pandas(ctx.pairs.tail(8)[["prompt", "chosen", "rejected"]], preserve_index=False)
    with tempfile.TemporaryDirectory(prefix="rmlab-regression-") as out:
        args = trl.DPOConfig(
            output_dir=out, report_to="none", use_cpu=True, bf16=False, beta=0.1, per_device_train_batch_size=4,
            max_steps=2, logging_steps=1, learning_rate=1e-3, save_strategy="no", seed=0, disable_tqdm=True,
            dataset_num_proc=None,
        )
        trainer = trl.DPOTrainer(model=policy, ref_model=reference, args=args, processing_class=ctx.tok,
                                 train_dataset=train)
        trainer.remove_callback(transformers.PrinterCallback)  # no logs on stdout
        callback = DiagnosticsCallback(ctx.pairs.head(3), every=1).attach(trainer)
        trainer.train()
        return callback.frame


# --------------------------------------------------------------------------------------------------
# sampling, KL and overoptimization
# --------------------------------------------------------------------------------------------------
@frame("sample")
def _(ctx):
    return ctx.samples


@frame("sample_top_p")
def _(ctx):
    return rmlab.sample(ctx.world.sft, ctx.prompts[:2], n=2, max_new_tokens=12, temperature=0.7, top_p=0.9,
                        tokenizer=ctx.tok, seed=5, cache_dir=False, progress=False)


@frame("sample_chat")
def _(ctx):
    prompts = [[{"role": "user", "content": p}] for p in ctx.prompts[:2]]
    return rmlab.sample(ctx.world.sft, prompts, n=2, max_new_tokens=8, tokenizer=ctx.tok, seed=0,
                        cache_dir=False, progress=False)


@frame("completion_logprobs")
def _(ctx):
    return ctx.ref_logprobs


@frame("kl_estimate")
def _(ctx):
    s = ctx.policy_samples
    return rmlab.kl_estimate(s["logp"], ctx.ref_logprobs, groups=s["prompt_index"])


@frame("checkpoint_curve")
def _(ctx):
    return ctx.checkpoints[0]


@frame("checkpoint_curve_samples")
def _(ctx):
    return ctx.checkpoints[1]


@frame("curve_from_samples")
def _(ctx):
    return rmlab.curve_from_samples(ctx.checkpoints[1], proxy=ctx.world.reward_models[1], gold="n_tokens",
                                    tokenizer=ctx.tok, progress=False)


@frame("best_of_n_pool")
def _(ctx):
    return ctx.bon_curve


@frame("best_of_n_samples")
def _(ctx):
    w = ctx.world
    return rmlab.best_of_n(ctx.policy_samples, proxy=w.reward_models[0], gold=w.gold, n_values=[1, 2, 4],
                           tokenizer=ctx.tok, progress=False)


@frame("best_of_n_ensembles")
def _(ctx):
    return rmlab.best_of_n(ctx.pool_part, proxy={"proxy 0": "rm0", **ctx.ensembles}, gold="gold",
                           n_values=[1, 2, 4, 8, 16, 32], progress=False)


@frame("best_of_n_ensemble_models")
def _(ctx):
    w = ctx.world
    part = ctx.pool_part.groupby("prompt", sort=False).head(8).reset_index(drop=True)
    return rmlab.best_of_n(part, proxy=rmlab.ensemble(w.reward_models, "uwo", lam=0.5), gold=w.gold,
                           n_values=[1, 2, 4, 8], tokenizer=ctx.tok, progress=False)


@frame("ensemble_combine")
def _(ctx):
    matrix = ctx.pool_part[["rm0", "rm1", "rm2"]].to_numpy()
    return pd.DataFrame({name: ens.combine(matrix) for name, ens in ctx.ensembles.items()})


@frame("best_of_n_weights")
def _(ctx):
    return {str(n): diagnostics.best_of_n_weights(16, n) for n in (1, 3, 16)}


@frame("best_of_n_expectation")
def _(ctx):
    part = ctx.pool_part
    return {str(n): diagnostics.best_of_n_expectation(part["rm0"].to_numpy(), part["gold"].to_numpy(), n)
            for n in (1, 4, 32)}


@frame("fit_overoptimization_table")
def _(ctx):
    return ctx.bon_fit.to_frame()


@frame("fit_overoptimization_params")
def _(ctx):
    return _fit_params(ctx.bon_fit)


@frame("fit_overoptimization_curve")
def _(ctx):
    kl = np.linspace(0.0, 4.0, 9)
    lower, upper = ctx.bon_fit.band(kl)
    return pd.DataFrame({"kl": kl, "predict": ctx.bon_fit.predict(kl), "lower": lower, "upper": upper})


@frame("fit_overoptimization_points")
def _(ctx):
    return ctx.bon_fit.points


@frame("fit_overoptimization_rl_params")
def _(ctx):
    return _fit_params(ctx.bon_fit_rl)


def _fit_params(fit) -> dict:
    names = ["form", "alpha", "beta", "alpha_ci", "beta_ci", "peak_kl", "peak_kl_ci", "peak_gold", "peak_gold_ci",
             "r2", "offset", "relative", "x", "y", "n_points", "level", "bootstrap", "name", "notes",
             "resampled", "prompts", "boot_alpha", "boot_beta", "boot_offset"]
    return {name: getattr(fit, name) for name in names}


# --------------------------------------------------------------------------------------------------
# storing and comparing
# --------------------------------------------------------------------------------------------------
def kind_of(result) -> str:
    if isinstance(result, pd.DataFrame):
        return "frame"
    if isinstance(result, pd.Series):
        return "series"
    return "value"


def file_name(name: str, kind: str) -> str:
    return f"{name}.parquet" if kind == "frame" else f"{name}.json"


def plain(value):
    """JSON-ready python values: numpy arrays to (nested) lists, numpy scalars to python ones."""
    if isinstance(value, pd.Series | pd.Index):
        value = value.to_numpy()
    if isinstance(value, np.ndarray):
        return [plain(v) for v in value.tolist()] if value.dtype == object else value.tolist()
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if value is pd.NA or value is pd.NaT:
        return None
    return value


def write(result, path: Path) -> dict:
    """Store ``result`` at ``path``; returns what the manifest needs to read it back."""
    entry: dict = {"kind": kind_of(result), "file": path.name}
    if isinstance(result, pd.DataFrame):
        out = result.copy()
        out.attrs = {}
        labels = list(out.columns)
        if not all(isinstance(c, str) for c in labels):
            entry["columns"] = plain(labels)
            out.columns = [str(c) for c in labels]
        entry["rows"] = len(out)
        out.to_parquet(path)
    elif isinstance(result, pd.Series):
        payload = {"name": plain(result.name), "dtype": str(result.dtype), "index": plain(result.index),
                   "index_dtype": str(result.index.dtype), "values": plain(result.to_numpy())}
        path.write_text(json.dumps(payload, indent=1) + "\n")
    else:
        path.write_text(json.dumps({"value": plain(result)}, indent=1) + "\n")
    return entry


def read(entry: dict, folder: Path = FRAMES_DIR):
    path = folder / entry["file"]
    if entry["kind"] == "frame":
        out = pd.read_parquet(path)
        if "columns" in entry:
            out.columns = entry["columns"]
        return out
    payload = json.loads(path.read_text())
    if entry["kind"] == "series":
        return payload
    return payload["value"]


def _kind(dtype) -> str:
    return "category" if isinstance(dtype, pd.CategoricalDtype) else dtype.kind


def _is_na(v) -> bool:
    try:
        return v is None or v is pd.NA or v is pd.NaT or (isinstance(v, float | np.floating) and math.isnan(v))
    except TypeError:
        return False


def _close(a, b) -> bool:
    return bool(np.isclose(a, b, rtol=TOLERANCE, atol=TOLERANCE, equal_nan=True))


def difference(a, b, path: tuple = ()):
    """Where two plain values first differ (the keys and positions leading there, ``()`` for the
    values themselves), or None when they agree: numbers within TOLERANCE (NaN == NaN), sequences and
    dicts elementwise, anything else exactly."""
    a, b = plain(a), plain(b)
    if _is_na(a) or _is_na(b):
        return None if _is_na(a) and _is_na(b) else path
    if isinstance(a, bool) or isinstance(b, bool):
        return None if isinstance(a, bool) and isinstance(b, bool) and a == b else path
    if isinstance(a, int | float) and isinstance(b, int | float):
        return None if _close(float(a), float(b)) else path
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        if list(a) != list(b):
            return path
        return next((d for k in a if (d := difference(a[k], b[k], path + (k,))) is not None), None)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        if len(a) != len(b):
            return path
        return next((d for i, (x, y) in enumerate(zip(a, b)) if (d := difference(x, y, path + (i,))) is not None),
                    None)
    return None if type(a) is type(b) and a == b else path


def same_value(a, b) -> bool:
    return difference(a, b) is None


def _show(v, limit: int = 120) -> str:
    text = repr(plain(v))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _compare_columns(name: str, column, stored: pd.Series, fresh: pd.Series) -> list[str]:
    where = f"frame {name!r}, column {column!r}"
    if _kind(stored.dtype) != _kind(fresh.dtype):
        return [f"{where}: dtype {fresh.dtype} now, {stored.dtype} stored"]
    a, b = stored.to_numpy(), fresh.to_numpy()
    if _kind(stored.dtype) in ("f", "i", "u"):
        a, b = a.astype(np.float64), b.astype(np.float64)
        bad = ~np.isclose(a, b, rtol=TOLERANCE, atol=TOLERANCE, equal_nan=True)
    else:
        bad = np.array([not same_value(x, y) for x, y in zip(a, b)], dtype=bool)
    if not bad.any():
        return []
    i = int(np.flatnonzero(bad)[0])
    beyond = f" beyond {TOLERANCE:g}" if _kind(stored.dtype) in ("f", "i", "u") else ""
    return [f"{where}: {int(bad.sum())} of {len(bad)} values differ{beyond} (first at row "
            f"{stored.index[i]!r}: stored {_show(a[i])}, now {_show(b[i])})"]


def compare(name: str, entry: dict, stored, fresh) -> list[str]:
    """What differs between a stored result and a freshly computed one (empty when they agree)."""
    kind = kind_of(fresh)
    if kind != entry["kind"]:
        return [f"frame {name!r}: the call returns a {kind} now, a {entry['kind']} was stored"]
    if kind == "value":
        where = difference(stored, fresh)
        if where is None:
            return []
        a, b = plain(stored), plain(fresh)
        for key in where:
            a, b = a[key], b[key]
        at = ", value " + "".join(f"[{k!r}]" for k in where) if where else ""
        return [f"frame {name!r}{at} differs (numbers: beyond {TOLERANCE:g}): stored {_show(a)}, now {_show(b)}"]
    if kind == "series":
        problems = []
        if stored["name"] != plain(fresh.name):
            problems.append(f"frame {name!r}: series name {fresh.name!r} now, {stored['name']!r} stored")
        if stored["index"] != plain(fresh.index):
            problems.append(f"frame {name!r}: index {_show(fresh.index)} now, {_show(stored['index'])} stored")
            return problems
        kind = "category" if stored["dtype"] == "category" else pd.api.types.pandas_dtype(stored["dtype"]).kind
        if kind != _kind(fresh.dtype):
            problems.append(f"frame {name!r}: dtype {fresh.dtype} now, {stored['dtype']} stored")
        for label, a, b in zip(stored["index"], stored["values"], plain(fresh.to_numpy())):
            if not same_value(a, b):
                problems.append(f"frame {name!r}, entry {label!r}: stored {_show(a)}, now {_show(b)}")
        return problems
    problems = []
    if list(stored.columns) != list(fresh.columns):
        lost = [c for c in stored.columns if c not in fresh.columns]
        new = [c for c in fresh.columns if c not in stored.columns]
        return [f"frame {name!r}: columns differ (missing now: {lost}; new: {new}; order stored: "
                f"{list(stored.columns)})"]
    if len(stored) != len(fresh):
        return [f"frame {name!r}: {len(fresh)} rows now, {len(stored)} stored"]
    if not stored.index.equals(fresh.index) or list(stored.index.names) != list(fresh.index.names):
        return [f"frame {name!r}: index differs: stored {_show(stored.index)}, now {_show(fresh.index)}"]
    if _kind(stored.index.dtype) != _kind(fresh.index.dtype):
        problems.append(f"frame {name!r}: index dtype {fresh.index.dtype} now, {stored.index.dtype} stored")
    for position, column in enumerate(stored.columns):
        problems += _compare_columns(name, column, stored.iloc[:, position], fresh.iloc[:, position])
    return problems


def load_manifest() -> dict:
    return json.loads(MANIFEST.read_text())
