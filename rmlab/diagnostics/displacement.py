"""Likelihood displacement: when DPO lowers the probability of the preferred response.

Follows Razin et al. 2024, "Unintentional Unalignment: Likelihood Displacement in Direct Preference
Optimization" (arXiv 2410.08847; official code princeton-nlp/unintentional-unalignment):

- :func:`ches` scores each pair by its *centered hidden embedding similarity* (Definition 2). With
  ``h_{x,z}`` the last hidden state (the unembedding's input) after prompt ``x`` and tokens ``z``, and
  ``H(y) = sum_{k=1..|y|} h_{x, y_<k}`` over the hidden states that predict the response tokens (from
  the last prompt token on, EOS included when the response carries one)::

      CHES    = <H(y_w), H(y_l)> - |H(y_w)|^2
      LN-CHES = <H(y_w), H(y_l)> / (|y_w| |y_l|) - |H(y_w)|^2 / |y_w|^2

  High CHES predicts that DPO on the pair lowers ``log pi(y_w|x)``; the paper filters training data
  by LN-CHES (Section 6). The official ``ches/ches.py`` and
  ``compute_preference_similarity_per_example.py`` compute exactly these sums (hidden states from the
  last prompt position to the one that predicts the response's last token, ``hidden_states[-1]``).
- :func:`track_dpo` runs a short DPO fine-tune on a copy of a policy and records, per pair and step,
  the log-probs and implicit rewards, then where the displaced probability mass went: the tokens
  whose next-token probability rose most at the position where the chosen and rejected responses
  first differ (Section 4's single-token picture: with a shared context, the logit of token ``z``
  moves with ``<W_z, W_{y_w} - W_{y_l}>``, reported as ``alignment``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from rmlab.engine.batching import batch_budget, length_batches
from rmlab.engine.hidden import next_token_logprobs, response_hidden_states
from rmlab.engine.logprobs import logprobs_with_grad, token_logprobs
from rmlab.engine.pairs import PairInputs, check_beta, prepare_pair_inputs, run_logprobs
from rmlab.engine.precision import autocast
from rmlab.errors import ArgumentError, DataError, check_choice, closest
from rmlab.io.models import model_device
from rmlab.io.tokenize import decode_tokens

_SIDES = ("chosen", "rejected")
_EXTRA = ("chat_template_kwargs", "trust_remote_code")
_OPTIMIZERS = ("sgd", "adam")
_FORMAT_VERSION = 1


def _check_extra(kwargs: dict, where: str) -> None:
    for name in kwargs:
        if name not in _EXTRA:
            raise ArgumentError(
                f"{where} got an unexpected keyword argument {name!r}; besides its named arguments it accepts "
                f"{list(_EXTRA)}.{closest(name, _EXTRA)}"
            )


# --------------------------------------------------------------------------------------------------
# CHES
# --------------------------------------------------------------------------------------------------
def ches_from_sums(sum_chosen, sum_rejected, n_chosen, n_rejected) -> tuple[np.ndarray, np.ndarray]:
    """CHES and LN-CHES from summed hidden states (Razin et al. 2024, Definition 2 and Section 6).

    Args:
        sum_chosen, sum_rejected: ``(N, d)`` arrays ``H(y_w)``, ``H(y_l)``.
        n_chosen, n_rejected: ``(N,)`` response lengths ``|y_w|``, ``|y_l|`` (hidden states summed).

    Returns:
        ``(ches, ln_ches)`` as float64 arrays; NaN where a response has no token (the official code
        skips such pairs).

    The sums are taken in float64 and each score is computed in its centred form,
    ``CHES = <H(y_w), H(y_l) - H(y_w)>`` and
    ``LN-CHES = <H(y_w), H(y_l) |y_w|/|y_l| - H(y_w)> / |y_w|^2`` (the same quantities): the two inner products of the definition are large and nearly equal when
    the responses' hidden states share a large common component, and subtracting them would cancel
    most of their digits.
    """
    w = np.asarray(sum_chosen, dtype=np.float64)
    lo = np.asarray(sum_rejected, dtype=np.float64)
    nw = np.asarray(n_chosen, dtype=np.float64)
    nl = np.asarray(n_rejected, dtype=np.float64)
    valid = (nw > 0) & (nl > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        scores = (w * (lo - w)).sum(axis=1)
        ln_scores = (w * (lo * (nw / nl)[:, None] - w)).sum(axis=1) / nw**2
        ches = np.where(valid, scores, np.nan)
        ln_ches = np.where(valid, ln_scores, np.nan)
    return ches, ln_ches


def ches(
    policy,
    data,
    *,
    tokenizer=None,
    max_length: int | None = None,
    truncation_mode: str = "keep_start",
    add_eos: bool = True,
    batch_tokens: int | None = None,
    device="auto",
    dtype="auto",
    progress: bool = True,
    **kwargs,
) -> pd.DataFrame:
    """Centered hidden embedding similarity (CHES) of every preference pair under a policy.

    Follows Razin et al. 2024 ("Unintentional Unalignment: Likelihood Displacement in Direct
    Preference Optimization", arXiv 2410.08847), Definition 2 and the official implementation:
    ``CHES = <H(y_w), H(y_l)> - |H(y_w)|^2`` and the length-normalised
    ``LN-CHES = <H(y_w), H(y_l)>/(|y_w||y_l|) - |H(y_w)|^2/|y_w|^2``, where ``H(y)`` sums the last
    hidden states (the unembedding's input, after the final norm) that predict each response token,
    from the last prompt token on; the EOS token TRL appends to text responses counts as a response
    token. Pairs with a high score are the ones whose chosen log-prob DPO tends to lower; the paper
    filters data by LN-CHES, so ``rank`` orders pairs by it.

    Tokenisation is TRL's ``DPOTrainer``'s (as :func:`rmlab.implicit_rewards`); chosen and rejected of
    a pair share one forward pass; only the backbone runs.

    Args:
        policy: the model whose hidden states are used (usually the model DPO starts from): a
            ``PreTrainedModel`` or a hub name / local path.
        data: preference pairs (DataFrame, records, ``datasets.Dataset``, or a .jsonl/.json/.parquet/
            .csv path) with ``prompt``, ``chosen``, ``rejected`` as text or chat messages.
        tokenizer, max_length, truncation_mode, add_eos, batch_tokens, device, dtype, progress: as in
            :func:`rmlab.implicit_rewards`.
        **kwargs: ``chat_template_kwargs``, ``trust_remote_code``.

    Returns:
        One row per pair: ``pair``, ``ches``, ``ln_ches``, ``rank`` (1 = highest LN-CHES, the pair
        most at risk of likelihood displacement; missing for a response truncated to nothing, whose
        scores are NaN), ``tokens_chosen``, ``tokens_rejected`` (``|y_w|``, ``|y_l|``), ``truncated``,
        then the input columns.

    Example:
        >>> import rmlab
        >>> from rmlab.toy import tiny_causal_lm, tiny_tokenizer
        >>> pairs = [{"prompt": "Review:", "chosen": " great film", "rejected": " dull film"}]
        >>> frame = rmlab.ches(tiny_causal_lm("gpt2"), pairs, tokenizer=tiny_tokenizer(), progress=False)
        >>> list(frame.columns[:4])
        ['pair', 'ches', 'ln_ches', 'rank']
    """
    _check_extra(kwargs, "ches")
    inputs = prepare_pair_inputs(
        policy, None, data, tokenizer=tokenizer, max_length=max_length, truncation_mode=truncation_mode,
        add_eos=add_eos, batch_tokens=batch_tokens, device=device, dtype=dtype, **kwargs,
    )
    hidden = _pair_hidden(inputs, inputs.policy, progress=progress)
    scores, ln_scores = ches_from_sums(hidden.sums[0::2], hidden.sums[1::2], hidden.counts[0::2], hidden.counts[1::2])
    frame = pd.DataFrame(
        {
            "pair": np.arange(len(inputs.encoded)),
            "ches": scores,
            "ln_ches": ln_scores,
        }
    )
    frame["rank"] = frame["ln_ches"].rank(ascending=False, method="first", na_option="keep").astype("Int64")
    frame["tokens_chosen"] = hidden.counts[0::2]
    frame["tokens_rejected"] = hidden.counts[1::2]
    frame["truncated"] = [p.truncated for p in inputs.encoded]
    frame = pd.concat([frame, inputs.pairs.reset_index(drop=True)], axis=1)
    frame.attrs.update(measure="ches", format=inputs.pairs.attrs.get("format"))
    return frame


def _pair_hidden(inputs: PairInputs, model, *, progress: bool):
    return response_hidden_states(
        model,
        inputs.sequences,
        groups=[[2 * i, 2 * i + 1] for i in range(len(inputs.encoded))],
        batch_tokens=inputs.batch_tokens,
        pad_id=inputs.pad_id,
        autocast_dtype=inputs.autocast_dtype(model),
        progress=progress,
        desc="policy hidden states",
    )


# --------------------------------------------------------------------------------------------------
# track_dpo: argument checks, fingerprint, save folder
# --------------------------------------------------------------------------------------------------
def _check_int(name: str, value, minimum: int, hint: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ArgumentError(f"{name}={value!r} must be an integer >= {minimum}{hint}")
    return int(value)


def _check_lr(lr) -> float:
    try:
        value = float(lr)
    except (TypeError, ValueError):
        value = float("nan")
    if isinstance(lr, bool) or not math.isfinite(value) or value < 0:
        raise ArgumentError(
            f"lr={lr!r} must be a finite learning rate >= 0 (e.g. 1e-3 for adam on the toy world; "
            "0 records the trajectory of an unchanged model)."
        )
    return value


def _check_optimizer(optimizer) -> str:
    if not isinstance(optimizer, str):
        raise ArgumentError(f"optimizer={optimizer!r} must be one of {list(_OPTIMIZERS)}.")
    check_choice("optimizer", optimizer.lower(), _OPTIMIZERS)
    return optimizer.lower()


def _sha(payload) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _encoded_digest(inputs: PairInputs) -> str:
    return _sha([[list(s.ids), s.start] for s in inputs.sequences])


def _model_digest(model) -> str:
    """A cheap, exact-enough digest of a model's weights: per tensor name, shape, dtype and three sums."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            h.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
            if tensor.numel() and not tensor.dtype.is_complex:
                flat = tensor.detach().flatten().double()
                ramp = torch.linspace(-1.0, 1.0, flat.numel(), dtype=torch.float64, device=flat.device)
                stats = (flat.sum(), flat.abs().sum(), (flat * ramp).sum())
                h.update(("|".join(f"{float(s):.12e}" for s in stats)).encode())
    return h.hexdigest()


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(str(tmp))
    os.replace(tmp, path)


def _step_file(folder: Path, step: int) -> Path:
    return folder / f"step-{step:06d}.parquet"


class _SaveDir:
    """``save_dir``: fingerprint.json, trajectories/step-NNNNNN.parquet, checkpoint.pt, mass.parquet."""

    def __init__(self, path, fingerprint: dict):
        self.path = Path(path)
        self.fingerprint = fingerprint
        if self.path.exists() and not self.path.is_dir():
            raise ArgumentError(f"save_dir={str(path)!r} is a file; pass a folder (it is created if missing).")
        self.rows = self.path / "trajectories"
        self.ckpt = self.path / "checkpoint.pt"
        self.meta = self.path / "fingerprint.json"

    def check(self) -> None:
        """Raise :class:`ArgumentError` if the folder holds a run with another configuration."""
        if not self.meta.exists():
            return
        saved = json.loads(self.meta.read_text())
        if saved == self.fingerprint:
            return
        changed = []
        for key in sorted(set(saved) | set(self.fingerprint)):
            a, b = saved.get(key), self.fingerprint.get(key)
            if isinstance(a, dict) and isinstance(b, dict):
                changed += [f"{key}.{k}: saved {a.get(k)!r}, now {b.get(k)!r}"
                            for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
            elif a != b:
                changed.append(f"{key}: {'differs' if key in ('data', 'probe', 'policy', 'reference') else f'saved {a!r}, now {b!r}'}")
        raise ArgumentError(
            f"save_dir={str(self.path)!r} holds a track_dpo run with another configuration ("
            + "; ".join(changed)
            + "). Resuming would mix two runs: pass the same arguments, data and models to resume it, or "
            "use a new save_dir (or delete this one) to start afresh."
        )

    def load(self, device) -> tuple[dict | None, list[pd.DataFrame]]:
        """The last checkpoint (or None) and the trajectory rows up to its step."""
        if not self.meta.exists() or not self.ckpt.exists():
            return None, []
        state = torch.load(self.ckpt, map_location=device, weights_only=True)
        frames = []
        for step in range(state["step"] + 1):
            part = _step_file(self.rows, step)
            if not part.exists():
                raise DataError(
                    f"save_dir={str(self.path)!r}: the checkpoint is at step {state['step']} but the rows of step "
                    f"{step} ({part.name}) are missing. Delete the folder to start afresh."
                )
            frames.append(pd.read_parquet(part))
        return state, frames

    def start(self) -> None:
        self.rows.mkdir(parents=True, exist_ok=True)
        if not self.meta.exists():
            _atomic_write(self.meta, lambda p: Path(p).write_text(json.dumps(self.fingerprint, indent=1, sort_keys=True)))

    def save_rows(self, step: int, frame: pd.DataFrame) -> None:
        _atomic_write(_step_file(self.rows, step), lambda p: frame.to_parquet(p, index=False))

    def save_checkpoint(self, step: int, model, optimizer, sampler: dict) -> None:
        state = {
            "step": step,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "sampler": sampler,
            "format": _FORMAT_VERSION,
        }
        _atomic_write(self.ckpt, lambda p: torch.save(state, p))

    def save_mass(self, frame: pd.DataFrame) -> None:
        _atomic_write(self.path / "mass.parquet", lambda p: frame.to_parquet(p, index=False))


def _batch_indices(seed: int, step: int, n: int, batch_size: int | None) -> np.ndarray:
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


# --------------------------------------------------------------------------------------------------
# track_dpo: result
# --------------------------------------------------------------------------------------------------
@dataclass(repr=False)
class DisplacementRun:
    """The result of :func:`track_dpo`.

    Attributes:
        trajectories: tidy long frame, one row per (step, pair): ``step`` (0 = before any update),
            ``pair``, ``logps_chosen``, ``logps_rejected``, ``reward_chosen``, ``reward_rejected``
            (``beta * (log pi - log pi_ref)``, as :func:`rmlab.implicit_rewards`), ``margin`` and
            ``loss`` (the pair's DPO loss ``-log sigmoid(margin)``).
        mass: where the probability mass went, per pair: at the first position where the chosen and
            rejected responses differ (a context both share), the ``top_k`` tokens whose next-token
            probability rose most from step 0 to the last step, plus the chosen and rejected tokens
            there. Columns ``pair``, ``position`` (index in the chosen response), ``token_id``,
            ``token``, ``role`` ("chosen", "rejected" or "other"), ``gain_rank`` (1 = largest rise in
            the whole vocabulary), ``prob_before``, ``prob_after``, ``gain`` (``prob_after -
            prob_before``), ``logp_before``, ``logp_after`` and ``alignment``
            (``<W_z, W_{y_w} - W_{y_l}>`` with the unembedding rows of the initial policy; Razin et al.
            2024, Section 4). Pairs whose responses never differ have no rows.
        pairs: the tracked pairs: ``pair``, ``tokens_chosen``, ``tokens_rejected``, ``truncated``, then
            the input columns.
        model: the fine-tuned copy (eval mode); the policy passed in is never changed.
        config: the run's settings (beta, lr, optimizer, batch_size, seed, steps, ...).
    """

    trajectories: pd.DataFrame
    mass: pd.DataFrame
    pairs: pd.DataFrame
    model: torch.nn.Module
    config: dict = field(default_factory=dict)

    @property
    def summary(self) -> pd.DataFrame:
        """One row per pair: start and end values and their changes; ``displaced`` = chosen log-prob fell.

        Columns ``pair``, ``logps_chosen_start``, ``logps_chosen_end``, ``delta_chosen``,
        ``logps_rejected_start``, ``logps_rejected_end``, ``delta_rejected``, ``margin_start``,
        ``margin_end``, ``displaced``, then those of :attr:`pairs`.
        """
        t = self.trajectories
        first = t[t["step"] == t["step"].min()].set_index("pair")
        last = t[t["step"] == t["step"].max()].set_index("pair")
        out = pd.DataFrame({"pair": first.index.to_numpy()})
        for side in _SIDES:
            out[f"logps_{side}_start"] = first[f"logps_{side}"].to_numpy()
            out[f"logps_{side}_end"] = last[f"logps_{side}"].to_numpy()
            out[f"delta_{side}"] = out[f"logps_{side}_end"] - out[f"logps_{side}_start"]
        out["margin_start"] = first["margin"].to_numpy()
        out["margin_end"] = last["margin"].to_numpy()
        out["displaced"] = out["delta_chosen"] < 0
        return out.merge(self.pairs, on="pair", how="left")

    def __repr__(self) -> str:
        c = self.config
        s = self.summary
        n = len(s)
        valid = s["delta_chosen"].notna()
        fell = int((s["delta_chosen"][valid] < 0).sum())
        rej = int((s["delta_rejected"][valid] < 0).sum())
        rose = int((s["margin_end"] > s["margin_start"]).sum())
        batch = "full batch" if c.get("batch_size") is None else f"batch_size={c.get('batch_size')}"
        median = float(s["delta_chosen"][valid].median()) if valid.any() else float("nan")
        steps = int(self.trajectories["step"].max()) if len(self.trajectories) else 0
        return (
            f"DisplacementRun: {n} pairs, steps 0..{steps} ({c.get('optimizer')}, lr={c.get('lr')}, "
            f"beta={c.get('beta')}, {batch})\n"
            f"  chosen log-prob fell on {fell}/{int(valid.sum())} pairs ({fell / max(int(valid.sum()), 1):.0%}), "
            f"median change {median:+.3f}; rejected fell on {rej}; margin rose on {rose}\n"
            f"  .trajectories  {len(self.trajectories)} rows (step, pair, logps_*, reward_*, margin, loss)\n"
            f"  .mass          {len(self.mass)} rows (tokens whose probability rose most where the responses differ)\n"
            f"  .summary       one row per pair; .pairs the tracked pairs; .model the fine-tuned copy"
        )


# --------------------------------------------------------------------------------------------------
# track_dpo
# --------------------------------------------------------------------------------------------------
def _sums(values: list[np.ndarray]) -> np.ndarray:
    return np.array([float(v.sum(dtype=np.float64)) if len(v) else float("nan") for v in values])


def _trajectory_rows(step: int, logps: list[np.ndarray], ref: np.ndarray, beta: float) -> pd.DataFrame:
    lp = _sums(logps)
    chosen, rejected = lp[0::2], lp[1::2]
    reward_c = beta * (chosen - ref[0::2])
    reward_r = beta * (rejected - ref[1::2])
    margin = reward_c - reward_r
    with np.errstate(invalid="ignore"):
        loss = np.logaddexp(0.0, -margin)
    return pd.DataFrame(
        {
            "step": np.full(len(chosen), step, dtype=np.int64),
            "pair": np.arange(len(chosen)),
            "logps_chosen": chosen,
            "logps_rejected": rejected,
            "reward_chosen": reward_c,
            "reward_rejected": reward_r,
            "margin": margin,
            "loss": loss,
        }
    )


def _divergence(pair) -> int | None:
    """Index in the chosen ids of the first token where chosen and rejected differ (a scored token of both)."""
    c, r = pair.chosen, pair.rejected
    d = 0
    for a, b in zip(c.ids, r.ids):
        if a != b:
            break
        d += 1
    if d >= len(c.ids) or d >= len(r.ids) or d < max(c.start, r.start, 1):
        return None
    return d


def _mass(inputs: PairInputs, before_model, after_model, top_k: int, chunk: int = 64) -> pd.DataFrame:
    """Tokens whose next-token probability rose most where the two responses first differ."""
    where = [(i, _divergence(p)) for i, p in enumerate(inputs.encoded)]
    where = [(i, d) for i, d in where if d is not None]
    columns = ["pair", "position", "token_id", "token", "role", "gain_rank", "prob_before", "prob_after",
               "gain", "logp_before", "logp_after", "alignment"]
    if not where:
        return pd.DataFrame({c: [] for c in columns})
    weight = before_model.get_output_embeddings().weight.detach().float().cpu()
    parts = []
    for s in range(0, len(where), chunk):
        block = where[s : s + chunk]
        contexts = [tuple(inputs.encoded[i].chosen.ids[:d]) for i, d in block]
        positions = [d - 1 for _, d in block]
        options = dict(pad_id=inputs.pad_id, batch_tokens=inputs.batch_tokens)
        before = next_token_logprobs(before_model, contexts, positions, **options)
        after = next_token_logprobs(after_model, contexts, positions, **options)
        gain = after.exp() - before.exp()
        vocab = torch.arange(gain.shape[1])
        top = torch.topk(gain, min(top_k, gain.shape[1]), dim=1).indices
        for j, (i, d) in enumerate(block):
            pair = inputs.encoded[i]
            yw, yl = pair.chosen.ids[d], pair.rejected.ids[d]
            ids = top[j].tolist()
            ids += [t for t in (yw, yl) if t not in ids]
            idx = torch.as_tensor(ids)
            g = gain[j]
            picked = g[idx]
            # rank in the whole vocabulary by gain (ties: lower id first), 1 = rose most
            ranks = 1 + (g[None, :] > picked[:, None]).sum(1) + (
                (g[None, :] == picked[:, None]) & (vocab[None, :] < idx[:, None])
            ).sum(1)
            order = torch.argsort(ranks)
            idx, ranks = idx[order], ranks[order]
            ids = idx.tolist()
            direction = weight[yw] - weight[yl]
            parts.append(
                pd.DataFrame(
                    {
                        "pair": i,
                        "position": d - pair.chosen.start,
                        "token_id": ids,
                        "role": ["chosen" if t == yw else "rejected" if t == yl else "other" for t in ids],
                        "gain_rank": ranks.numpy(),
                        "prob_before": before[j, idx].exp().double().numpy(),
                        "prob_after": after[j, idx].exp().double().numpy(),
                        "gain": gain[j, idx].double().numpy(),
                        "logp_before": before[j, idx].double().numpy(),
                        "logp_after": after[j, idx].double().numpy(),
                        "alignment": (weight[idx] @ direction).double().numpy(),
                    }
                )
            )
    frame = pd.concat(parts, ignore_index=True)
    frame.insert(3, "token", decode_tokens(inputs.tokenizer, frame["token_id"].to_numpy()))
    frame["role"] = pd.Categorical(frame["role"], categories=["chosen", "rejected", "other"])
    return frame[columns]


def _pairs_frame(inputs: PairInputs) -> pd.DataFrame:
    frame = pd.DataFrame(
        {
            "pair": np.arange(len(inputs.encoded)),
            "tokens_chosen": [p.chosen.n_response for p in inputs.encoded],
            "tokens_rejected": [p.rejected.n_response for p in inputs.encoded],
            "truncated": [p.truncated for p in inputs.encoded],
        }
    )
    return pd.concat([frame, inputs.pairs.reset_index(drop=True)], axis=1)


def _fresh_copy(model):
    """A deep copy that trains independently of ``model`` (instance-level forward patches dropped)."""
    twin = copy.deepcopy(model)
    # e.g. TRL's add_fused_lm_head sets an instance `forward` closing over the *original* model's forward
    twin.__dict__.pop("forward", None)
    return twin.eval()


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
    tokenizer=None,
    max_length: int | None = None,
    truncation_mode: str = "keep_start",
    add_eos: bool = True,
    batch_tokens: int | None = None,
    device="auto",
    dtype="auto",
    progress: bool = True,
    **kwargs,
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
        policy: the model DPO starts from (``PreTrainedModel`` or hub name / local path); never changed.
        reference: the reference model (usually the same SFT model); required.
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
        tokenizer, max_length, truncation_mode, add_eos, batch_tokens, device, dtype, progress: as in
            :func:`rmlab.implicit_rewards`.
        **kwargs: ``chat_template_kwargs``, ``trust_remote_code``.

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
    _check_extra(kwargs, "track_dpo")
    if reference is None:
        raise ArgumentError(
            "reference=None: DPO's loss and implicit rewards are log-ratios to a reference model. Pass the "
            "reference (usually the SFT model the policy starts from; passing the same model as policy and "
            "reference is fine, the policy is copied before training)."
        )
    steps = _check_int("steps", steps, 1, " (the number of DPO updates, e.g. 20).")
    lr = _check_lr(lr)
    beta = check_beta(beta)
    optimizer = _check_optimizer(optimizer)
    if batch_size is not None:
        batch_size = _check_int("batch_size", batch_size, 1, " (pairs per update), or None for full batches.")
    seed = _check_int("seed", seed, 0, ".")
    top_k = _check_int("top_k", top_k, 0, " (tokens per pair in .mass).")
    checkpoint_every = _check_int("checkpoint_every", checkpoint_every, 1, ".")
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
    if save_dir is not None and Path(save_dir).exists() and not Path(save_dir).is_dir():
        raise ArgumentError(f"save_dir={str(save_dir)!r} is a file; pass a folder (it is created if missing).")

    options = dict(max_length=max_length, truncation_mode=truncation_mode, add_eos=add_eos,
                   batch_tokens=batch_tokens, **kwargs)
    inputs = prepare_pair_inputs(policy, reference, data, tokenizer=tokenizer, device=device, dtype=dtype, **options)
    n = len(inputs.encoded)
    if batch_size is not None and batch_size > n:
        raise ArgumentError(f"batch_size={batch_size} is larger than the {n} pairs given; pass at most {n}, or None.")
    tracked = inputs
    if probe is not None:
        tracked = prepare_pair_inputs(inputs.policy, inputs.reference, probe, tokenizer=inputs.tokenizer, **options)
    if not any(p.requires_grad for p in inputs.policy.parameters()):
        raise ArgumentError("The policy has no parameter with requires_grad=True: there is nothing to train.")

    config = dict(
        beta=beta, lr=lr, optimizer=optimizer, batch_size=batch_size, seed=seed, max_grad_norm=max_grad_norm,
        max_length=max_length, truncation_mode=truncation_mode, add_eos=add_eos, batch_tokens=batch_tokens,
        chat_template_kwargs=repr(kwargs.get("chat_template_kwargs")),
    )
    store = None
    if save_dir is not None:
        fingerprint = {
            "format": _FORMAT_VERSION,
            "config": config,
            "data": _encoded_digest(inputs),
            "probe": _encoded_digest(tracked) if probe is not None else None,
            "policy": _model_digest(inputs.policy),
            "reference": _model_digest(inputs.reference),
        }
        store = _SaveDir(save_dir, fingerprint)
        store.check()
    device_ = model_device(inputs.policy)
    state, saved_rows = store.load(device_) if store is not None else (None, [])
    if state is not None and state["step"] > steps:
        raise ArgumentError(
            f"save_dir={str(save_dir)!r} already holds {state['step']} steps of this run; ask for steps >= "
            f"{state['step']} (the saved run is then continued or returned), or use another save_dir."
        )

    # ---- the copy, its optimiser, the reference log-probs (once)
    model = _fresh_copy(inputs.policy)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr) if optimizer == "sgd" else torch.optim.Adam(params, lr=lr)
    done = 0
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        done = int(state["step"])
    ref_train = _sums(run_logprobs(inputs, inputs.reference, "reference", progress=progress))
    ref_tracked = ref_train if tracked is inputs else _sums(
        run_logprobs(tracked, tracked.reference, "reference (probe)", progress=progress)
    )
    ref_loss = torch.as_tensor(np.nan_to_num(ref_train, nan=0.0), dtype=torch.float32).view(-1, 2).to(device_)
    autocast_dtype = inputs.autocast_dtype(model)
    budget = batch_budget(inputs.batch_tokens, device_)

    def record(step: int) -> pd.DataFrame:
        logps = token_logprobs(
            model, tracked.sequences, groups=[[2 * i, 2 * i + 1] for i in range(len(tracked.encoded))],
            batch_tokens=tracked.batch_tokens, pad_id=tracked.pad_id, autocast_dtype=autocast_dtype,
            progress=False,
        )
        return _trajectory_rows(step, logps, ref_tracked, beta)

    def update(step: int) -> None:
        idx = _batch_indices(seed, step, n, batch_size)
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
    mass = _mass(tracked, inputs.policy, model, top_k)
    if store is not None:
        store.save_mass(mass)
    trajectories.attrs.update(beta=beta, lr=lr, optimizer=optimizer)
    return DisplacementRun(
        trajectories=trajectories,
        mass=mass,
        pairs=_pairs_frame(tracked),
        model=model,
        config=dict(config, steps=steps, top_k=top_k, probe=probe is not None),
    )
