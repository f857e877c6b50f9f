"""Load the embedded toy world shipped in ``data/toy`` (or any folder ``rmlab build-toy`` wrote)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging as hf_logging

from rmlab.errors import DataFileError
from rmlab.toy import language

#: Where the shipped world lives: ``data/toy`` beside the package (a source checkout), unless the
#: environment variable ``RMLAB_TOY_DIR`` names another folder.
DEFAULT_DIR = Path(__file__).resolve().parents[2] / "data" / "toy"


def default_dir() -> Path:
    return Path(os.environ.get("RMLAB_TOY_DIR", DEFAULT_DIR))


def load_lm(path: Path):
    """A saved toy-world causal LM, in float32 and eval mode (safetensors only)."""
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_safetensors=True).eval()


def _load_rm(path: Path):
    return AutoModelForSequenceClassification.from_pretrained(
        path, dtype=torch.float32, use_safetensors=True
    ).eval()


@dataclass
class ToyWorld:
    """The toy RLHF world: tokenizer, models, preference data and the gold reward.

    Attributes:
        tokenizer: byte-level BPE tokenizer with a chat template.
        sft: the SFT policy (``GPT2LMHeadModel``), the reference of every DPO policy.
        reward_models: proxy reward models (``GPT2ForSequenceClassification``, one score each).
        dpo: ``{beta: final DPO policy}``.
        checkpoints: ``{beta: {step: path}}`` of every saved DPO checkpoint (the last is ``dpo[beta]``).
        pairs: preference pairs with ``prompt``, ``chosen``, ``rejected``, ``split``
            ("train"/"heldout"), ``gold_chosen``, ``gold_rejected``, ``true_prob`` (probability the
            Bradley-Terry labeller prefers ``chosen``) and ``flipped`` (label against gold).
        prompts: every prompt of the world.
        gold: the true reward, a callable on a list of response texts (numpy array out).
        root, sft_path, reward_model_paths, dpo_paths: where the models are, to load like hub models.
        manifest: build settings, checksums and measured quality metrics.
    """

    root: Path
    tokenizer: object
    sft: torch.nn.Module
    reward_models: list
    dpo: dict
    checkpoints: dict
    pairs: pd.DataFrame
    prompts: list[str]
    gold: Callable = field(default=language.gold_reward)
    manifest: dict = field(default_factory=dict)

    @property
    def sft_path(self) -> Path:
        return self.root / "sft"

    @property
    def reward_model_paths(self) -> list[Path]:
        return [self.root / p for p in self.manifest["reward_models"]]

    @property
    def dpo_paths(self) -> dict:
        return {beta: steps[max(steps)] for beta, steps in self.checkpoints.items()}

    @property
    def heldout(self) -> pd.DataFrame:
        """The held-out pairs (not used to train any model)."""
        return self.pairs[self.pairs["split"] == "heldout"].reset_index(drop=True)

    def load_checkpoint(self, beta: float, step: int):
        """One DPO checkpoint as a model."""
        return load_lm(self.checkpoints[beta][step])


def load(path: str | os.PathLike | None = None) -> ToyWorld:
    """Load the toy world (offline, a few seconds).

    Args:
        path: folder written by ``rmlab build-toy``; the shipped ``data/toy`` by default.

    Returns:
        A :class:`ToyWorld`.

    Example:
        >>> import rmlab.toy
        >>> world = rmlab.toy.load()  # doctest: +SKIP
        >>> rmlab.implicit_rewards(world.dpo[0.1], world.sft, world.heldout, tokenizer=world.tokenizer)  # doctest: +SKIP
    """
    root = Path(path) if path is not None else default_dir()
    manifest_path = root / "manifest.json"
    if not manifest_path.exists():
        raise DataFileError(
            f"No toy world at {str(root)!r} (manifest.json missing). Build one with "
            "`rmlab build-toy --out PATH`, or use a source checkout that ships data/toy."
        )
    manifest = json.loads(manifest_path.read_text())
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # seven tiny models: one bar each would only be noise
    try:
        return _load(root, manifest)
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def _load(root: Path, manifest: dict) -> ToyWorld:
    checkpoints = {
        float(beta): {int(step): root / rel for step, rel in steps.items()}
        for beta, steps in manifest["checkpoints"].items()
    }
    return ToyWorld(
        root=root,
        tokenizer=AutoTokenizer.from_pretrained(root / "tokenizer"),
        sft=load_lm(root / "sft"),
        reward_models=[_load_rm(root / p) for p in manifest["reward_models"]],
        dpo={beta: load_lm(steps[max(steps)]) for beta, steps in checkpoints.items()},
        checkpoints=checkpoints,
        pairs=pd.read_parquet(root / "pairs.parquet"),
        prompts=language.prompts(),
        manifest=manifest,
    )
