"""Load Hugging Face models and tokenizers, and decide on device and dtype.

Every analysis accepts either a ``PreTrainedModel`` object or a hub name / local path. Loading
defaults to safetensors and ``trust_remote_code=False``; both must be asked for explicitly to change.
``device="auto"`` picks CUDA when present; ``dtype="auto"`` loads bf16 on a CUDA device that supports
it and fp32 otherwise. A model object is used in its own dtype and, unless a device is named, on
its own device.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
)

from rmlab.errors import ArgumentError, DataError, ModelError, TokenizerError, closest
from rmlab.options import LOADING

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_device(device="auto") -> torch.device:
    """``"auto"`` -> CUDA if available else CPU; anything ``torch.device`` accepts otherwise."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ArgumentError(f"device={device!r} is not a device torch knows ({err}).") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ArgumentError(f"device={device!r} was asked for but CUDA is not available; use 'cpu'.")
    return resolved


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    """``"auto"`` -> bf16 on a CUDA device that supports it, fp32 otherwise."""
    if dtype is None or dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ArgumentError(f"dtype={dtype!r} is not supported; use 'auto' or one of {sorted(_DTYPES)}.")


def is_causal_lm(model) -> bool:
    """True for decoder-only language models with an unembedding (``*ForCausalLM``, ``*LMHeadModel``)."""
    if not isinstance(model, PreTrainedModel):
        return False
    if getattr(model.config, "is_encoder_decoder", False):
        return False
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = type(model).__name__
    known = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    if name in known or name.endswith(("ForCausalLM", "LMHeadModel")):
        return model.get_output_embeddings() is not None
    return False


def _describe(model) -> str:
    if isinstance(model, PreTrainedModel):
        return f"{type(model).__name__} ({getattr(model.config, 'model_type', '?')})"
    return type(model).__name__


def _loaded(auto_class, model, what: str, *, device, dtype, trust_remote_code, use_safetensors, revision):
    """``model`` loaded with ``auto_class`` when it is a name or path (on ``device``, in ``dtype``),
    else the object itself, moved only when a device is named."""
    if isinstance(model, (str, os.PathLike)):
        if _looks_local(model) and not Path(model).expanduser().exists():
            raise ModelError(
                f"The {what} path {str(model)!r} does not exist (working directory: {os.getcwd()}). "
                "Pass a folder written by save_pretrained(), a hub name such as 'org/model', or the "
                "model object itself."
            )
        target = resolve_device(device)
        try:
            loaded = auto_class.from_pretrained(
                str(model),
                dtype=resolve_dtype(dtype, target),
                trust_remote_code=trust_remote_code,
                use_safetensors=use_safetensors,
                revision=revision,
            )
        except (OSError, ValueError) as err:
            hint = ""
            if use_safetensors and "safetensors" in str(err).lower():
                hint = (
                    " The repository may only have pickled weights: pass use_safetensors=False if "
                    "you trust its source."
                )
            raise ModelError(f"Could not load the {what} {str(model)!r}: {err}{hint}") from err
        return loaded.to(target)
    check_materialised(model, what)
    if device not in (None, "auto"):
        return model.to(resolve_device(device))
    return model


def check_materialised(model, what: str) -> None:
    """Raise :class:`ModelError` when a model's weights are not loaded (parameters on the meta device)."""
    if not isinstance(model, torch.nn.Module) or getattr(model, "hf_device_map", None):
        return  # accelerate's offloading keeps weights on 'meta' on purpose and loads them per layer
    params = list(model.parameters())
    meta = [p for p in params if p.device.type == "meta"]
    if meta:
        raise ModelError(
            f"The {what} has {len(meta)} of {len(params)} parameter tensors on the 'meta' device: its "
            "weights were never loaded (built under init_empty_weights or device_map='meta'), so it "
            "cannot compute anything. Load it with from_pretrained(...) (or pass its path), or call "
            "load_state_dict(..., assign=True) first."
        )


def check_same_device(models, roles) -> None:
    """Raise :class:`ModelError` when models that must run in one computation live on different devices."""
    devices = [model_device(m) for m in models]
    if len({str(d) for d in devices}) > 1:
        where = ", ".join(f"the {role} on {str(d)!r}" for role, d in zip(roles, devices))
        raise ModelError(
            f"The models are on different devices ({where}), but this analysis feeds them the same "
            f"input tensors. Move them to one device (e.g. device={str(devices[0])!r}, which moves "
            "both) or call .to(...) on each."
        )


def _looks_local(path) -> bool:
    """A path, not a hub name: a PathLike, or a string that starts like a file-system path."""
    return isinstance(path, os.PathLike) or str(path).startswith((".", "/", "~", "\\")) or (
        os.sep != "/" and os.sep in str(path)
    )


