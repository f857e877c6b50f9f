"""Sample completions from a policy: batched, reproducible, resumable, with the policy's log-probs.

:func:`sample` draws ``n`` completions per prompt from a causal LM and returns one row per
completion. It is the first step of every policy-side overoptimization analysis: KL from the
initial policy along DPO / RL checkpoints (Gao et al. 2022, "Scaling Laws for Reward Model
Overoptimization"; Rafailov et al. 2024, "Scaling Laws for Reward Model Overoptimization in Direct
Alignment Algorithms") and best-of-n pools.

How it works:

- **Batched across prompts and samples.** Every (prompt, sample) row is one sequence; rows are
  sorted by prompt length (so a batch holds prompts of similar length), left-padded and decoded
  together with a KV cache under a budget of rows (``batch_size``) and padded tokens
  (``batch_tokens``). Rows that finish (EOS) are dropped from the cache as the batch goes on.
- **Reproducible, batch-size invariant randomness.** The random number that picks token ``t`` of
  sample ``k`` of prompt ``i`` is a counter-based hash of ``(seed, i, k, t)``: the token is drawn
  by inverse-CDF sampling from the (temperature / top-p) distribution with that number. So a row's
  randomness does not depend on which other rows share its batch, how many samples are drawn
  (sample ``k`` of ``n=4`` is sample ``k`` of ``n=8``), or where a run resumed. Results are
  therefore identical across ``batch_size`` / ``batch_tokens`` up to floating-point ties: a
  different batch shape changes logits by ~1e-7, which changes a token only when the random number
  falls within ~1e-7 of a boundary of the cumulative distribution (never observed in the tests).
  For fixed settings on one machine the result is exactly reproducible. Two policies given the
  same seed use the same random numbers (common random numbers), so a policy sampled against
  itself gives identical samples.
- **Log-probs from the engine.** ``logp`` is recomputed after sampling by rmlab's engine
  (:func:`rmlab.engine.logprobs.token_logprobs`, one batched pass), so it is exactly the number
  :func:`rmlab.implicit_rewards` / :func:`rmlab.token_rewards` compute for the same token ids.
  Before sampling, :func:`decoding_mode` checks once per model that decoding left-padded prompts
  past the model's attention windows follows its own forward (models such as Mamba, whose mask is
  not a padding mask, decode prompts of one length together instead; models with no KV cache get a
  :class:`ModelError`), and the sampler's step-by-step log-probs are compared with the engine's on
  the first batch (a warning if they disagree).
- **Resumable.** With ``cache_dir`` each finished batch is written as a parquet file keyed by a
  fingerprint of the model weights, the tokenizer, the prompts and the settings; calling again
  with the same arguments skips what is done. Without ``cache_dir`` an interrupt
  (``KeyboardInterrupt``) re-raises as :class:`SamplingInterrupted` carrying the finished rows.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from rmlab.cache import ChunkCache, resolve_cache_dir, tokenizer_digest, weights_digest
from rmlab.engine.batching import length_batches
from rmlab.engine.decoding import check_sampler, decode_batch, decoding_mode, row_keys, row_uniforms
from rmlab.engine.logprobs import Scored, token_logprobs
from rmlab.engine.precision import autocast, autocast_dtype
from rmlab.errors import ArgumentError, DataError, check_choice, closest
from rmlab.io.models import (
    check_vocab_covers,
    context_length,
    load_causal_lm,
    load_tokenizer,
    model_device,
    padding_id,
)
from rmlab.io.pairs import cell_kind, to_python
from rmlab.io.tokenize import _check_template, _prompt_ids

#: Columns of the frame :func:`sample` returns, in order.
SAMPLE_COLUMNS = ("prompt_index", "prompt", "sample", "completion", "tokens", "n_tokens", "finished", "logp")

#: Bump when a change to the sampler changes what a seed produces (invalidates caches).
SAMPLER_VERSION = 1

BACKENDS = ("hf", "vllm")


class SamplingInterrupted(KeyboardInterrupt):
    """Sampling was interrupted; ``partial`` holds every completion finished before the interrupt.

    A subclass of ``KeyboardInterrupt``, so it stops a script or a notebook cell like one. In a
    notebook the finished rows stay reachable after the traceback as ``sys.last_value.partial``;
    in code, ``except rmlab.SamplingInterrupted as err: frame = err.partial``.
    """

    def __init__(self, message: str, partial: pd.DataFrame | None = None):
        super().__init__(message)
        self.partial = partial if partial is not None else pd.DataFrame(columns=list(SAMPLE_COLUMNS))


# --------------------------------------------------------------------------------------------------
# input checks (all before any model runs)
# --------------------------------------------------------------------------------------------------
def _check_int(name: str, value, minimum: int, hint: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ArgumentError(f"{name}={value!r} must be an integer >= {minimum} ({hint}).")
    return int(value)


def check_settings(
    *, n, max_new_tokens, temperature, top_p, seed, batch_size, batch_tokens, backend
) -> tuple[int, int, float, float, int]:
    """Validate the sampling settings; returns ``(n, max_new_tokens, temperature, top_p, seed)``."""
    n = _check_int("n", n, 1, "completions per prompt")
    max_new_tokens = _check_int("max_new_tokens", max_new_tokens, 1, "the longest completion, in tokens")
    try:
        temperature = float(temperature)
    except (TypeError, ValueError):
        raise ArgumentError(f"temperature={temperature!r} must be a number > 0 (1.0 samples the policy itself).") from None
    if not math.isfinite(temperature) or temperature <= 0:
        raise ArgumentError(
            f"temperature={temperature!r} must be a finite number > 0 (1.0 samples the policy itself; "
            "greedy decoding is not sampling: use a small temperature such as 1e-3 to approximate it)."
        )
    try:
        top_p = float(top_p)
    except (TypeError, ValueError):
        raise ArgumentError(f"top_p={top_p!r} must be a number in (0, 1] (1.0 keeps the whole distribution).") from None
    if not (0.0 < top_p <= 1.0):
        raise ArgumentError(f"top_p={top_p!r} must be in (0, 1] (1.0 keeps the whole distribution).")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ArgumentError(f"seed={seed!r} must be an integer.")
    if batch_size is not None:
        _check_int("batch_size", batch_size, 1, "completions decoded together; None picks one")
    if batch_tokens is not None:
        _check_int("batch_tokens", batch_tokens, 1, "padded tokens per batch; None picks one")
    check_choice("backend", backend, BACKENDS)
    return n, max_new_tokens, temperature, top_p, int(seed)


def check_prompts(prompts) -> tuple[list, str]:
    """Validate prompts: a list of strings or of chat conversations. Returns ``(prompts, format)``.

    A DataFrame with a ``prompt`` column, a Series, a tuple or an array are accepted too.
    """
    if isinstance(prompts, str):
        raise DataError(
            "prompts is one string; pass a list of prompts (e.g. [prompt]), so that each row of the "
            "result can say which prompt it answers."
        )
    if isinstance(prompts, pd.DataFrame):
        if "prompt" not in prompts.columns:
            raise DataError(
                f"The prompts frame has columns {list(map(str, prompts.columns))} but no 'prompt'."
                + closest("prompt", map(str, prompts.columns))
            )
        prompts = prompts["prompt"]
    if isinstance(prompts, (pd.Series, np.ndarray, tuple)):
        prompts = list(prompts)
    if isinstance(prompts, Mapping) or not isinstance(prompts, list):
        raise DataError(
            f"prompts must be a list of strings or of chat conversations (lists of messages), got "
            f"{type(prompts).__name__}."
        )
    if not prompts:
        raise DataError("prompts is empty: pass at least one prompt to sample from.")
    if all(isinstance(m, Mapping) for m in prompts):
        raise DataError(
            "prompts looks like one conversation (a list of messages); pass a list of conversations "
            "([messages]) so that each prompt is one conversation."
        )
    out, kinds = [], set()
    for i, p in enumerate(prompts):
        p = to_python(p)
        if isinstance(p, (list, tuple)) and not p:
            raise DataError(f"Prompt {i} is an empty conversation; give it at least one message.")
        kind = cell_kind(p, i, "prompt", response=False)
        if kinds and kind not in kinds:
            raise DataError(
                f"Prompt {i} is {kind!r} but earlier prompts are {next(iter(kinds))!r}; use one format "
                "(all plain text or all chat conversations)."
            )
        kinds.add(kind)
        out.append(list(p) if isinstance(p, tuple) else p)
    return out, kinds.pop()


def encode_prompts(prompts: list, fmt: str, tokenizer, chat_template_kwargs: dict | None = None) -> list[list[int]]:
    """Token ids of each prompt as a trainer would feed them before the completion.

    Plain text is tokenised with the tokenizer's own special-token rules (a BOS where the tokenizer
    adds one); conversations get the chat template with the generation prompt (the assistant turn
    opened), as :func:`rmlab.io.tokenize.encode_pairs` does. A prompt that encodes to nothing
    (``""`` with a tokenizer that adds no BOS) starts from the BOS token, or from the EOS token when
    there is no BOS (GPT-2's convention for unconditional samples).
    """
    kwargs = dict(chat_template_kwargs or {})
    if fmt == "chat":
        _check_template(tokenizer, kwargs)
    ids = [list(map(int, p)) for p in _prompt_ids(tokenizer, fmt, prompts, kwargs)]
    for i, p in enumerate(ids):
        if not p:
            start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
            if start is None:
                raise DataError(
                    f"Prompt {i} encodes to no tokens and the tokenizer has neither a BOS nor an EOS "
                    "token to start from; give it some text."
                )
            ids[i] = [int(start)]
    return ids


def check_prompt_context(prompt_ids: list[list[int]], model, max_new_tokens: int, role: str = "policy") -> None:
    """Raise :class:`DataError` for the first prompt that cannot take ``max_new_tokens`` more tokens."""
    limit = context_length(model)
    if limit is None:
        return
    for i, ids in enumerate(prompt_ids):
        if len(ids) >= limit:
            raise DataError(
                f"Prompt {i} is {len(ids)} tokens, as long as the {role}'s whole context ({limit} "
                "tokens): there is no room for a completion. Shorten the prompt."
            )
        if len(ids) + max_new_tokens > limit:
            raise DataError(
                f"Prompt {i} is {len(ids)} tokens; with max_new_tokens={max_new_tokens} that makes "
                f"{len(ids) + max_new_tokens}, but the {role} accepts at most {limit}. Pass "
                f"max_new_tokens={limit - len(ids)} or less, or shorten the prompt."
            )


def stop_token_ids(eos_token_id, model, tokenizer) -> list[int]:
    """The ids that end a completion: ``eos_token_id`` if given, else the model's generation config's
    EOS id(s) together with the tokenizer's EOS (chat models often list their end-of-turn token)."""
    def as_list(value):
        if value is None:
            return []
        if isinstance(value, (int, np.integer)):
            return [int(value)]
        return [int(v) for v in value]

    if eos_token_id is not None:
        try:
            ids = as_list(eos_token_id)
        except (TypeError, ValueError):
            raise ArgumentError(f"eos_token_id={eos_token_id!r} must be a token id or a list of ids.") from None
    else:
        gen = getattr(model, "generation_config", None)
        ids = as_list(getattr(gen, "eos_token_id", None)) + as_list(tokenizer.eos_token_id)
    vocab = model.get_output_embeddings().weight.shape[0]
    for i in ids:
        if not 0 <= i < vocab:
            raise ArgumentError(f"Stop token id {i} is outside the model's vocabulary (0..{vocab - 1}).")
    return sorted(set(ids))


# --------------------------------------------------------------------------------------------------
# log-probs of given completions
# --------------------------------------------------------------------------------------------------
def _sequences(prompt_ids: list[list[int]], prompt_index, tokens) -> list[Scored]:
    return [Scored(tuple(prompt_ids[i]) + tuple(int(t) for t in toks), len(prompt_ids[i])) for i, toks in zip(prompt_index, tokens)]


def engine_logprobs(
    model, prompt_ids: list[list[int]], prompt_index, tokens, *, pad_id: int, dtype="auto",
    batch_tokens: int | None = None, progress: bool = False, desc: str = "log-probs",
) -> list[np.ndarray]:
    """Per-token log-probs of each completion ``tokens[k]`` after prompt ``prompt_index[k]`` (engine)."""
    seqs = _sequences(prompt_ids, prompt_index, tokens)
    empty = [k for k, s in enumerate(seqs) if len(s.ids) == s.start]
    if empty:
        raise DataError(f"Row {empty[0]} has no completion tokens to score.")
    return token_logprobs(
        model, seqs, batch_tokens=batch_tokens, pad_id=pad_id, autocast_dtype=autocast_dtype(model, dtype),
        progress=progress, desc=desc,
    )


def completion_logprobs(
    model,
    samples: pd.DataFrame,
    *,
    tokenizer=None,
    chat_template_kwargs: dict | None = None,
    batch_tokens: int | None = None,
    device="auto",
    dtype="auto",
    progress: bool = True,
    trust_remote_code: bool = False,
) -> np.ndarray:
    """Summed log-prob under ``model`` of each sampled completion (its ``tokens``) after its prompt.

    The reference side of a KL estimate: with samples from a policy ``pi`` (:func:`sample`),
    ``samples["logp"] - completion_logprobs(reference, samples)`` is the per-sample log-ratio
    ``log pi(y|x) - log pi_ref(y|x)`` whose mean estimates ``KL(pi || pi_ref)`` (Gao et al. 2022;
    Schulman 2020, "Approximating KL Divergence"). The exact token ids are scored (no re-tokenising
    of the text), EOS included when the sample has one, by rmlab's engine.

    Args:
        model: a causal LM or a hub name / local path; it must share the sampler's tokenizer.
        samples: a frame from :func:`sample` (columns ``prompt`` and ``tokens``).
        tokenizer: the tokenizer the samples were drawn with (loaded from ``model`` if None).
        chat_template_kwargs, batch_tokens, device, dtype, progress, trust_remote_code: as in
            :func:`sample`.

    Returns:
        A float64 array, one value per row of ``samples``.
    """
    if not isinstance(samples, pd.DataFrame) or not {"prompt", "tokens"} <= set(samples.columns):
        raise DataError("samples must be a frame from rmlab.sample (with 'prompt' and 'tokens' columns).")
    prompts, fmt = check_prompts(list(samples["prompt"]))
    lm = load_causal_lm(model, role="model", device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    tok = load_tokenizer(tokenizer, model, role="model", trust_remote_code=trust_remote_code)
    check_vocab_covers(lm, tok, role="model")
    prompt_ids = encode_prompts(prompts, fmt, tok, chat_template_kwargs)
    tokens = [to_python(t) for t in samples["tokens"]]
    vocab = lm.get_output_embeddings().weight.shape[0]
    for k, toks in enumerate(tokens):
        if not isinstance(toks, list) or not toks or not all(0 <= int(t) < vocab for t in toks):
            raise DataError(f"Row {k}, column 'tokens' must be a non-empty list of token ids below {vocab}.")
    limit = context_length(lm)
    if limit is not None:
        for k, (p, toks) in enumerate(zip(prompt_ids, tokens)):
            if len(p) + len(toks) > limit:
                raise DataError(f"Row {k}: prompt+completion is {len(p) + len(toks)} tokens; the model accepts {limit}.")
    values = engine_logprobs(
        lm, prompt_ids, range(len(prompt_ids)), tokens, pad_id=padding_id(tok, lm), dtype=dtype,
        batch_tokens=batch_tokens, progress=progress,
    )
    return np.array([float(v.astype(np.float64).sum()) for v in values])


# --------------------------------------------------------------------------------------------------
# batch sizes
# --------------------------------------------------------------------------------------------------
def _kv_bytes_per_token(model) -> int:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None) or 12
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None) or 768
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None) or 12
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    elem = torch.finfo(next(model.parameters()).dtype).bits // 8
    return max(1, 2 * layers * kv_heads * head_dim * elem)


