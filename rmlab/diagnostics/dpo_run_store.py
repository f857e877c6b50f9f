"""The save folder of :func:`rmlab.track_dpo`: a tracked DPO run that resumes where it stopped.

A run of the likelihood-displacement tracking of Razin et al. 2024 ("Unintentional Unalignment",
arXiv 2410.08847) writes each step's rows, and every few steps a checkpoint, into ``save_dir``
(:class:`RunFolder`). The folder's fingerprint (:func:`run_fingerprint`) records what decides the run
(settings, token ids, both models' weights, digested as :mod:`rmlab.cache` does); a call with another
configuration is refused rather than mixed into it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import torch

from rmlab.cache import atomic_write, sequences_digest, weights_digest
from rmlab.engine.pairs import PairInputs
from rmlab.errors import ArgumentError, DataError

#: Version of the folder's layout and fingerprint (2: digests of :mod:`rmlab.cache`).
FORMAT_VERSION = 2


def check_save_dir(save_dir) -> None:
    """Raise :class:`ArgumentError` if ``save_dir`` is an existing file (a missing folder is created)."""
    if save_dir is not None and Path(save_dir).exists() and not Path(save_dir).is_dir():
        raise ArgumentError(f"save_dir={str(save_dir)!r} is a file; pass a folder (it is created if missing).")


def step_file(folder: Path, step: int) -> Path:
    """The file of step ``step``'s trajectory rows in ``folder``."""
    return folder / f"step-{step:06d}.parquet"


def run_fingerprint(config: dict, inputs: PairInputs, probe: PairInputs | None) -> dict:
    """What decides a tracked run: its settings, the token ids of its pairs (and of the probe pairs),
    and the exact weights of both models (:mod:`rmlab.cache`'s digests)."""

    def encoded(pairs: PairInputs) -> str:
        return sequences_digest([s.ids for s in pairs.sequences], [s.start for s in pairs.sequences])

    return {
        "format": FORMAT_VERSION,
        "config": config,
        "data": encoded(inputs),
        "probe": encoded(probe) if probe is not None else None,
        "policy": weights_digest(inputs.policy),
        "reference": weights_digest(inputs.reference),
    }


class RunFolder:
    """A ``save_dir`` of :func:`rmlab.track_dpo`: fingerprint.json, trajectories/step-NNNNNN.parquet,
    checkpoint.pt and mass.parquet, each written whole or not at all."""

    def __init__(self, path, fingerprint: dict):
        check_save_dir(path)
        self.path = Path(path)
        self.fingerprint = fingerprint
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
            part = step_file(self.rows, step)
            if not part.exists():
                raise DataError(
                    f"save_dir={str(self.path)!r}: the checkpoint is at step {state['step']} but the rows of step "
                    f"{step} ({part.name}) are missing. Delete the folder to start afresh."
                )
            frames.append(pd.read_parquet(part))
        return state, frames

    def start(self) -> None:
        """Create the folder and write the fingerprint (once)."""
        self.rows.mkdir(parents=True, exist_ok=True)
        if not self.meta.exists():
            atomic_write(self.meta, lambda p: Path(p).write_text(json.dumps(self.fingerprint, indent=1, sort_keys=True)))

    def save_rows(self, step: int, frame: pd.DataFrame) -> None:
        """Write step ``step``'s trajectory rows."""
        atomic_write(step_file(self.rows, step), lambda p: frame.to_parquet(p, index=False))

    def save_checkpoint(self, step: int, model, optimizer, sampler: dict) -> None:
        """Write the trained copy's weights, the optimiser state, the step and the sampler's position."""
        state = {
            "step": step,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "sampler": sampler,
            "format": FORMAT_VERSION,
        }
        atomic_write(self.ckpt, lambda p: torch.save(state, p))

    def save_mass(self, frame: pd.DataFrame) -> None:
        """Write the run's :attr:`~rmlab.diagnostics.displacement_run.DisplacementRun.mass` frame."""
        atomic_write(self.path / "mass.parquet", lambda p: frame.to_parquet(p, index=False))
