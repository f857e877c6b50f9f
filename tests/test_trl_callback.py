"""DiagnosticsCallback inside real (tiny, CPU) trl.DPOTrainer runs: what it records, and that training is unchanged."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch

import rmlab
from rmlab.diagnostics.displacement import ches
from rmlab.errors import ArgumentError, DataError
from rmlab.integrations import DiagnosticsCallback
from rmlab.toy import tiny_causal_lm, tiny_tokenizer
from tests.conftest import make_pairs

# DPOConfig itself sets a deprecated TrainingArguments field; that is TRL's business, not ours
pytestmark = pytest.mark.filterwarnings(r"ignore:`(is_)?gradient_checkpointing\S*` is deprecated:FutureWarning")

COLUMNS = [
    "step", "epoch", "pair", "logps_chosen", "logps_rejected", "ref_logps_chosen", "ref_logps_rejected",
    "reward_chosen", "reward_rejected", "margin", "ches", "ln_ches", "tokens_chosen", "tokens_rejected", "truncated",
]
BETA = 0.2


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def train_pairs():
    return make_pairs(16, seed=3)


@pytest.fixture(scope="module")
def probe():
    return make_pairs(5, seed=8)


def make_trainer(tok, train_pairs, out, *, precompute=False, callbacks=None, max_steps=5, arch="gpt2"):
    policy, reference = tiny_causal_lm(arch, seed=1), tiny_causal_lm(arch, seed=0)
    # copied before the trainer patches the instance's forward (TRL's fused LM head closes over the original)
    initial = copy.deepcopy(policy)
    trl, datasets = pytest.importorskip("trl"), pytest.importorskip("datasets")  # skips the test using this
    args = trl.DPOConfig(
        output_dir=str(out), report_to="none", use_cpu=True, bf16=False, beta=BETA, per_device_train_batch_size=4,
        max_steps=max_steps, logging_steps=1, learning_rate=1e-2, dataset_num_proc=None, save_strategy="no",
        seed=0, disable_tqdm=True, precompute_ref_log_probs=precompute,
    )
    trainer = trl.DPOTrainer(
        model=policy, ref_model=None if precompute else reference, args=args, processing_class=tok,
        train_dataset=datasets.Dataset.from_list(train_pairs), callbacks=callbacks,
    )
    return trainer, initial, reference


def losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("precompute", [False, True])
def test_callback_records_and_leaves_training_unchanged(tok, train_pairs, probe, tmp_path, precompute):
    plain, _, _ = make_trainer(tok, train_pairs, tmp_path / "plain", precompute=precompute)
    plain.train()
    trainer, initial, reference = make_trainer(tok, train_pairs, tmp_path / "run", precompute=precompute)
    callback = DiagnosticsCallback(probe, every=2).attach(trainer)
    trainer.train()
    # identical training: losses of every step and the final weights
    assert losses(trainer) == losses(plain) and len(losses(plain)) == 5
    for a, b in zip(trainer.model.parameters(), plain.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert trainer.model.training == plain.model.training
    # the parquet beside the run's outputs: start, every 2 steps, and the end
    path = tmp_path / "run" / "rmlab_diagnostics.parquet"
    assert callback.path == path and path.exists()
    frame = pd.read_parquet(path)
    assert list(frame.columns) == COLUMNS
    assert sorted(frame["step"].unique()) == [0, 2, 4, 5]
    assert (frame.groupby("step").size() == len(probe)).all()
    pd.testing.assert_frame_equal(frame, callback.frame, check_dtype=False)
    # step 0 is the initial policy against the run's reference (the initial policy itself when precomputed)
    ref = initial if precompute else reference
    first = frame[frame["step"] == 0].reset_index(drop=True)
    expected = rmlab.implicit_rewards(initial, ref, probe, tokenizer=tok, beta=BETA, progress=False)
    for col in ["logps_chosen", "logps_rejected", "ref_logps_chosen", "reward_chosen", "margin"]:
        np.testing.assert_allclose(first[col], expected[col], rtol=1e-5, atol=1e-5, err_msg=col)
    if precompute:
        assert (first["margin"].abs() < 1e-6).all()
    scores = ches(initial, probe, tokenizer=tok, progress=False)
    np.testing.assert_allclose(first["ln_ches"], scores["ln_ches"], rtol=1e-5, atol=1e-6)
    # later rows are the trained policy's
    last = frame[frame["step"] == 5].reset_index(drop=True)
    now = rmlab.implicit_rewards(trainer.model, ref, probe, tokenizer=tok, beta=BETA, progress=False)
    np.testing.assert_allclose(last["logps_chosen"], now["logps_chosen"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(last["ref_logps_chosen"], first["ref_logps_chosen"])
    assert not np.allclose(last["logps_chosen"], first["logps_chosen"])


def test_explicit_reference_without_attach(tok, train_pairs, probe, tmp_path):
    reference = tiny_causal_lm("llama", seed=0)
    callback = DiagnosticsCallback(probe, every=3, beta=0.5, reference=reference, ches=False,
                                   output_dir=tmp_path / "diag")
    trainer, initial, _ = make_trainer(tok, train_pairs, tmp_path / "run", callbacks=[callback], max_steps=3, arch="llama")
    trainer.train()
    frame = pd.read_parquet(tmp_path / "diag" / "rmlab_diagnostics.parquet")
    assert sorted(frame["step"].unique()) == [0, 3]
    assert frame["ches"].isna().all()
    expected = rmlab.implicit_rewards(initial, reference, probe, tokenizer=tok, beta=0.5, progress=False)
    np.testing.assert_allclose(frame[frame["step"] == 0]["reward_chosen"], expected["reward_chosen"], rtol=1e-5, atol=1e-5)


def test_entanglement_statistics_are_recorded_without_changing_training(tok, train_pairs, probe, tmp_path):
    plain, _, _ = make_trainer(tok, train_pairs, tmp_path / "plain", max_steps=3)
    plain.train()
    trainer, initial, _ = make_trainer(tok, train_pairs, tmp_path / "run", max_steps=3)
    callback = DiagnosticsCallback(probe, every=3, ches=False, entanglement=True).attach(trainer)
    trainer.train()
    assert losses(trainer) == losses(plain)
    for a, b in zip(trainer.model.parameters(), plain.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    frame = callback.frame
    first = frame[frame["step"] == 0].reset_index(drop=True)
    expected = rmlab.gradient_entanglement(initial, probe, tokenizer=tok, progress=False)
    for col in ["grad_sq_chosen", "grad_sq_rejected", "grad_inner", "grad_cosine"]:
        np.testing.assert_allclose(first[col], expected[col], rtol=1e-4, err_msg=col)
    assert list(first["chosen_falls"]) == list(expected["chosen_falls"])
    last = frame[frame["step"] == 3].reset_index(drop=True)
    assert not np.allclose(last["grad_inner"], first["grad_inner"])


def test_missing_reference_is_a_clear_error(tok, train_pairs, probe, tmp_path):
    callback = DiagnosticsCallback(probe, every=2)
    trainer, _, _ = make_trainer(tok, train_pairs, tmp_path, callbacks=[callback], max_steps=1)
    with pytest.raises(ArgumentError, match=r"no reference model: pass reference=.*attach\(trainer\)"):
        trainer.train()


def test_argument_errors(probe):
    with pytest.raises(ArgumentError, match="every=0"):
        DiagnosticsCallback(probe, every=0)
    with pytest.raises(ArgumentError, match="beta=-1"):
        DiagnosticsCallback(probe, beta=-1)
    with pytest.raises(DataError):
        DiagnosticsCallback([{"prompt": "Review:", "chosen": " good"}])
    with pytest.raises(ArgumentError, match="batch_tokens=0 must be a positive integer"):
        DiagnosticsCallback(probe, batch_tokens=0)
    with pytest.raises(ArgumentError, match="must be an rmlab.Options"):
        DiagnosticsCallback(probe, options={"batch_tokens": 64})


def test_options_reach_the_probe_computations(tok, probe):
    given = rmlab.Options(batch_tokens=128, add_eos=False)
    callback = DiagnosticsCallback(probe, tokenizer=tok, batch_tokens=64, options=given)
    assert (callback.options.batch_tokens, callback.options.add_eos, callback.options.tokenizer) == (64, False, tok)
    assert callback.options.progress is False
    assert DiagnosticsCallback(probe, options=given).options.batch_tokens == 128