def default_batch(model) -> tuple[int, int]:
    """``(batch_tokens, batch_size)`` for sampling: the KV cache within ~1 GiB on a CPU (40% of free
    memory on CUDA) and the per-row logits within a quarter of that; at most 256 rows on a CPU."""
    dev = model_device(model)
    if dev.type == "cuda":
        budget = int(0.4 * torch.cuda.mem_get_info(dev)[0])
    else:
        budget = 1 << 30
    vocab = model.get_output_embeddings().weight.shape[0]
    rows = max(1, budget // 4 // (vocab * 24))
    if dev.type != "cuda":
        rows = min(rows, 256)
    return max(1, budget // _kv_bytes_per_token(model)), rows


# --------------------------------------------------------------------------------------------------
# the public call
# --------------------------------------------------------------------------------------------------
def _vllm_available() -> tuple[bool, str]:
    if importlib.util.find_spec("vllm") is None:
        return False, "vllm is not installed (pip install vllm, on a machine with a CUDA GPU)"
    if not torch.cuda.is_available():
        return False, "vllm needs a CUDA GPU and none is available"
    return True, ""


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
    if chunks:
        frame = pd.concat(chunks, ignore_index=True)
    else:
        frame = _frame([], [], [], [], [], [])
    frame = frame[frame["sample"] < n].sort_values(["prompt_index", "sample"], kind="stable").reset_index(drop=True)
    frame.insert(1, "prompt", [prompts[i] for i in frame["prompt_index"]])
    frame = frame[list(SAMPLE_COLUMNS)]
    frame.attrs.update(kind="samples", format=fmt, **settings)
    return frame


def sample(
    policy,
    prompts,
    *,
    n: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    tokenizer=None,
    batch_size: int | None = None,
    batch_tokens: int | None = None,
    backend: str = "hf",
    cache_dir: str | os.PathLike | None = None,
    overwrite_cache: bool = False,
    logprobs: bool = True,
    eos_token_id: int | Sequence[int] | None = None,
    chat_template_kwargs: dict | None = None,
    on_chunk: Callable[[pd.DataFrame], None] | None = None,
    progress: bool = True,
    device="auto",
    dtype="auto",
    trust_remote_code: bool = False,
    vllm_kwargs: dict | None = None,
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
        cache_dir: (default: ``$RMLAB_CACHE_DIR`` if set; ``False``: none) write every finished batch there (parquet, one folder per fingerprint of
            weights + tokenizer + prompts + settings) and skip rows already there: an interrupted
            call resumes where it stopped, and a later call with a larger ``n`` only samples the
            new rows. See :mod:`rmlab.cache` for what the fingerprint holds; delete the folder
            to clear it.
        overwrite_cache: delete this call's cache entry first and sample everything afresh.
        logprobs: compute the ``logp`` column (one extra batched forward pass); False leaves it NaN.
        eos_token_id: id(s) that end a completion (default: the model's generation config's EOS
            ids and the tokenizer's EOS).
        chat_template_kwargs: extra arguments for ``apply_chat_template``.
        on_chunk: called with each finished chunk's rows (after it is saved), e.g. to log progress.
        progress: show a tqdm progress bar (completions).
        device, dtype, trust_remote_code: as in :func:`rmlab.implicit_rewards`.
        vllm_kwargs: extra arguments for ``vllm.LLM`` (backend ``"vllm"`` only).

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
        batch_size=batch_size, batch_tokens=batch_tokens, backend=backend,
    )
    prompts, fmt = check_prompts(prompts)
    cache_dir = resolve_cache_dir(cache_dir, overwrite_cache)
    if on_chunk is not None and not callable(on_chunk):
        raise ArgumentError(f"on_chunk={on_chunk!r} must be a callable taking a DataFrame (or None).")
    if backend == "vllm":
        ok, why = _vllm_available()
        if not ok:
            raise ArgumentError(f"backend='vllm' cannot run here: {why}. Use backend='hf'.")
        if not isinstance(policy, (str, os.PathLike)):
            raise ArgumentError("backend='vllm' loads the model itself: pass the policy as a hub name or local path.")
    model = load_causal_lm(policy, role="policy", device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    tok = load_tokenizer(tokenizer, policy, role="policy", trust_remote_code=trust_remote_code)
    check_vocab_covers(model, tok, role="policy")
    prompt_ids = encode_prompts(prompts, fmt, tok, chat_template_kwargs)
    check_prompt_context(prompt_ids, model, max_new_tokens)
    stops = stop_token_ids(eos_token_id, model, tok)
    pad_id = padding_id(tok, model)
    settings = dict(n=n, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed, backend=backend)

    cache = None
    if cache_dir is not None:
        dev = model_device(model)
        cache = ChunkCache(
            cache_dir,
            "samples",
            {
                "sampler_version": SAMPLER_VERSION,
                "backend": backend,
                "model": weights_digest(model),
                "tokenizer": tokenizer_digest(tok),
                "prompt_ids": hashlib.blake2b(json.dumps(prompt_ids).encode(), digest_size=16).hexdigest(),
                "prompts": len(prompt_ids),
                "max_new_tokens": max_new_tokens,
                "temperature": temperature,
                "top_p": top_p,
                "seed": seed,
                "stop_ids": stops,
                "device": dev.type,
                "compute_dtype": str(autocast_dtype(model, dtype) or next(model.parameters()).dtype),
            },
            overwrite=overwrite_cache,
        )

    chunks: list[pd.DataFrame] = []
    done: set[int] = set()
    if cache is not None:
        cached = cache.load(unique=["prompt_index", "sample"])
        if cached is not None:
            cached["tokens"] = [list(map(int, t)) for t in cached["tokens"]]
            cached = cached[cached["sample"] < n].reset_index(drop=True)
            if logprobs and cached["logp"].isna().any():
                missing = cached["logp"].isna().to_numpy()
                sub = cached[missing]
                values = engine_logprobs(
                    model, prompt_ids, sub["prompt_index"], sub["tokens"], pad_id=pad_id, dtype=dtype,
                    batch_tokens=batch_tokens,
                )
                cached.loc[missing, "logp"] = [float(v.astype(np.float64).sum()) for v in values]
            chunks.append(cached)
            done = set((cached["prompt_index"] * n + cached["sample"]).tolist())

    # rows r = i * n + k (prompt i, sample k); batches of similar prompt length under the budget
    total_rows = len(prompt_ids) * n
    default_tokens, default_rows = default_batch(model)
    lengths = [len(prompt_ids[r // n]) + max_new_tokens for r in range(total_rows)]
    budget, rows_cap = batch_tokens or default_tokens, batch_size or default_rows
    mode = decoding_mode(model, pad_id, max(lengths, default=0)) if backend == "hf" else "padded"
    if mode == "unpadded":
        by_length: dict[int, list[int]] = {}
        for r, length in enumerate(lengths):
            by_length.setdefault(length, []).append(r)
        plan = [
            [rows[i] for i in batch]
            for length in sorted(by_length, reverse=True)
            for rows in [by_length[length]]
            for batch in length_batches([length] * len(rows), budget, max_items=rows_cap)
        ]
    else:
        plan = length_batches(lengths, budget, max_items=rows_cap)
    todo = total_rows - len(done)
    bar = tqdm(total=todo, desc="sampling", unit="sample", disable=not progress or todo == 0, leave=False)
    precision = autocast(model_device(model), autocast_dtype(model, dtype))
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
                    llm = _vllm_engine(policy, tok, dtype, vllm_kwargs)
                tokens, finished = _vllm_batch(
                    llm, [prompt_ids[i] for i in p_index], keys, max_new_tokens=max_new_tokens,
                    temperature=temperature, top_p=top_p, stop_ids=stops,
                )
                bar.update(len(rows))
                sampler_lp = None
            else:
                with torch.inference_mode(), precision:
                    tokens, finished, sampler_lp = decode_batch(
                        model, [prompt_ids[i] for i in p_index], row_uniforms(keys, max_new_tokens),
                        temperature=temperature, top_p=top_p, stop_ids=stops, pad_id=pad_id,
                        on_finished=bar.update, padded=mode == "padded",
                    )
            if logprobs:
                values = engine_logprobs(
                    model, prompt_ids, p_index, tokens, pad_id=pad_id, dtype=dtype, batch_tokens=batch_tokens
                )
                if sampler_lp is not None:
                    check_sampler(model, sampler_lp, values, autocast=autocast_dtype(model, dtype) is not None)
                logp = [float(v.astype(np.float64).sum()) for v in values]
            else:
                logp = [np.nan] * len(rows)
            texts = tok.batch_decode(
                [t[:-1] if f else t for t, f in zip(tokens, finished)], skip_special_tokens=True
            )
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


# --------------------------------------------------------------------------------------------------
# vLLM (optional, untested here: rmlab's CI has no GPU)
# --------------------------------------------------------------------------------------------------
def _vllm_engine(policy, tokenizer, dtype, vllm_kwargs):  # pragma: no cover - needs vllm and a GPU
    from vllm import LLM

    kwargs = {"gpu_memory_utilization": 0.5, "dtype": "auto" if dtype in (None, "auto") else str(dtype).replace("torch.", "")}
    kwargs.update(vllm_kwargs or {})
    return LLM(model=str(policy), tokenizer=getattr(tokenizer, "name_or_path", None) or str(policy), **kwargs)


def _vllm_batch(llm, prompt_ids, keys, *, max_new_tokens, temperature, top_p, stop_ids):  # pragma: no cover
    """One request per row, each with its own seed from the row key (batch-size invariant)."""
    from vllm import SamplingParams

    params = [
        SamplingParams(
            n=1, temperature=temperature, top_p=top_p, top_k=-1, max_tokens=max_new_tokens,
            seed=int(k >> np.uint64(2)), stop_token_ids=list(stop_ids), ignore_eos=not stop_ids,
            skip_special_tokens=True,
        )
        for k in keys
    ]
    outputs = llm.generate([{"prompt_token_ids": list(p)} for p in prompt_ids], params, use_tqdm=False)
    tokens, finished = [], []
    for out in outputs:
        c = out.outputs[0]
        ids = [int(t) for t in c.token_ids]
        stopped = c.finish_reason == "stop"
        if stopped and (not ids or ids[-1] not in stop_ids) and isinstance(c.stop_reason, int):
            ids.append(int(c.stop_reason))
        elif stopped and (not ids or ids[-1] not in stop_ids) and stop_ids:
            ids.append(int(stop_ids[0]))  # EOS ends the request without being listed
        tokens.append(ids)
        finished.append(stopped)
    return tokens, finished


__all__ = [
    "SAMPLE_COLUMNS",
    "SamplingInterrupted",
    "completion_logprobs",
    "sample",
]
