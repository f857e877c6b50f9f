"""Sampling through vLLM's engine (``backend="vllm"`` of :func:`rmlab.sample`): optional, needs vllm
and a CUDA GPU, and is not covered by rmlab's tests.

vLLM (Kwon et al. 2023, "Efficient Memory Management for Large Language Model Serving with
PagedAttention") decodes; log-probs still come from rmlab's engine. Each row is its own request
with a seed taken from the row's key (:func:`rmlab.engine.decoding.row_keys`), so a row's sample
does not depend on its batch, though it differs from the ``"hf"`` backend's for the same seed.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import torch


def vllm_available() -> tuple[bool, str]:
    """``(True, "")`` when vLLM can run here, else ``(False, why not)`` (Kwon et al. 2023)."""
    if importlib.util.find_spec("vllm") is None:
        return False, "vllm is not installed (pip install vllm, on a machine with a CUDA GPU)"
    if not torch.cuda.is_available():
        return False, "vllm needs a CUDA GPU and none is available"
    return True, ""


def vllm_engine(policy, tokenizer, dtype, vllm_kwargs):  # pragma: no cover - needs vllm and a GPU
    """A ``vllm.LLM`` for ``policy`` (a hub name or path) with its tokenizer (Kwon et al. 2023)."""
    from vllm import LLM

    kwargs = {"gpu_memory_utilization": 0.5, "dtype": "auto" if dtype in (None, "auto") else str(dtype).replace("torch.", "")}
    kwargs.update(vllm_kwargs or {})
    return LLM(model=str(policy), tokenizer=getattr(tokenizer, "name_or_path", None) or str(policy), **kwargs)


def vllm_batch(llm, prompt_ids, keys, *, max_new_tokens, temperature, top_p, stop_ids):  # pragma: no cover
    """One request per row, each with its own seed from the row key (batch-size invariant);
    returns per row the generated ids (stop token included when one ended it) and whether one did
    (ancestral sampling with temperature and top-p, Holtzman et al. 2020)."""
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
