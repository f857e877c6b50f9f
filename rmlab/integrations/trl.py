"""A ``transformers.TrainerCallback`` that records rmlab diagnostics inside a ``trl.DPOTrainer`` run.

On a fixed probe set of preference pairs, at the start of training and every ``every`` optimiser
steps, it records the policy's log-probs, its implicit DPO rewards (Rafailov et al. 2023) against the
run's reference, and the pairs' CHES / LN-CHES under the current policy (Razin et al. 2024,
"Unintentional Unalignment: Likelihood Displacement in Direct Preference Optimization"), so that
likelihood displacement shows up while it happens: ``logps_chosen`` falling while ``margin`` grows.

The probe computations run in eval mode under ``torch.inference_mode`` and consume no random
numbers; the model's train/eval mode is restored afterwards, so training is exactly what it would
be without the callback (``tests/test_trl_callback.py`` compares the losses).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from transformers import TrainerCallback

from rmlab.cache import atomic_write
from rmlab.diagnostics.ches_scores import ches_from_sums, pair_hidden_states
from rmlab.diagnostics.entanglement import gradient_entanglement
from rmlab.diagnostics.pair_frames import pair_columns, response_sums
from rmlab.engine.pairs import PairInputs, check_beta, prepare_pair_inputs, run_logprobs
from rmlab.errors import ArgumentError
from rmlab.io.pairs import load_pairs
from rmlab.options import Options, resolve_options

#: File name of the diagnostics frame, written in the run's output directory.
FILE_NAME = "rmlab_diagnostics.parquet"

#: Columns of :func:`rmlab.gradient_entanglement` recorded with ``entanglement=True``.
_ENTANGLEMENT_COLUMNS = (
    "grad_sq_chosen", "grad_sq_rejected", "grad_inner", "grad_cosine", "chosen_falls", "rejected_rises",
)


def _unwrap(trainer, model):
    accelerator = getattr(trainer, "accelerator", None)
    return accelerator.unwrap_model(model) if accelerator is not None else model


def _is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


class DiagnosticsCallback(TrainerCallback):
    """Record log-probs, implicit rewards and CHES of probe pairs during a ``trl.DPOTrainer`` run.

    Follows Razin et al. 2024 ("Unintentional Unalignment", arXiv 2410.08847) for CHES / LN-CHES
    (see :func:`rmlab.ches`) and Rafailov et al. 2023 (DPO) for the implicit rewards
    ``beta * (log pi(y|x) - log pi_ref(y|x))`` (see :func:`rmlab.implicit_rewards`); pairs are
    tokenised as the trainer does (its ``max_length`` and ``truncation_mode``, which override those of
    ``options``).

    The reference comes from, in order: ``reference=`` given here; the trainer's ``ref_model`` after
    :meth:`attach`; or, for a trainer without one (``precompute_ref_log_probs=True`` with full
    fine-tuning, where TRL's reference *is* the initial policy), the policy itself at step 0. The
    reference log-probs of the probe are computed once at the start of training (every time with
    ``sync_ref_model=True``). A PEFT model without ``ref_model`` is not supported: pass the base model
    as ``reference=``.

    Args:
        probe_pairs: preference pairs to follow (any form :func:`rmlab.load_pairs` accepts); keep the
            set small (tens to a few hundred pairs): it is scored every ``every`` steps.
        every: record every this many optimiser steps (and at the start and the end of training).
        output_dir: folder of ``rmlab_diagnostics.parquet`` (default: the trainer's ``output_dir``).
        beta: DPO's beta for the implicit rewards (default: the trainer's ``args.beta``).
        reference: the reference model, when the callback is not attached to the trainer.
        tokenizer: tokenizer of the probe pairs (default: the trainer's ``processing_class``).
        ches: also record CHES and LN-CHES under the current policy (one more backbone pass).
        entanglement: also record the gradient-entanglement statistics of each probe pair under the
            current policy (:func:`rmlab.gradient_entanglement`: ``grad_sq_chosen``,
            ``grad_sq_rejected``, ``grad_inner``, ``grad_cosine``, ``chosen_falls``,
            ``rejected_rises``; Yuan et al. 2024). Costs two backward passes per probe pair.
        entanglement_params: the parameters those gradients are taken over (``params`` of
            :func:`rmlab.gradient_entanglement`; all trainable parameters by default).
        batch_tokens: padded tokens per forward pass of the probe computations.
        options: the other settings of the probe computations as one :class:`rmlab.Options`
            (``runner``, ``dtype``, ``add_eos``, ``chat_template_kwargs``, ...; ``tokenizer`` and
            ``batch_tokens`` given here override its fields, and the trainer's ``max_length`` and
            ``truncation_mode`` always do).

    Example:
        >>> from rmlab.integrations import DiagnosticsCallback
        >>> callback = DiagnosticsCallback(probe_pairs, every=10).attach(trainer)  # doctest: +SKIP
        >>> trainer.train()  # doctest: +SKIP
        >>> callback.frame.groupby("step")[["logps_chosen", "margin", "ln_ches"]].mean()  # doctest: +SKIP

    Columns of :attr:`frame` (and of the parquet file): ``step``, ``epoch``, ``pair``,
    ``logps_chosen``, ``logps_rejected``, ``ref_logps_chosen``, ``ref_logps_rejected``,
    ``reward_chosen``, ``reward_rejected``, ``margin``, ``ches``, ``ln_ches``, ``tokens_chosen``,
    ``tokens_rejected``, ``truncated``.
    """

    def __init__(
        self,
        probe_pairs,
        *,
        every: int = 50,
        output_dir=None,
        beta: float | None = None,
        reference=None,
        tokenizer=None,
        ches: bool = True,
        entanglement: bool = False,
        entanglement_params=None,
        batch_tokens: int | None = None,
        options: Options | None = None,
    ):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ArgumentError(f"every={every!r} must be an integer >= 1 (record every this many optimiser steps).")
        given = {"tokenizer": tokenizer, "batch_tokens": batch_tokens}
        self.options = resolve_options(
            options, "DiagnosticsCallback", progress=False, **{k: v for k, v in given.items() if v is not None}
        )
        self.beta = check_beta(beta) if beta is not None else None
        self.pairs = load_pairs(probe_pairs)  # bad data fails here, before training starts
        self.every = every
        self.output_dir = output_dir
        self.reference = reference
        self.with_ches = bool(ches)
        self.with_entanglement = bool(entanglement)
        self.entanglement_params = entanglement_params
        self.trainer = None
        self._ref_model = None
        self._beta = self.beta
        self._inputs: PairInputs | None = None
        self._ref: np.ndarray | None = None
        self._rows: list[pd.DataFrame] = []
        self._recorded: set[int] = set()
        self._path: Path | None = None

    # ---- setup
    def attach(self, trainer) -> DiagnosticsCallback:
        """Read the reference model and beta from ``trainer`` and add this callback to it; returns self."""
        self.trainer = trainer
        trainer.add_callback(self)
        return self

    @property
    def frame(self) -> pd.DataFrame:
        """Every row recorded so far (one per probe pair and recorded step)."""
        if not self._rows:
            return pd.DataFrame()
        return pd.concat(self._rows, ignore_index=True)

    @property
    def path(self) -> Path | None:
        """Where the parquet file is written (known once training has begun)."""
        return self._path

    def _resolve_reference(self, args, state, model):
        """``(reference model or None, is_policy)``; raises ArgumentError when none can be had."""
        if self.reference is not None:
            return self.reference, False
        trainer = self.trainer
        if trainer is None:
            raise ArgumentError(
                "DiagnosticsCallback has no reference model: pass reference=<the DPO reference model> when "
                "creating it, or add it with DiagnosticsCallback(...).attach(trainer), which reads "
                "trainer.ref_model."
            )
        ref = getattr(trainer, "ref_model", None)
        if ref is not None:
            return _unwrap(trainer, ref), False
        if _is_peft(model):
            raise ArgumentError(
                "The trainer has no ref_model because the policy is a PEFT model (TRL's reference is the "
                "model with its adapters disabled), which DiagnosticsCallback does not support. Pass the "
                "base model as DiagnosticsCallback(..., reference=base_model)."
            )
        if state.global_step > 0:
            raise ArgumentError(
                f"The trainer has no ref_model (precompute_ref_log_probs=True): its reference is the initial "
                f"policy, but training resumes at step {state.global_step}, when the policy has already changed. "
                "Pass the reference model as DiagnosticsCallback(..., reference=...)."
            )
        return None, True  # the policy before its first update is the reference

    # ---- computations
    def _record(self, args, state, model) -> None:
        if state.global_step in self._recorded or self._inputs is None:
            return
        was_training = model.training
        model.eval()
        try:
            with torch.inference_mode():
                resync = bool(getattr(args, "sync_ref_model", False)) and self._ref_model is not None
                if self._ref is None or resync:
                    ref_model = self._ref_model if self._ref_model is not None else model
                    self._ref = response_sums(run_logprobs(self._inputs, ref_model, "reference", progress=False))
                logps = response_sums(run_logprobs(self._inputs, model, "policy", progress=False))
                if self.with_ches:
                    hidden = pair_hidden_states(self._inputs, model, progress=False)
                    scores, ln_scores = ches_from_sums(
                        hidden.sums[0::2], hidden.sums[1::2], hidden.counts[0::2], hidden.counts[1::2]
                    )
                else:
                    scores = ln_scores = np.full(len(self._inputs.encoded), np.nan)
        finally:
            model.train(was_training)
        entangled = self._entanglement(model) if self.with_entanglement else None
        n = len(self._inputs.encoded)
        beta = self._beta
        frame = pd.DataFrame(
            {
                "step": np.full(n, state.global_step, dtype=np.int64),
                "epoch": np.full(n, float(state.epoch or 0.0)),
                "pair": np.arange(n),
                "logps_chosen": logps[0::2],
                "logps_rejected": logps[1::2],
                "ref_logps_chosen": self._ref[0::2],
                "ref_logps_rejected": self._ref[1::2],
            }
        )
        frame["reward_chosen"] = beta * (frame["logps_chosen"] - frame["ref_logps_chosen"])
        frame["reward_rejected"] = beta * (frame["logps_rejected"] - frame["ref_logps_rejected"])
        frame["margin"] = frame["reward_chosen"] - frame["reward_rejected"]
        frame["ches"] = scores
        frame["ln_ches"] = ln_scores
        if entangled is not None:
            for column in _ENTANGLEMENT_COLUMNS:
                frame[column] = entangled[column].to_numpy()
        self._rows.append(pair_columns(frame, self._inputs, input_columns=False))
        self._recorded.add(state.global_step)
        self._save(state)

    def _entanglement(self, model) -> pd.DataFrame:
        """Gradient statistics of the probe pairs; the trainer's gradients and modes are left as found.

        The recorded columns do not depend on DPO's loss weight, so no reference is needed here.
        """
        saved = [(p, p.grad) for p in model.parameters()]
        was_training = model.training
        try:
            return gradient_entanglement(
                model, self._inputs.pairs, reference=None, params=self.entanglement_params, loss_weight="none",
                method="loop",  # TRL patches the model's forward in ways torch.func cannot trace
                options=self._inputs.options.replace(tokenizer=self._inputs.tokenizer),
            )
        finally:
            for p, grad in saved:
                p.grad = grad
            model.train(was_training)

    def _save(self, state) -> None:
        if self._path is None or not self._rows or not getattr(state, "is_world_process_zero", True):
            return
        self._path.parent.mkdir(parents=True, exist_ok=True)
        frame = self.frame
        atomic_write(self._path, lambda path: frame.to_parquet(path, index=False))

    # ---- TrainerCallback events
    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        beta = self.beta if self.beta is not None else getattr(args, "beta", None)
        if beta is None:
            raise ArgumentError(
                "DiagnosticsCallback needs DPO's beta for the implicit rewards: the trainer's arguments have "
                "none (not a DPOConfig?); pass DiagnosticsCallback(..., beta=0.1)."
            )
        self._beta = check_beta(beta)
        tokenizer = self.options.tokenizer if self.options.tokenizer is not None else processing_class
        if tokenizer is None:
            raise ArgumentError("DiagnosticsCallback needs a tokenizer: pass tokenizer=... (the trainer has no processing_class).")
        policy = _unwrap(self.trainer, model) if self.trainer is not None else model
        reference, _ = self._resolve_reference(args, state, policy)
        self._ref_model = reference
        was_training = policy.training
        try:
            options = self.options.replace(
                tokenizer=tokenizer, max_length=getattr(args, "max_length", None),
                truncation_mode=getattr(args, "truncation_mode", "keep_start"),
            )
            self._inputs = prepare_pair_inputs(policy, reference, self.pairs, options=options)
        finally:
            policy.train(was_training)  # preparing puts the model in eval mode
        out = self.output_dir if self.output_dir is not None else args.output_dir
        self._path = Path(out) / FILE_NAME
        if state.global_step > 0 and self._path.exists():  # a resumed run keeps the rows before its restart
            old = pd.read_parquet(self._path)
            self._rows = [old[old["step"] < state.global_step]]
            self._recorded = set(self._rows[0]["step"].unique().tolist())
        self._ref = None
        self._record(args, state, policy)

    def _policy(self, model):
        return _unwrap(self.trainer, model) if self.trainer is not None else model

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0:
            self._record(args, state, self._policy(model))

    def on_evaluate(self, args, state, control, **kwargs):
        self._save(state)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self._record(args, state, self._policy(model))
        self._save(state)
