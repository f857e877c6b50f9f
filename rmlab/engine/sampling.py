"""Sample completions from a policy: batched, reproducible, resumable, with the policy's log-probs.

:func:`sample` draws ``n`` completions per prompt from a causal LM and returns one row per
completion. It is the first step of every policy-side overoptimization analysis: KL from the
initial policy along DPO / RL checkpoints (Gao et al. 2022, "Scaling Laws for Reward Model
Overoptimization"; Rafailov et al. 2024, "Scaling Laws for Reward Model Overoptimization in Direct
Alignment Algorithms") and best-of-n pools.

How it works:

- **Checked first.** Settings, prompts, the room each prompt leaves in the context and the stop
  tokens are checked before any model runs (:mod:`rmlab.engine.sampling_inputs`).
- **Batched across prompts and samples.** Every (prompt, sample) row is one sequence; rows are
  sorted by prompt length (so a batch holds prompts of similar length), left-padded and decoded
  together with a KV cache under a budget of rows (``batch_size``) and padded tokens
  (``batch_tokens``, :mod:`rmlab.engine.sampling_plan`). Rows that finish (EOS) are dropped from
  the cache as the batch goes on. The forward runner the options name (:mod:`rmlab.engine.runner`)
  decodes every batch and scores its log-probs.
- **Reproducible, batch-size invariant randomness.** The random number that picks token ``t`` of
  sample ``k`` of prompt ``i`` is a counter-based hash of ``(seed, i, k, t)``: the token is drawn
  by inverse-CDF sampling from the (temperature / top-p) distribution with that number
  (:mod:`rmlab.engine.decoding`). So a row's randomness does not depend on which other rows share
  its batch, how many samples are drawn (sample ``k`` of ``n=4`` is sample ``k`` of ``n=8``), or
  where a run resumed. Results are therefore identical across ``batch_size`` / ``batch_tokens`` up
  to floating-point ties: a different batch shape changes logits by ~1e-7, which changes a token
  only when the random number falls within ~1e-7 of a boundary of the cumulative distribution
  (never observed in the tests). For fixed settings on one machine the result is exactly
  reproducible. Two policies given the same seed use the same random numbers (common random
  numbers), so a policy sampled against itself gives identical samples.
- **Log-probs from the engine.** ``logp`` is recomputed after sampling by rmlab's engine
  (:func:`rmlab.engine.completions.engine_logprobs`, one batched pass), so it is exactly the number
  :func:`rmlab.implicit_rewards` / :func:`rmlab.token_rewards` compute for the same token ids.
  Before sampling, :func:`rmlab.engine.decoding.decoding_mode` checks once per model that decoding
  left-padded prompts past the model's attention windows follows its own forward (models such as
  Mamba, whose mask is not a padding mask, decode prompts of one length together instead; models
  with no KV cache get a :class:`ModelError`), and the sampler's step-by-step log-probs are
  compared with the engine's on the first batch (a warning if they disagree).
- **Resumable.** With ``cache_dir`` each finished batch is written as a parquet file keyed by a
  fingerprint (:mod:`rmlab.cache`) of the model weights, the tokenizer, the prompts' token ids and
  the settings; calling again with the same arguments skips what is done. Without ``cache_dir``
  an interrupt (``KeyboardInterrupt``) re-raises as :class:`SamplingInterrupted` carrying the
  finished rows.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from rmlab.cache import ChunkCache, compute_dtype, resolve_cache_dir, sequences_digest, tokenizer_digest, weights_digest
from rmlab.engine.completions import completion_logprobs, engine_logprobs, summed
from rmlab.engine.decoding import check_sampler, decode_batch, decoding_mode, row_keys, row_uniforms  # decode_batch: importable from here too
from rmlab.engine.precision import autocast, autocast_dtype
from rmlab.engine.runner import runner_for
from rmlab.engine.sampling_inputs import (
    BACKENDS,
    check_prompt_context,
    check_prompts,
    check_settings,
    encode_prompts,
    stop_token_ids,
)
from rmlab.engine.sampling_plan import default_batch, sampling_plan  # default_batch: importable from here too
from rmlab.engine.vllm_backend import vllm_available, vllm_batch, vllm_engine
from rmlab.errors import ArgumentError
from rmlab.io.models import check_vocab_covers, load_causal_lm, load_tokenizer, model_device, padding_id
from rmlab.options import CACHING, LOADING, RUNNING, Options, with_options

#: Columns of the frame :func:`sample` returns, in order.
SAMPLE_COLUMNS = ("prompt_index", "prompt", "sample", "completion", "tokens", "n_tokens", "finished", "logp")

#: Bump when a change to the sampler changes what a seed produces, or what its cache key holds
#: (either invalidates caches). 2: the key is built from :mod:`rmlab.cache`'s digests.
SAMPLER_VERSION = 2

class SamplingInterrupted(KeyboardInterrupt):
    """Sampling was interrupted; ``partial`` holds every completion finished before the interrupt.

    A subclass of ``KeyboardInterrupt``, so it stops a script or a notebook cell like one. In a
    notebook the finished rows stay reachable after the traceback as ``sys.last_value.partial``;
    in code, ``except rmlab.SamplingInterrupted as err: frame = err.partial``. The samples are
    those of :func:`sample` (Gao et al. 2022's per-prompt pools), in its columns.
    """

    def __init__(self, message: str, partial: pd.DataFrame | None = None):
        super().__init__(message)
        self.partial = partial if partial is not None else pd.DataFrame(columns=list(SAMPLE_COLUMNS))


def _frame(prompt_index, samples, completions, tokens, finished, logp) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "prompt_index": np.asarray(prompt_index, dtype=np.int64),
            "sample": np.asarray(samples, dtype=np.int64),
            "completion": list(completions),
            "tokens": list(tokens),
            "n_tokens": np.array([len(t) for t in tokens], dtype=np.int64),
            "finished": np.asarray(finished, dtype=bool),
            "logp": np.asarray(logp, dtype=np.float64),
        }
    )


def _assemble(chunks: list[pd.DataFrame], prompts: list, n: int, fmt: str, settings: dict) -> pd.DataFrame:
    frame = pd.concat(chunks, ignore_index=True) if chunks else _frame([], [], [], [], [], [])
    frame = frame[frame["sample"] < n].sort_values(["prompt_index", "sample"], kind="stable").reset_index(drop=True)
    frame.insert(1, "prompt", [prompts[i] for i in frame["prompt_index"]])
    frame = frame[list(SAMPLE_COLUMNS)]
    frame.attrs.update(kind="samples", format=fmt, **settings)
    return frame


def sample_cache(cache_dir, model, tokenizer, prompt_ids, *, settings: dict, stop_ids, options: Options) -> ChunkCache:
    """The cache entry ``samples-<key>`` of a sampling call in ``cache_dir``.

    The key holds what decides the samples (see :mod:`rmlab.cache`): the policy's weights, the
    tokenizer, the prompts' token ids, the sampling settings and stop ids, the backend, the device
    type, the compute dtype and :data:`SAMPLER_VERSION`; not ``n`` (a larger ``n`` extends an entry,
    as sample ``k`` is the same for every ``n``), nor the batch budgets. The samples are those of
    ancestral sampling (Gao et al. 2022's pools), so the key is all that decides them.
    """
    meta = {
        "kind": "sampled completions",
        "version": SAMPLER_VERSION,
        "backend": settings["backend"],
        "model": weights_digest(model),
        "model_class": type(model).__name__,
        "tokenizer": tokenizer_digest(tokenizer),
        "prompts": sequences_digest(prompt_ids),
        "count": len(prompt_ids),
        **{k: settings[k] for k in ("max_new_tokens", "temperature", "top_p", "seed")},
        "stop_ids": list(stop_ids),
        "device": model_device(model).type,
        "compute_dtype": compute_dtype(model, autocast_dtype(model, options.dtype)),
    }
    return ChunkCache(cache_dir, "samples", meta, overwrite=options.overwrite_cache)


def _cached_rows(cache: ChunkCache, model, prompt_ids, *, n: int, logprobs: bool, pad_id: int, options: Options):
    """The rows already in ``cache`` (None when there are none), with any missing ``logp`` filled."""
    cached = cache.load(unique=["prompt_index", "sample"])
    if cached is None:
        return None
    cached["tokens"] = [list(map(int, t)) for t in cached["tokens"]]
    cached = cached[cached["sample"] < n].reset_index(drop=True)
    if logprobs and cached["logp"].isna().any():
        missing = cached["logp"].isna().to_numpy()
        sub = cached[missing]
        values = engine_logprobs(model, prompt_ids, sub["prompt_index"], sub["tokens"], pad_id=pad_id, options=options)
        cached.loc[missing, "logp"] = summed(values)
    return cached


@with_options("tokenizer", "chat_template_kwargs", *RUNNING, *LOADING, *CACHING)
def sample(
    policy,
    prompts,
    *,
    n: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int | None = None,
    backend: str = "hf",
    logprobs: bool = True,
    eos_token_id: int | Sequence[int] | None = None,
    on_chunk: Callable[[pd.DataFrame], None] | None = None,
    vllm_kwargs: dict | None = None,
    options: Options,
) -> pd.DataFrame:
    """Sample ``n`` completions per prompt from a causal LM, batched across prompts and samples.

    Ancestral sampling from ``pi(y | x)`` (optionally with temperature and nucleus / top-p
    filtering, Holtzman et al. 2020), the samples that estimate ``KL(pi || pi_ref)`` along training
    checkpoints and feed best-of-n pools (Gao et al. 2022, "Scaling Laws for Reward Model
    Overoptimization"). See the module docstring for how batching, seeding and resuming work.

    Args:
        policy: a causal LM (``PreTrainedModel``) or a hub name / local path.
        prompts: a list of strings, or of chat conversations (lists of ``{"role", "content"}``
            messages; the chat template is applied with the generation prompt). A frame with a
            ``prompt`` column works too.
        n: completions per prompt (>= 1).
        max_new_tokens: the longest completion, in tokens, stop token included.
        temperature: divides the logits before sampling (> 0; 1.0 samples the policy itself).
        top_p: keep the smallest set of most likely tokens whose probability reaches ``top_p``
            (in (0, 1]; 1.0 keeps everything).
        seed: one integer decides every sample (see "Reproducibility" below).
        tokenizer: the policy's tokenizer (loaded from the policy's path if None).
        batch_size: at most this many completions decode together (default: what fits the
            memory budget, at most 256 on a CPU).
        batch_tokens: at most ``rows * (longest prompt + max_new_tokens)`` tokens per batch
            (default: a KV cache of about 1 GiB on a CPU, 40% of free memory on CUDA).
        backend: ``"hf"`` (this module's batched decoding with transformers models) or
            ``"vllm"`` (a thin, optional path through vLLM's engine; needs vllm and a CUDA GPU;
            **not covered by rmlab's tests**). Log-probs always come from rmlab's engine.
        cache_dir: (default: ``$RMLAB_CACHE_DIR`` if set; ``False``: none) write every finished
            batch there (parquet, one folder per fingerprint of weights + tokenizer + prompt ids +
            settings, see :func:`sample_cache`) and skip rows already there: an interrupted call
            resumes where it stopped, and a later call with a larger ``n`` only samples the new
            rows. See :mod:`rmlab.cache` for what the fingerprint holds; delete the folder to
            clear it.
        overwrite_cache: delete this call's cache entry first and sample everything afresh.
        logprobs: compute the ``logp`` column (one extra batched forward pass); False leaves it NaN.
        eos_token_id: id(s) that end a completion (default: the model's generation config's EOS
            ids and the tokenizer's EOS).
        chat_template_kwargs: extra arguments for ``apply_chat_template``.
        on_chunk: called with each finished chunk's rows (after it is saved), e.g. to log progress.
        progress: show a tqdm progress bar (completions).
        device, dtype, trust_remote_code, revision, use_safetensors, runner: see
            :class:`rmlab.Options` (``runner`` decodes and scores the batches of the ``"hf"``
            backend).
        vllm_kwargs: extra arguments for ``vllm.LLM`` (backend ``"vllm"`` only).
        options: the run options above as one :class:`rmlab.Options` (flat keywords override it).

    Returns:
        One row per completion, ordered by prompt then sample: ``prompt_index`` (position in
        ``prompts``), ``prompt`` (as given), ``sample`` (0..n-1), ``completion`` (decoded text of the
        generated tokens, without the prompt, the stop token or any other special token),
        ``tokens`` (the generated ids, **stop token included when generated**), ``n_tokens``
        (``len(tokens)``), ``finished`` (True when a stop token ended the completion before
        ``max_new_tokens``; False when it was cut at ``max_new_tokens``), ``logp`` (the
        policy's log-prob of ``tokens`` given the prompt, summed, EOS included when generated).

    ``logp`` is the log-prob under the **policy itself** (temperature 1, no top-p), computed by
    rmlab's engine on the exact sampled ids: the number :func:`rmlab.implicit_rewards` reports
    with ``reference_free=True`` for the same ids (the same text re-tokenised gives the same ids in
    all but rare non-canonical tokenisations). With ``temperature != 1`` or ``top_p < 1`` the
    samples do not come from the policy, so the mean of ``logp - ref_logp`` over them is not
    ``KL(pi || ref)``.

    Reproducibility: the same seed gives the same samples for the same prompts and settings on a
    machine, exactly. Randomness is drawn per (prompt, sample, step), so ``batch_size`` and
    ``batch_tokens`` leave the samples unchanged except where floating-point noise (~1e-7) meets a
    random number at a boundary of the cumulative distribution.

    Interrupts: without ``cache_dir``, a ``KeyboardInterrupt`` raises :class:`SamplingInterrupted`,
    whose ``partial`` attribute holds every finished completion (in a notebook:
    ``sys.last_value.partial``); with ``cache_dir`` they are on disk too and the same call resumes.

    Raises:
        DataError: empty or malformed prompts, a prompt too long for ``max_new_tokens`` more tokens.
        ArgumentError: ``n < 1``, ``max_new_tokens < 1``, ``temperature <= 0``, ``top_p`` outside
            (0, 1], an unknown backend (with the closest name), vllm unavailable.
        ModelError, TokenizerError: a model that is not a causal LM, a tokenizer that does not fit.

    Example:
        >>> import rmlab
        >>> from rmlab.toy import tiny_causal_lm, tiny_tokenizer
        >>> frame = rmlab.sample(tiny_causal_lm(), ["The movie was"], n=2, max_new_tokens=4,
        ...                      tokenizer=tiny_tokenizer(), progress=False)
        >>> list(frame.columns)
        ['prompt_index', 'prompt', 'sample', 'completion', 'tokens', 'n_tokens', 'finished', 'logp']
    """
    n, max_new_tokens, temperature, top_p, seed = check_settings(
        n=n, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
        batch_size=batch_size, backend=backend,
    )
    prompts, fmt = check_prompts(prompts)
    cache_dir = resolve_cache_dir(options.cache_dir, options.overwrite_cache)
    if on_chunk is not None and not callable(on_chunk):
        raise ArgumentError(f"on_chunk={on_chunk!r} must be a callable taking a DataFrame (or None).")
    if backend == "vllm":
        ok, why = vllm_available()
        if not ok:
            raise ArgumentError(f"backend='vllm' cannot run here: {why}. Use backend='hf'.")
        if not isinstance(policy, (str, os.PathLike)):
            raise ArgumentError("backend='vllm' loads the model itself: pass the policy as a hub name or local path.")
    model = load_causal_lm(policy, role="policy", **options.loading)
    tok = load_tokenizer(options.tokenizer, policy, role="policy", trust_remote_code=options.trust_remote_code)
    check_vocab_covers(model, tok, role="policy")
    prompt_ids = encode_prompts(prompts, fmt, tok, options.chat_template_kwargs)
    check_prompt_context(prompt_ids, model, max_new_tokens)
    stops = stop_token_ids(eos_token_id, model, tok)
    pad_id = padding_id(tok, model)
    settings = dict(n=n, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed, backend=backend)
    cache = None
    if cache_dir is not None:
        cache = sample_cache(cache_dir, model, tok, prompt_ids, settings=settings, stop_ids=stops, options=options)

    chunks: list[pd.DataFrame] = []
    done: set[int] = set()
    cached = None if cache is None else _cached_rows(cache, model, prompt_ids, n=n, logprobs=logprobs, pad_id=pad_id, options=options)
    if cached is not None:
        chunks.append(cached)
        done = set((cached["prompt_index"] * n + cached["sample"]).tolist())

    total_rows = len(prompt_ids) * n
    longest = max(len(p) for p in prompt_ids) + max_new_tokens
    mode = decoding_mode(model, pad_id, longest) if backend == "hf" else "padded"
    plan = sampling_plan(
        model, [len(p) for p in prompt_ids], n, max_new_tokens, batch_tokens=options.batch_tokens,
        batch_size=batch_size, padded=mode == "padded",
    )
    todo = total_rows - len(done)
    bar = tqdm(total=todo, desc="sampling", unit="sample", disable=not options.progress or todo == 0, leave=False)
    compute = autocast_dtype(model, options.dtype)
    precision = autocast(model_device(model), compute)
    runner = runner_for(options.runner)
    llm = None
    try:
        for batch in plan:
            rows = [r for r in batch if r not in done]
            if not rows:
                continue
            p_index = [r // n for r in rows]
            s_index = [r % n for r in rows]
            keys = row_keys(seed, p_index, s_index)
            if backend == "vllm":
                if llm is None:
                    llm = vllm_engine(policy, tok, options.dtype, vllm_kwargs)
                tokens, finished = vllm_batch(
                    llm, [prompt_ids[i] for i in p_index], keys, max_new_tokens=max_new_tokens,
                    temperature=temperature, top_p=top_p, stop_ids=stops,
                )
                bar.update(len(rows))
                sampler_lp = None
            else:
                with torch.inference_mode(), precision:
                    tokens, finished, sampler_lp = runner.decode(
                        model, [prompt_ids[i] for i in p_index], row_uniforms(keys, max_new_tokens),
                        temperature=temperature, top_p=top_p, stop_ids=stops, pad_id=pad_id,
                        on_finished=bar.update, padded=mode == "padded",
                    )
            logp = [np.nan] * len(rows)
            if logprobs:
                values = engine_logprobs(model, prompt_ids, p_index, tokens, pad_id=pad_id, options=options)
                if sampler_lp is not None:
                    check_sampler(model, sampler_lp, values, autocast=compute is not None)
                logp = summed(values)
            texts = tok.batch_decode([t[:-1] if f else t for t, f in zip(tokens, finished)], skip_special_tokens=True)
            chunk = _frame(p_index, s_index, texts, tokens, finished, logp)
            if cache is not None:
                cache.save(chunk)
            chunks.append(chunk)
            done.update(rows)
            if on_chunk is not None:
                on_chunk(chunk.copy())
    except KeyboardInterrupt as err:
        partial = _assemble(chunks, prompts, n, fmt, settings)
        where = (
            f" They are saved in {str(cache.dir)!r}: call again with the same arguments to resume."
            if cache is not None
            else " Pass cache_dir=... to keep finished batches on disk and resume."
        )
        raise SamplingInterrupted(
            f"Sampling interrupted after {len(partial)} of {total_rows} completions; the finished ones "
            f"are in this exception's .partial (in a notebook: sys.last_value.partial).{where}",
            partial,
        ) from err
    finally:
        bar.close()
    return _assemble(chunks, prompts, n, fmt, settings)


__all__ = [
    "BACKENDS",
    "SAMPLE_COLUMNS",
    "SAMPLER_VERSION",
    "SamplingInterrupted",
    "completion_logprobs",
    "decode_batch",
    "default_batch",
    "sample",
    "sample_cache",
]
