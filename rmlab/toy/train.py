"""Training loops for the toy world's tiny models: SFT, Bradley-Terry reward models, DPO.

Small, deterministic (seeded) and CPU-friendly; they share the engine's tokenisation and
log-prob code with the analyses, so a DPO policy is trained on exactly the quantities rmlab reports.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from rmlab.engine.batching import pad_right
from rmlab.engine.logprobs import Scored, logprobs_with_grad, token_logprobs
from rmlab.io.tokenize import EncodedPair


def _seeded_training(model, seed: int, **adamw):
    """Seed numpy and torch, put ``model`` in training mode and give it AdamW: how every training
    loop of the toy world starts. Returns ``(numpy generator, optimiser)``."""
    gen = np.random.default_rng(seed)
    torch.manual_seed(seed)
    model.train()
    return gen, torch.optim.AdamW(model.parameters(), **adamw)


def _cosine_lr(optimizer, step: int, total: int, base: float, warmup: int) -> None:
    if step < warmup:
        lr = base * (step + 1) / warmup
    else:
        lr = base * 0.5 * (1 + np.cos(np.pi * (step - warmup) / max(1, total - warmup)))
    for group in optimizer.param_groups:
        group["lr"] = lr


def _step(optimizer, loss, model) -> None:
    """One optimiser step with gradients clipped to norm 1."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()


def train_lm(
    model,
    sequences: Sequence[Scored],
    *,
    steps: int,
    batch_size: int = 64,
    lr: float = 3e-3,
    pad_id: int,
    seed: int = 0,
    progress: bool = True,
) -> list[float]:
    """Supervised fine-tuning: next-token cross-entropy on ``ids[start:]`` of each sequence.

    Returns the loss of every step.
    """
    gen, opt = _seeded_training(model, seed, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    losses = []
    for step in tqdm(range(steps), desc="SFT", disable=not progress, leave=False):
        _cosine_lr(opt, step, steps, lr, warmup=max(1, steps // 20))
        batch = [sequences[i] for i in gen.integers(len(sequences), size=batch_size)]
        logps = torch.cat(logprobs_with_grad(model, batch, pad_id=pad_id))
        loss = -logps.mean()
        _step(opt, loss, model)
        losses.append(loss.item())
    model.eval()
    return losses


def reward_scores_tensor(model, id_lists: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
    """Scalar scores of a sequence-classification reward model for a batch of id lists."""
    ids, mask = pad_right(id_lists, pad_id)
    device = next(model.parameters()).device
    return model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, 0]


def train_reward_model(
    model,
    chosen: Sequence[Sequence[int]],
    rejected: Sequence[Sequence[int]],
    *,
    epochs: float = 2.0,
    batch_size: int = 32,
    lr: float = 1e-3,
    pad_id: int,
    seed: int = 0,
    progress: bool = True,
) -> list[float]:
    """Bradley-Terry training (Ouyang et al. 2022): minimise ``-log sigmoid(r(chosen) - r(rejected))``.

    Returns the loss of every step.
    """
    n = len(chosen)
    steps = max(1, int(epochs * n / batch_size))
    gen, opt = _seeded_training(model, seed, lr=lr, weight_decay=0.01)
    losses = []
    order = np.concatenate([gen.permutation(n) for _ in range(int(np.ceil(epochs)) + 1)])
    for step in tqdm(range(steps), desc="reward model", disable=not progress, leave=False):
        _cosine_lr(opt, step, steps, lr, warmup=max(1, steps // 20))
        idx = order[step * batch_size : (step + 1) * batch_size]
        scores = reward_scores_tensor(model, [chosen[i] for i in idx] + [rejected[i] for i in idx], pad_id)
        margin = scores[: len(idx)] - scores[len(idx) :]
        loss = -F.logsigmoid(margin).mean()
        _step(opt, loss, model)
        losses.append(loss.item())
    model.eval()
    return losses


def train_dpo(
    policy,
    reference,
    pairs: Sequence[EncodedPair],
    *,
    beta: float,
    steps: int,
    batch_size: int = 32,
    lr: float = 1e-3,
    pad_id: int,
    seed: int = 0,
    checkpoint_every: int | None = None,
    on_checkpoint: Callable[[int, object], None] | None = None,
    progress: bool = True,
) -> list[float]:
    """Direct Preference Optimization (Rafailov et al. 2023) with the sigmoid loss.

    Reference log-probs are computed once (as TRL's ``precompute_ref_log_probs``); each step runs the
    policy on a batch of chosen and rejected sequences and minimises
    ``-log sigmoid(beta * [(lp_w - ref_w) - (lp_l - ref_l)])``. ``on_checkpoint(step, policy)`` is
    called every ``checkpoint_every`` steps and after the last step.

    Returns the loss of every step.
    """
    sequences = [s for p in pairs for s in (p.chosen, p.rejected)]
    ref = token_logprobs(reference, sequences, pad_id=pad_id, progress=False)
    ref_sums = torch.tensor([float(r.sum()) for r in ref]).view(-1, 2)
    gen, opt = _seeded_training(policy, seed, lr=lr, weight_decay=0.0)
    losses = []
    for step in tqdm(range(steps), desc=f"DPO beta={beta}", disable=not progress, leave=False):
        _cosine_lr(opt, step, steps, lr, warmup=max(1, steps // 10))
        idx = gen.integers(len(pairs), size=batch_size)
        batch = [s for i in idx for s in (pairs[i].chosen, pairs[i].rejected)]
        lp = torch.stack([t.sum() for t in logprobs_with_grad(policy, batch, pad_id=pad_id)]).view(-1, 2)
        logratio = lp - ref_sums[torch.as_tensor(idx)]
        loss = -F.logsigmoid(beta * (logratio[:, 0] - logratio[:, 1])).mean()
        _step(opt, loss, policy)
        losses.append(loss.item())
        done = step + 1
        if on_checkpoint is not None and (
            (checkpoint_every and done % checkpoint_every == 0) or done == steps
        ):
            policy.eval()
            on_checkpoint(done, policy)
            policy.train()
    policy.eval()
    return losses