#: Options that decide how a model given by name or path is loaded (``load_causal_lm`` and
#: ``load_reward_model`` keywords); the last two are used up by loading.
LOAD_OPTIONS = LOADING
LOAD_ONLY_OPTIONS = ("use_safetensors", "revision")


def load_causal_lm(
    model,
    *,
    role: str = "policy",
    device="auto",
    dtype="auto",
    trust_remote_code: bool = False,
    use_safetensors: bool = True,
    revision: str | None = None,
) -> PreTrainedModel:
    """Return a causal LM ready for inference, loading it first if a name or path is given.

    Args:
        model: a ``PreTrainedModel`` or a hub name / local path for ``AutoModelForCausalLM``.
        role: how the model is named in error messages (``"policy"``, ``"reference"``).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``... A model object stays where it is
            unless a device is named.
        dtype: ``"auto"``, ``"float32"``, ``"bfloat16"``, ``"float16"`` or a ``torch.dtype``; applies
            to loading (a model object keeps its dtype).
        trust_remote_code: run code from the model repository (off unless asked).
        use_safetensors: refuse pickled ``.bin`` weights unless set to False.
        revision: hub revision (branch, tag or commit).

    Raises:
        ModelError: the object is not a causal LM (e.g. a sequence classifier), or loading failed.
    """
    model = _loaded(
        AutoModelForCausalLM, model, f"{role} model", device=device, dtype=dtype,
        trust_remote_code=trust_remote_code, use_safetensors=use_safetensors, revision=revision,
    )
    if not is_causal_lm(model):
        raise ModelError(
            f"The {role} model is a {_describe(model)}, not a causal language model: implicit rewards "
            "need next-token log-probs. Pass an AutoModelForCausalLM (a reward model goes to "
            "rmlab's reward-model analyses instead)."
        )
    return model.eval()


def is_reward_model(model) -> bool:
    """True for sequence classifiers (``*ForSequenceClassification``), the usual reward-model class."""
    return isinstance(model, PreTrainedModel) and type(model).__name__.endswith("ForSequenceClassification")


def load_reward_model(
    model,
    *,
    role: str = "reward model",
    device="auto",
    dtype="auto",
    trust_remote_code: bool = False,
    use_safetensors: bool = True,
    revision: str | None = None,
) -> PreTrainedModel:
    """Return a reward model (a sequence classifier) ready for inference, loading it if a name or path.

    Arguments as in :func:`load_causal_lm`; a multi-output head is accepted here and resolved by
    :func:`reward_label`.

    Raises:
        ModelError: the object is a causal LM or anything else than a sequence classifier, or loading
            failed.
    """
    model = _loaded(
        AutoModelForSequenceClassification, model, role, device=device, dtype=dtype,
        trust_remote_code=trust_remote_code, use_safetensors=use_safetensors, revision=revision,
    )
    if not is_reward_model(model):
        extra = (
            " It is a causal LM: a DPO policy's implicit reward is computed by rmlab.implicit_rewards "
            "(or attribute_reward(..., reference=...))."
            if is_causal_lm(model)
            else ""
        )
        raise ModelError(
            f"The {role} is a {_describe(model)}, not a sequence classifier. Pass an "
            f"AutoModelForSequenceClassification with one score (num_labels=1).{extra}"
        )
    return model.eval()


def reward_label(model, label=None) -> int:
    """Index of the output that holds the reward: 0 for a one-output head, else ``label`` resolved.

    ``label`` may be an index or a name from ``model.config.id2label``.

    Raises:
        ModelError: the head has several outputs and ``label`` does not pick one of them.
    """
    n = int(model.config.num_labels)
    names = {str(v): int(k) for k, v in (getattr(model.config, "id2label", None) or {}).items()}
    if label is None:
        if n == 1:
            return 0
        raise ModelError(
            f"The reward model has {n} outputs ({', '.join(names) or 'unnamed'}); a reward is one score. "
            "Pass label=<index or name> to say which output is the reward."
        )
    if isinstance(label, str):
        if label not in names:
            raise ModelError(
                f"label={label!r} is not one of the reward model's outputs {sorted(names)}."
                + closest(label, names)
            )
        return names[label]
    if isinstance(label, (int, np.integer)) and not isinstance(label, bool) and 0 <= int(label) < n:
        return int(label)
    raise ModelError(f"label={label!r} must be an output index in 0..{n - 1} or a label name.")


