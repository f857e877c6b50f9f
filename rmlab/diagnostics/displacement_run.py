"""The result of :func:`rmlab.track_dpo`: per-pair trajectories of a short DPO run and their summary.

Razin et al. 2024 ("Unintentional Unalignment: Likelihood Displacement in Direct Preference
Optimization", arXiv 2410.08847): :class:`DisplacementRun` holds, per step and pair, the log-probs,
implicit rewards, margin and loss (:func:`trajectory_rows`), and summarises which pairs were
displaced (their chosen log-prob fell).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from rmlab.diagnostics.pair_frames import SIDES, response_sums


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
        for side in SIDES:
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



def trajectory_rows(step: int, logps: list[np.ndarray], ref: np.ndarray, beta: float) -> pd.DataFrame:
    """One row per pair at step ``step``: summed log-probs of the per-token ``logps`` (rows ``2 i`` /
    ``2 i + 1``: pair ``i``'s chosen / rejected), DPO's implicit rewards against the summed reference
    log-probs ``ref`` (Rafailov et al. 2023), their margin and the pair's loss ``-log sigmoid(margin)``."""
    lp = response_sums(logps)
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
