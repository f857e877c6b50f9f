"""Rewards on sampled completions: one resolver for every proxy and gold scorer.

The overoptimization analyses (Gao et al. 2022, "Scaling Laws for Reward Model
Overoptimization") put rewards on samples: a best-of-n pool (:func:`rmlab.best_of_n`) or the
samples of policy checkpoints (:func:`rmlab.checkpoint_curve`). A scorer is any of

- the name of a numeric column of the samples;
- an array (or Series) of scores, one per row, in the rows' order;
- a reward model (an ``AutoModelForSequenceClassification`` object, a local path or a hub name
  with '/'), scored on prompt + completion exactly as :func:`rmlab.reward_scores` tokenises
  prompt/completion rows (TRL's ``RewardTrainer``: EOS appended to plain text, the chat template
  for conversations, a string completion of a conversation being the assistant's turn); unlike it,
  an empty completion (a sample that stopped at once) is scored too;
- a callable ``f(completions)``, ``f(prompts, completions)`` or TRL-style
  ``f(prompts=..., completions=..., **kw)`` (read from its signature, or set by ``call_with``);
- an :func:`rmlab.ensemble` of these (Coste et al. 2023).

:class:`SampleScorer` checks every scorer and loads every reward model before any of them runs, so a
bad scorer fails before minutes of sampling or scoring.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd

from rmlab.cache import resolve_cache_dir
from rmlab.diagnostics.ensembles import RewardEnsemble, is_model, spec_name, unwrap
from rmlab.engine.reward_model import RewardInputs, cached_scores
from rmlab.errors import ArgumentError, DataError, ModelError, TokenizerError, closest
from rmlab.io.models import check_context, is_causal_lm, load_reward_model, load_tokenizer, padding_id, reward_label
from rmlab.io.pairs import to_python
from rmlab.io.tokenize import encode_responses
from rmlab.options import Options

#: How a scoring callable is called: read from its signature, or said.
CALL_WITH = ("auto", "completions", "prompts_and_completions")


def call_mode(fn, call_with: str, where: str) -> str:
    """How to call a scoring callable: ``"completions"``, ``"positional"`` or ``"keywords"``.

    ``"keywords"`` is a TRL-style reward function ``f(prompts=..., completions=..., **kwargs)``
    (the reward functions of TRL's GRPO trainer, after Shao et al. 2024, DeepSeekMath); otherwise
    one required positional parameter takes the completions, two take prompts and completions.
    """
    if call_with == "completions":
        return "completions"
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = None
    if params is not None and {"prompts", "completions"} <= set(params):
        return "keywords"
    if call_with == "prompts_and_completions":
        return "positional"
    if params is None:
        raise ArgumentError(
            f"Cannot read the signature of the callable {where}; pass call_with='completions' "
            "(it takes a list of completions) or call_with='prompts_and_completions' (it takes prompts, "
            "completions)."
        )
    positional = [p for p in params.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in positional if p.default is p.empty]
    if len(required) == 1:
        return "completions"
    if len(required) == 2:
        return "positional"
    raise ArgumentError(
        f"The callable {where} takes {len(required)} required positional arguments; a scorer is "
        "callable(prompts: list, completions: list) -> array, or callable(completions: list) -> array. "
        "Say which with call_with='prompts_and_completions' or call_with='completions'."
    )


def show(prompt, width: int = 60) -> str:
    """A prompt (text or conversation) shortened to ``width`` characters, for error messages that
    name the pool (a prompt's samples, Gao et al. 2022) at fault."""
    text = prompt if isinstance(prompt, str) else json.dumps(to_python(prompt), default=str)
    return repr(text if len(text) <= width else text[: width - 3] + "...")


class SampleScorer:
    """Puts scores on completion rows: checks scorers, loads reward models, then scores.

    ``columns`` are the rows' column names, known before the rows exist (a checkpoint curve checks
    its scorers before sampling); :meth:`bind` gives the rows (a frame with those columns) when
    they do. ``options`` says how reward models load, tokenise and run (their ``max_length``,
    ``truncation_mode``, ``add_eos``, ``chat_template_kwargs``, batch budget, runner, device and
    dtype, and the cache of :func:`rmlab.engine.reward_model.cached_scores`); ``tokenizer`` is used
    for every reward model when given, else each model's own, else ``fallback_tokenizer`` (named
    ``tokenizer_arg`` in errors). Scores follow the proxy / gold roles of Gao et al. 2022.
    """

    def __init__(self, columns, *, options: Options, call_with: str = "auto", label=None, tokenizer=None,
                 fallback_tokenizer=None, tokenizer_arg: str = "tokenizer", prompt_column: str = "prompt",
                 completion_column: str = "completion"):
        if call_with not in CALL_WITH:
            raise ArgumentError(f"call_with={call_with!r} must be one of {list(CALL_WITH)}." + closest(call_with, CALL_WITH))
        self.columns = [str(c) for c in columns]
        self.options = options
        self.cache_dir = resolve_cache_dir(options.cache_dir, options.overwrite_cache)
        self.call_with, self.label = call_with, label
        self.tokenizer, self.fallback_tokenizer, self.tokenizer_arg = tokenizer, fallback_tokenizer, tokenizer_arg
        self.prompt_column, self.completion_column = prompt_column, completion_column
        self.frame: pd.DataFrame | None = None
        self.needs_texts = False
        self._pending: list[tuple[str, object]] = []  # reward models to load
        self._models: dict[int, tuple] = {}  # id(spec) -> (model, tokenizer, label, role)
        self._encoded: dict[int, tuple] = {}  # id(spec) -> (rows, sequences) of the bound rows
        self._scores: dict[int, np.ndarray] = {}

    # checks -------------------------------------------------------------------------------------
    def check(self, spec, where: str) -> None:
        """Validate a scorer (recursively for ensembles) without running it."""
        spec = unwrap(spec)
        if isinstance(spec, RewardEnsemble):
            for k, member in enumerate(spec.members):
                self.check(member, f"{where}, ensemble member {k} ({spec_name(member, k)})")
            return
        if isinstance(spec, (list, tuple)):
            raise ArgumentError(
                f"{where} got a {type(spec).__name__}; pass one scorer, or combine several into one with "
                "rmlab.ensemble([...]) or a callable that combines them (e.g. their mean or minimum)."
            )
        if isinstance(spec, str) and spec in self.columns:
            if self.frame is not None:
                self._column(spec, where)
            return
        if isinstance(spec, (str, os.PathLike)):
            text = os.fspath(spec)
            if isinstance(spec, str) and not (os.path.exists(text) or "/" in text or "\\" in text):
                numeric = self.columns if self.frame is None else [
                    c for c in self.columns if pd.api.types.is_numeric_dtype(self.frame[c])
                ]
                raise DataError(
                    f"{where}: the samples have no column {spec!r}; their numeric columns are {numeric}."
                    + closest(spec, numeric)
                    + " To score with a reward model, pass the model or its path (a name with '/')."
                )
            if text.startswith((".", "/", "~")) and not Path(text).expanduser().exists():
                raise DataError(
                    f"{where}={text!r} is neither a column of the samples ({', '.join(self.columns)}) nor an "
                    "existing reward-model folder."
                )
            return self._reward_model(spec, where)
        if isinstance(spec, (np.ndarray, pd.Series)):
            if self.frame is not None:
                self._array(spec, where)
            return
        if is_model(spec):
            if is_causal_lm(spec):
                raise ModelError(
                    f"{where} is a causal LM ({type(spec).__name__}), not a reward model: pass a sequence "
                    "classifier, a callable on completions, or a column name."
                )
            return self._reward_model(spec, where)
        if callable(spec):
            call_mode(spec, self.call_with, where)
            self.needs_texts = True
            return
        raise ArgumentError(
            f"{where}: cannot score with {spec!r} (a {type(spec).__name__}). Pass a column name, a reward model "
            "(or its path), a callable(prompts, completions) -> scores, an array of scores, or rmlab.ensemble(...)."
        )

    def _reward_model(self, spec, where: str) -> None:
        """Note a reward model to load before anything scores; it reads the rows' texts."""
        self._pending.append((where, spec))
        self.needs_texts = True

    def check_texts(self) -> None:
        """Models and callables read prompts and completions: check those columns (cheaply)."""
        if not self.needs_texts or self.frame is None:
            return
        if self.completion_column not in self.frame.columns:
            raise DataError(
                f"Scoring with a reward model or callable needs the completions, but the samples have no "
                f"column {self.completion_column!r} (columns: {list(self.frame.columns)})."
                + closest(self.completion_column, self.frame.columns)
                + " Pass completion_column= to name it."
            )
        column = self.frame[self.completion_column]
        bad = [i for i, v in enumerate(column) if not isinstance(v, (str, list, np.ndarray))]
        if bad:
            raise DataError(
                f"Row {bad[0]} of column {self.completion_column!r} is a {type(column.iloc[bad[0]]).__name__}"
                f" ({len(bad)} such rows); completions must be strings (or chat messages)."
            )

    def load_models(self) -> None:
        """Load and check every reward model of the checked scorers, with its tokenizer (and, with
        rows bound, tokenise them for it), before any scorer runs."""
        for where, spec in self._pending:
            if id(spec) in self._models:
                continue
            role = f"{where} reward model"
            model = load_reward_model(spec, role=role, **self.options.loading)
            try:
                label = reward_label(model, self.label)
            except ModelError as err:
                raise ModelError(f"{err} (For the {where}, wrap the model in a callable that returns that output.)") from None
            tok = self.tokenizer
            if tok is None:
                try:
                    tok = load_tokenizer(None, spec, role=role, trust_remote_code=self.options.trust_remote_code)
                except TokenizerError:
                    tok = self.fallback_tokenizer  # e.g. a reward model built on the policy: its tokenizer
            if tok is None:
                raise TokenizerError(f"No tokenizer for the {role}: pass {self.tokenizer_arg}=... .")
            rows = model.get_input_embeddings().weight.shape[0]
            if len(tok) > rows:
                raise TokenizerError(
                    f"The tokenizer used for the {role} has {len(tok)} tokens but the model's embedding only "
                    f"{rows}: pass {self.tokenizer_arg}=<the tokenizer it was trained with>."
                )
            self._models[id(spec)] = (model, tok, label, role)
            if self.frame is not None:
                self._encode(spec)
        self._pending = []

    # rows ---------------------------------------------------------------------------------------
    def bind(self, frame: pd.DataFrame) -> SampleScorer:
        """Score the rows of ``frame`` from now on (its columns include :attr:`columns`)."""
        self.frame = frame
        self.columns = [str(c) for c in frame.columns]
        self._encoded, self._scores = {}, {}
        return self

    def texts(self) -> tuple[list, list, str]:
        """``(prompts, completions, format)`` of the bound rows, as plain Python values."""
        prompts = [to_python(v) for v in self.frame[self.prompt_column]]
        completions = [to_python(v) for v in self.frame[self.completion_column]]
        chat = bool(prompts) and (isinstance(prompts[0], list) or isinstance(completions[0], list))
        if chat:
            prompts = [[] if p == "" else p for p in prompts]
        return prompts, completions, "chat" if chat else "text"

    def _encode(self, spec) -> tuple[pd.DataFrame, list]:
        """The bound rows as a reward model reads them, and their token ids (checked to fit)."""
        model, tok, _, role = self._models[id(spec)]
        if id(spec) not in self._encoded:
            prompts, completions, fmt = self.texts()
            if fmt == "chat":
                completions = [[{"role": "assistant", "content": c}] if isinstance(c, str) else c for c in completions]
            rows = pd.DataFrame({"prompt": prompts, "response": completions})
            rows.attrs["format"] = fmt
            seqs = encode_responses(rows, tok, **self.options.tokenizing)
            check_context([(f"Row {i}", len(s.ids), s.start) for i, s in enumerate(seqs)], model, role,
                          self.options.max_length)
            self._encoded[id(spec)] = (rows, seqs)
        return self._encoded[id(spec)]

    def _column(self, name: str, where: str) -> np.ndarray:
        column = self.frame[name]
        if not pd.api.types.is_numeric_dtype(column) or pd.api.types.is_bool_dtype(column):
            raise DataError(f"Column {name!r} ({where}) holds {column.dtype} values; scores must be numbers.")
        return column.to_numpy(dtype=np.float64)

    def _array(self, values, where: str) -> np.ndarray:
        if len(values) != len(self.frame):
            raise DataError(
                f"{where}: an array of {len(values)} scores for {len(self.frame)} samples; pass one "
                "score per row, in the rows' order."
            )
        return np.asarray(values, dtype=np.float64).reshape(-1)

    # scoring ------------------------------------------------------------------------------------
    def scores(self, spec, where: str) -> np.ndarray:
        """One finite float64 score per bound row."""
        spec = unwrap(spec)
        key = id(spec)
        if key in self._scores:
            return self._scores[key]
        if isinstance(spec, RewardEnsemble):
            out = spec.combine(np.column_stack(
                [self.scores(m, f"{where}, ensemble member {k}") for k, m in enumerate(spec.members)]
            ))
        elif isinstance(spec, str) and spec in self.frame.columns:
            out = self._column(spec, where)
        elif isinstance(spec, (np.ndarray, pd.Series)):
            out = self._array(spec, where)
        elif key in self._models:
            out = self._model_scores(spec, where)
        else:
            out = self._callable_scores(spec, where)
        bad = np.flatnonzero(~np.isfinite(out))
        if len(bad):
            prompt = self.frame[self.prompt_column].iloc[bad[0]]
            raise DataError(
                f"{where} has {len(bad)} non-finite score(s) (NaN or inf), first at row {bad[0]} "
                f"(prompt {show(prompt)}). Drop those samples or fix their scores: they cannot be ranked or averaged."
            )
        self._scores[key] = out
        return out

    def _model_scores(self, spec, where: str) -> np.ndarray:
        model, tok, label, role = self._models[id(spec)]
        rows, seqs = self._encode(spec)
        inputs = RewardInputs(
            kind="responses", frame=rows, sequences=seqs, model=model, tokenizer=tok, label=label,
            pad_id=padding_id(tok, model, role=role), options=self.options,
        )
        if self.cache_dir is not None:
            return cached_scores(inputs, self.cache_dir, overwrite=self.options.overwrite_cache,
                                 progress=self.options.progress)
        return inputs.runner.scores(
            model, [s.ids for s in seqs], pad_id=inputs.pad_id, label=label, batch_tokens=inputs.batch_tokens,
            autocast_dtype=inputs.autocast_dtype, progress=self.options.progress, desc=f"{where} scores",
        )

    def _callable_scores(self, spec, where: str) -> np.ndarray:
        prompts, completions, _ = self.texts()
        mode = call_mode(spec, self.call_with, where)
        if mode == "completions":
            raw = spec(completions)
        elif mode == "keywords":
            raw = spec(prompts=prompts, completions=completions)
        else:
            raw = spec(prompts, completions)
        try:
            out = np.asarray(raw, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError) as err:
            raise DataError(f"The callable {where} returned values that are not numbers ({err}).") from None
        if len(out) != len(self.frame):
            raise DataError(
                f"The callable {where} returned {len(out)} scores for {len(self.frame)} completions; it "
                "must return one score per completion, in order."
            )
        return out