def load_tokenizer(tokenizer, model, *, role: str = "policy", trust_remote_code: bool = False):
    """Return ``tokenizer`` (loading it if a name/path), or the tokenizer saved with ``model``.

    Raises:
        TokenizerError: no tokenizer was given and none can be found beside the model.
    """
    source = tokenizer
    if source is None:
        source = model if isinstance(model, (str, os.PathLike)) else getattr(model, "name_or_path", "")
        if not source:
            raise TokenizerError(
                f"No tokenizer was given for the {role} model and it was not loaded from a path. "
                "Pass tokenizer=... (the tokenizer the model was trained with)."
            )
    if isinstance(source, (str, os.PathLike)):
        try:
            return AutoTokenizer.from_pretrained(str(source), trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as err:
            raise TokenizerError(
                f"Could not load a tokenizer for the {role} model from {str(source)!r}: {err}. "
                "Pass tokenizer=... explicitly."
            ) from err
    return source


def check_same_tokenizer(first, second, *, names=("policy", "reference")) -> None:
    """Raise :class:`TokenizerError` if two tokenizers would give different ids for the same text."""
    if first is second:
        return
    vocab_a, vocab_b = first.get_vocab(), second.get_vocab()
    if vocab_a != vocab_b:
        only_a = len(set(vocab_a.items()) - set(vocab_b.items()))
        raise TokenizerError(
            f"The {names[0]} and {names[1]} tokenizers disagree ({len(vocab_a)} vs {len(vocab_b)} "
            f"tokens, {only_a} entries differ). Log-prob ratios need the same tokenisation: the "
            f"{names[1]} must use the {names[0]}'s tokenizer (both come from one base model); use the "
            f"matching model, or save the right tokenizer beside the {names[1]}."
        )
    if first.eos_token != second.eos_token:
        raise TokenizerError(
            f"The {names[0]} and {names[1]} tokenizers have different EOS tokens "
            f"({first.eos_token!r} vs {second.eos_token!r}); pass one tokenizer=... for both."
        )


def check_vocab_covers(model, tokenizer, *, role: str = "policy") -> None:
    """Raise :class:`TokenizerError` when the tokenizer produces ids the model has no row for."""
    head = model.get_output_embeddings()
    rows = head.weight.shape[0] if head is not None else model.config.vocab_size
    if len(tokenizer) > rows:
        raise TokenizerError(
            f"The tokenizer has {len(tokenizer)} tokens but the {role} model's output layer has only "
            f"{rows} rows: they do not belong together. Pass the tokenizer the {role} was trained with."
        )


def padding_id(tokenizer, model=None, *, role: str = "policy") -> int:
    """The one padding rule: the id that fills batches for ``model`` with ``tokenizer``.

    A reward model pools its score at the last token that is not its ``config.pad_token_id``, so
    that id comes first for sequence classifiers; otherwise the tokenizer's pad token, then its
    EOS token (padding is never attended to by a causal LM, so any id would do there, and 0 is the
    last resort). A reward model with no such id at all gets a :class:`TokenizerError`.
    """
    classifier = model is not None and is_reward_model(model)
    candidates = [model.config.pad_token_id] if classifier else []
    candidates += [tokenizer.pad_token_id, tokenizer.eos_token_id]
    if model is not None and not classifier:
        candidates.append(getattr(model.config, "pad_token_id", None))
    for value in candidates:
        if value is not None:
            return int(value)
    if classifier:
        raise TokenizerError(
            f"Neither the {role}'s config nor its tokenizer names a padding token, so batches cannot "
            "be padded. Set tokenizer.pad_token (e.g. to the EOS token) or model.config.pad_token_id."
        )
    return 0


def model_device(model) -> torch.device:
    """The device of a model's first parameter."""
    return next(model.parameters()).device


def context_length(model) -> int | None:
    """The longest input the model's position embeddings allow, if its config says."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_context(lengths: Sequence[tuple], model, role: str, max_length) -> None:
    """Raise :class:`DataError` for the first sequence longer than the model's context window.

    ``lengths`` holds ``(where, number of tokens)`` or ``(where, number of tokens, prompt tokens)``
    per sequence, ``where`` naming it for the user. With the prompt length, a prompt that alone
    fills the context gets advice that keeps the response (truncation from the left).
    """
    limit = context_length(model)
    if limit is None:
        return
    name = role if role.endswith("model") else f"{role} model"
    for where, n, *prompt in lengths:
        if n <= limit:
            continue
        if prompt and prompt[0] >= limit:
            raise DataError(
                f"{where}: the prompt alone is {prompt[0]} tokens but the {name} accepts at most {limit} "
                f"(prompt+response is {n}); truncating the end would leave no response. Pass "
                f"max_length={limit} with truncation_mode='keep_end' (cuts the prompt from the left), or "
                "shorten the prompt."
            )
        raise DataError(
            f"{where}: prompt+response is {n} tokens but the {name} accepts at most "
            f"{limit}. Pass max_length={limit} (or less) to truncate" + (" further." if max_length else ".")
        )


def is_local_path(value) -> bool:
    return isinstance(value, (str, os.PathLike)) and Path(value).exists()
