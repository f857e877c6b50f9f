"""Track a short DPO run: likelihood displacement per pair, step by step (Razin et al. 2024).

Follows Razin et al. 2024, "Unintentional Unalignment: Likelihood Displacement in Direct Preference
Optimization" (arXiv 2410.08847): :func:`track_dpo` runs a short DPO fine-tune (Rafailov et al. 2023)
on a copy of a policy and records, per pair and step, the log-probs and implicit rewards
(:class:`~rmlab.diagnostics.displacement_run.DisplacementRun`), then where the displaced probability
mass went (:mod:`rmlab.diagnostics.displaced_mass`). With ``save_dir`` it resumes where it stopped
(:mod:`rmlab.diagnostics.dpo_run_store`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from rmlab.diagnostics.displaced_mass import displaced_mass
from rmlab.diagnostics.displacement_run import DisplacementRun, trajectory_rows
from rmlab.diagnostics.dpo_run_store import RunFolder, check_save_dir, run_fingerprint
from rmlab.diagnostics.pair_frames import pair_columns, response_sums
from rmlab.diagnostics.pair_gradients import check_lr, pair_reference
from rmlab.engine.batching import batch_budget, length_batches
from rmlab.engine.logprobs import logprobs_with_grad
from rmlab.engine.pairs import check_beta, prepare_pair_inputs, run_logprobs
from rmlab.engine.precision import autocast
from rmlab.errors import ArgumentError, check_choice
from rmlab.io.models import model_device
from rmlab.options import LOADING, RUNNING, TOKENIZING, Options, with_options

#: Optimisers of a tracked run.
OPTIMIZERS = ("sgd", "adam")


def check_int(name: str, value, minimum: int, hint: str) -> int:
    """``value`` as an int, or :class:`ArgumentError` unless it is an integer >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ArgumentError(f"{name}={value!r} must be an integer >= {minimum}{hint}")
    return int(value)


def check_optimizer(optimizer) -> str:
    """``optimizer`` in lower case, or :class:`ArgumentError` unless it names one of :data:`OPTIMIZERS`."""
    if not isinstance(optimizer, str):
        raise ArgumentError(f"optimizer={optimizer!r} must be one of {list(OPTIMIZERS)}.")
    check_choice("optimizer", optimizer.lower(), OPTIMIZERS)
    return optimizer.lower()



def batch_indices(seed: int, step: int, n: int, batch_size: int | None) -> np.ndarray:
    """The pairs of update ``step``: all of them, or the step's slice of seeded per-epoch permutations.

    A pure function of ``(seed, step)``: a resumed run draws exactly the batches an uninterrupted one
    would, without any global random state.
    """
    if batch_size is None or batch_size >= n:
        return np.arange(n)
    epoch, offset = divmod(step * batch_size, n)
    out: list[int] = []
    while len(out) < batch_size:
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        out.extend(perm[offset : offset + batch_size - len(out)].tolist())
        epoch, offset = epoch + 1, 0
    return np.asarray(out)



def fresh_copy(model):
    """A deep copy that trains independently of ``model`` (instance-level forward patches dropped)."""
    twin = copy.deepcopy(model)
    # e.g. TRL's add_fused_lm_head sets an instance `forward` closing over the *original* model's forward
    twin.__dict__.pop("forward", None)
    return twin.eval()


