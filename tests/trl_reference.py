"""TRL's own DPO preprocessing, run without a model and without training: the reference that
tokenisation tests compare rmlab with.

- :func:`trl_tokenised` runs ``DPOTrainer._prepare_dataset`` (prompt extraction, EOS for plain text,
  the chat template, its ``tokenize_fn`` with the completion start where prompt and
  prompt+completion ids diverge, and the ``keep_start`` filter of fully truncated pairs);
- :func:`trl_scored` runs ``DataCollatorForPreference`` (per-sequence truncation, completion mask)
  and returns, per sequence, the ids and the positions whose labels TRL's loss sums (the shifted
  completion mask).

Each test that calls them needs TRL; a missing TRL skips that test alone (tests/conftest.py makes it
an error in CI).
"""

from __future__ import annotations

import types

import pytest

# DPOConfig itself sets a deprecated TrainingArguments field; that is TRL's business, not ours
TRL_FILTER = "ignore:`gradient_checkpointing` is deprecated:FutureWarning"


def trl_tokenised(tok, rows: list[dict], output_dir, **config) -> list[dict]:
    """``prompt_ids`` / ``chosen_ids`` / ``rejected_ids`` (and the rows' other columns) as TRL's
    ``DPOTrainer`` prepares its dataset for this tokenizer. ``_prepare_dataset`` reads only the
    trainer's tokenizer, so no model is built."""
    trl, datasets = pytest.importorskip("trl"), pytest.importorskip("datasets")
    args = trl.DPOConfig(
        output_dir=str(output_dir), report_to="none", use_cpu=True, bf16=False, dataset_num_proc=None, **config
    )
    trainer = types.SimpleNamespace(_tokenizer=tok)
    dataset = trl.DPOTrainer._prepare_dataset(trainer, datasets.Dataset.from_list(rows), tok, args, "train")
    return list(dataset)


def trl_scored(examples: list[dict], tok, *, max_length=None, truncation_mode="keep_start"):
    """Per sequence, chosen ones first then rejected (as TRL batches them): ``(ids, scored)`` where
    ``scored`` are the positions ``t >= 1`` whose token's log-prob TRL sums (completion mask 1)."""
    collator_module = pytest.importorskip("trl.trainer.dpo_trainer")
    collator = collator_module.DataCollatorForPreference(
        pad_token_id=tok.pad_token_id, max_length=max_length, truncation_mode=truncation_mode
    )
    batch = collator(examples)
    out = []
    for k in range(batch["input_ids"].shape[0]):
        length = int(batch["attention_mask"][k].sum())
        ids = batch["input_ids"][k, :length].tolist()
        out.append((ids, [t for t in range(1, length) if batch["completion_mask"][k, t]]))
    return out
