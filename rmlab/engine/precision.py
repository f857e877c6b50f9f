"""The one autocast rule: in which precision a model's forward passes run.

On CUDA, a model whose weights are float32 runs under ``torch.autocast`` to the asked dtype
(bfloat16 by default: ``dtype="auto"``), as training frameworks evaluate; on a CPU every forward
runs in the weights' own dtype (CPU autocast is slower and less exact than float32 on small
models). A model loaded in the asked dtype needs no autocast.
"""

from __future__ import annotations

import contextlib

import torch

from rmlab.io.models import model_device, resolve_dtype


def autocast_dtype(model, dtype="auto") -> torch.dtype | None:
    """The dtype to autocast ``model``'s forward to, or None to run it in its weights' dtype."""
    device = model_device(model)
    wanted = resolve_dtype(dtype, device)
    return wanted if device.type == "cuda" and wanted != next(model.parameters()).dtype else None


def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` to ``dtype`` on ``device`` (CUDA only), or nothing when ``dtype`` is None."""
    if dtype is None or device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