@with_options(*TOKENIZING, *RUNNING, *LOADING)
def track_dpo(
    policy,
    reference,
    data,
    *,
    steps: int,
    lr: float,
    beta: float = 0.1,
    optimizer: str = "sgd",
    batch_size: int | None = None,
    seed: int = 0,
    max_grad_norm: float | None = None,
    probe=None,
    top_k: int = 5,
    save_dir=None,
    checkpoint_every: int = 1,
    on_step: Callable[[int, pd.DataFrame], None] | None = None,
    options: Options,
) -> DisplacementRun:
    """Run a short DPO fine-tune on a copy of ``policy`` and record likelihood displacement per pair.

    Follows Razin et al. 2024 ("Unintentional Unalignment: Likelihood Displacement in Direct
    Preference Optimization", arXiv 2410.08847): DPO (Rafailov et al. 2023) can lower the likelihood
    of the preferred response while it widens the margin. Each update minimises the mean over the
    step's pairs of ``-log sigmoid(beta * [(lp_w - ref_w) - (lp_l - ref_l)])`` (summed response
    log-probs, tokenised as TRL's ``DPOTrainer``; reference log-probs computed once with the engine,
    exactly as :func:`rmlab.implicit_rewards`). The copy runs in eval mode (dropout off, as TRL's
    ``disable_dropout=True`` default), so every step is deterministic; gradients of large batches are
    accumulated over length-bucketed micro-batches under ``batch_tokens`` (the same mean).

    Before the first update (step 0) and after every update, every tracked pair's log-probs and
    implicit rewards are recorded. At the end, :attr:`DisplacementRun.mass` shows where the mass went:
    at the first position where chosen and rejected differ (a context both share: the paper's
    single-token setting, Section 4), the tokens whose probability rose most, with their
    ``<W_z, W_{y_w} - W_{y_l}>``.

    With ``save_dir``, each step's rows are written at once (``trajectories/step-NNNNNN.parquet``) and
    a checkpoint (the copy's weights, the optimizer state, the step and the batch sampler's position)
    every ``checkpoint_every`` steps and at the end. Calling again with the same arguments, data,
    models and ``save_dir`` resumes from the last checkpoint and gives the same result as an
    uninterrupted run (batches are a pure function of ``(seed, step)``); ``steps`` may grow between
    calls. A different configuration in the same folder is an :class:`ArgumentError`; an interrupt
    (KeyboardInterrupt, or an exception from ``on_step``) keeps everything saved so far.

    Args:
        policy: the model DPO starts from (``PreTrainedModel`` or hub name / local path, or an
            :class:`rmlab.ModelPair` with its reference); never changed.
        reference: the reference model (usually the same SFT model); required (a ``ModelPair``'s own
            by default).
        data: the preference pairs to train on (any form :func:`rmlab.load_pairs` accepts).
        steps: number of optimiser updates (>= 1).
        lr: learning rate (>= 0; 0 leaves the model unchanged).
        beta: DPO's KL coefficient (> 0).
        optimizer: ``"sgd"`` (plain gradient descent, the paper's theoretical setting) or ``"adam"``
            (``torch.optim.Adam``, default betas, no weight decay).
        batch_size: pairs per update; None (default) uses every pair every step (full batch).
        seed: seed of the mini-batch order (ignored with full batches).
        max_grad_norm: clip the gradient to this norm (None: no clipping; TRL clips at 1.0).
        probe: pairs to record instead of ``data`` (e.g. held-out pairs); default: the training pairs.
        top_k: tokens per pair in :attr:`DisplacementRun.mass` (besides the chosen and rejected ones).
        save_dir: folder to save progress in and to resume from.
        checkpoint_every: write the (large) checkpoint every this many steps (rows are written every step).
        on_step: ``on_step(step, rows)`` after each update's rows are recorded (and saved); raising
            in it stops the run with everything so far saved.
        tokenizer, max_length, truncation_mode, add_eos, chat_template_kwargs, batch_tokens, progress,
            device, dtype, trust_remote_code, revision, use_safetensors, runner: as in
            :func:`rmlab.implicit_rewards` (see :class:`rmlab.Options`).
        options: all of those as one :class:`rmlab.Options` (flat keywords override its fields).

    Returns:
        A :class:`DisplacementRun` with ``.trajectories`` (one row per step and pair), ``.mass``,
        ``.summary`` (one row per pair, ``displaced`` = chosen log-prob fell), ``.pairs`` and ``.model``.

    Example:
        >>> import rmlab
        >>> from rmlab.toy import tiny_causal_lm, tiny_tokenizer
        >>> pairs = [{"prompt": "Review:", "chosen": " great film", "rejected": " dull film"}]
        >>> sft = tiny_causal_lm("gpt2")
        >>> run = rmlab.track_dpo(sft, sft, pairs, steps=2, lr=1e-2, tokenizer=tiny_tokenizer(), progress=False)
        >>> sorted(run.trajectories["step"].unique().tolist())
        [0, 1, 2]
    """
    # ---- arguments, before anything heavy
    reference = pair_reference(policy, reference)
    if reference is None:
        raise ArgumentError(
            "reference=None: DPO's loss and implicit rewards are log-ratios to a reference model. Pass the "
            "reference (usually the SFT model the policy starts from; passing the same model as policy and "
            "reference is fine, the policy is copied before training)."
        )
    steps = check_int("steps", steps, 1, " (the number of DPO updates, e.g. 20).")
    lr = check_lr(
        lr, allow_zero=True, hint="e.g. 1e-3 for adam on the toy world; 0 records the trajectory of an unchanged model"
    )
    beta = check_beta(beta)
    optimizer = check_optimizer(optimizer)
    if batch_size is not None:
        batch_size = check_int("batch_size", batch_size, 1, " (pairs per update), or None for full batches.")
    seed = check_int("seed", seed, 0, ".")
    top_k = check_int("top_k", top_k, 0, " (tokens per pair in .mass).")
    checkpoint_every = check_int("checkpoint_every", checkpoint_every, 1, ".")
    if max_grad_norm is not None:
        try:
            ok = float(max_grad_norm) > 0 and math.isfinite(float(max_grad_norm))
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ArgumentError(f"max_grad_norm={max_grad_norm!r} must be a number > 0, or None for no clipping.")
        max_grad_norm = float(max_grad_norm)
    if on_step is not None and not callable(on_step):
        raise ArgumentError(f"on_step={on_step!r} must be a callable on_step(step, rows) or None.")
    check_save_dir(save_dir)
    progress = options.progress

    inputs = prepare_pair_inputs(policy, reference, data, options=options)
    n = len(inputs.encoded)
    if batch_size is not None and batch_size > n:
        raise ArgumentError(f"batch_size={batch_size} is larger than the {n} pairs given; pass at most {n}, or None.")
    tracked = inputs
    if probe is not None:
        tracked = prepare_pair_inputs(
            inputs.policy, inputs.reference, probe, options=options.replace(tokenizer=inputs.tokenizer)
        )
    if not any(p.requires_grad for p in inputs.policy.parameters()):
        raise ArgumentError("The policy has no parameter with requires_grad=True: there is nothing to train.")

    config = dict(
        beta=beta, lr=lr, optimizer=optimizer, batch_size=batch_size, seed=seed, max_grad_norm=max_grad_norm,
        max_length=options.max_length, truncation_mode=options.truncation_mode, add_eos=options.add_eos,
        batch_tokens=options.batch_tokens, chat_template_kwargs=repr(options.chat_template_kwargs),
    )
    store = None
    if save_dir is not None:
        store = RunFolder(save_dir, run_fingerprint(config, inputs, tracked if probe is not None else None))
        store.check()
    device_ = model_device(inputs.policy)
    state, saved_rows = store.load(device_) if store is not None else (None, [])
    if state is not None and state["step"] > steps:
        raise ArgumentError(
            f"save_dir={str(save_dir)!r} already holds {state['step']} steps of this run; ask for steps >= "
            f"{state['step']} (the saved run is then continued or returned), or use another save_dir."
        )

    # ---- the copy, its optimiser, the reference log-probs (once)
    model = fresh_copy(inputs.policy)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr) if optimizer == "sgd" else torch.optim.Adam(params, lr=lr)
    done = 0
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        done = int(state["step"])
    ref_train = response_sums(run_logprobs(inputs, inputs.reference, "reference", progress=progress))
    ref_tracked = ref_train if tracked is inputs else response_sums(
        run_logprobs(tracked, tracked.reference, "reference (probe)", progress=progress)
    )
    ref_loss = torch.as_tensor(np.nan_to_num(ref_train, nan=0.0), dtype=torch.float32).view(-1, 2).to(device_)
    autocast_dtype = inputs.autocast_dtype(model)
    budget = batch_budget(inputs.batch_tokens, device_)

    def record(step: int) -> pd.DataFrame:
        logps = tracked.runner.logprobs(
            model, tracked.sequences, groups=[[2 * i, 2 * i + 1] for i in range(len(tracked.encoded))],
            batch_tokens=tracked.batch_tokens, pad_id=tracked.pad_id, autocast_dtype=autocast_dtype,
            progress=False, desc="policy log-probs",
        )
        return trajectory_rows(step, logps, ref_tracked, beta)

    def update(step: int) -> None:
        idx = batch_indices(seed, step, n, batch_size)
        opt.zero_grad(set_to_none=True)
        lengths = [max(len(inputs.encoded[i].chosen.ids), len(inputs.encoded[i].rejected.ids)) for i in idx]
        precision = autocast(device_, autocast_dtype)
        for micro in length_batches(lengths, budget, width=2):
            members = [int(idx[j]) for j in micro]
            seqs = [s for i in members for s in (inputs.encoded[i].chosen, inputs.encoded[i].rejected)]
            with precision:
                logps = logprobs_with_grad(model, seqs, pad_id=inputs.pad_id)
            sums = torch.stack([t.sum() for t in logps]).float().view(-1, 2)
            ratio = sums - ref_loss[torch.as_tensor(members, device=device_)]
            loss = -F.logsigmoid(beta * (ratio[:, 0] - ratio[:, 1])).sum() / len(idx)
            loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sampler() -> dict:
        return {"seed": seed, "batch_size": batch_size, "next_step": done}

    rows = list(saved_rows)
    if state is None:
        rows = [record(0)]
        if store is not None:
            store.start()
            store.save_rows(0, rows[0])
            store.save_checkpoint(0, model, opt, sampler())
    bar = tqdm(total=steps, initial=done, desc="DPO steps", unit="step", disable=not progress, leave=False)
    try:
        while done < steps:
            update(done)
            done += 1
            rows.append(record(done))
            if store is not None:
                store.save_rows(done, rows[-1])
                if done % checkpoint_every == 0 or done == steps:
                    store.save_checkpoint(done, model, opt, sampler())
            bar.update(1)
            if on_step is not None:
                on_step(done, rows[-1])
    except KeyboardInterrupt:
        where = (
            f"the run up to the last checkpoint is saved in {str(save_dir)!r}; call track_dpo again with the "
            "same arguments to resume" if store is not None
            else "pass save_dir= to keep a run's progress across interrupts"
        )
        raise KeyboardInterrupt(f"track_dpo interrupted at step {done} of {steps}: {where}.") from None
    finally:
        bar.close()

    trajectories = pd.concat(rows[: steps + 1], ignore_index=True)
    model.eval()
    mass = displaced_mass(tracked, inputs.policy, model, top_k)
    if store is not None:
        store.save_mass(mass)
    trajectories.attrs.update(beta=beta, lr=lr, optimizer=optimizer)
    return DisplacementRun(
        trajectories=trajectories,
        mass=mass,
        pairs=pair_columns(pd.DataFrame({"pair": np.arange(len(tracked.encoded))}), tracked),
        model=model,
        config=dict(config, steps=steps, top_k=top_k, probe=probe is not None),
    )
