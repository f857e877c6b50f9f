"""KL estimates and checkpoint curves: unbiased where KL is known exactly, and right on the toy world."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import rmlab
import rmlab.diagnostics.checkpoints as checkpoints_module
from rmlab.diagnostics.checkpoint_labels import checkpoint_items
from rmlab.diagnostics.checkpoints import checkpoint_curve, curve_from_samples, kl_estimate
from rmlab.engine.sampling import SamplingInterrupted
from rmlab.toy import tiny_causal_lm

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models run fastest on one thread


def exact_kl(p, q) -> float:
    return float(np.sum(p * (np.log(p) - np.log(q))))


def test_kl_estimator_is_unbiased_on_categoricals():
    rng = np.random.default_rng(0)
    p = np.array([0.5, 0.2, 0.15, 0.1, 0.05])
    q = np.array([0.2, 0.2, 0.2, 0.2, 0.2])
    kl = exact_kl(p, q)
    reps, n = 2000, 20
    draws = rng.choice(len(p), size=(reps, n), p=p)
    estimates = [kl_estimate(np.log(p[d]), np.log(q[d])) for d in draws]
    values = np.array([e["kl"] for e in estimates])
    assert abs(values.mean() - kl) < 4 * values.std() / np.sqrt(reps)
    # the reported standard error matches the spread of the estimates
    assert np.mean([e["kl_se"] for e in estimates]) == pytest.approx(values.std(), rel=0.1)
    assert estimates[0]["n_samples"] == n and estimates[0]["prompts"] == 1
    # several prompts: per-prompt means averaged; unbiased for the mean KL over prompts
    ps = [p, q, np.array([0.05, 0.05, 0.1, 0.3, 0.5])]
    qs = [q, p, np.array([0.3, 0.3, 0.2, 0.1, 0.1])]
    groups = np.repeat(np.arange(3), 10)
    multi = []
    for _ in range(reps):
        d = np.concatenate([rng.choice(5, size=10, p=pi) for pi in ps])
        pi_lp = np.concatenate([np.log(pi[d[g * 10:(g + 1) * 10]]) for g, pi in enumerate(ps)])
        q_lp = np.concatenate([np.log(qi[d[g * 10:(g + 1) * 10]]) for g, qi in enumerate(qs)])
        multi.append(kl_estimate(pi_lp, q_lp, groups=groups)["kl"])
    truth = np.mean([exact_kl(a, b) for a, b in zip(ps, qs)])
    assert abs(np.mean(multi) - truth) < 4 * np.std(multi) / np.sqrt(reps)
    # unbiased, yet a single estimate can be negative when the policy is close to the reference
    near = np.array([0.22, 0.2, 0.2, 0.19, 0.19])
    small = [kl_estimate(np.log(near[d]), np.log(q[d]))["kl"] for d in rng.choice(5, size=(200, 5), p=near)]
    assert min(small) < 0 < exact_kl(near, q)


def test_kl_estimate_errors():
    with pytest.raises(rmlab.DataError, match="at least 2 samples"):
        kl_estimate([-1.0], [-2.0])
    with pytest.raises(rmlab.DataError, match="one per sample"):
        kl_estimate([-1.0, -2.0], [-2.0])
    with pytest.raises(rmlab.DataError, match="finite"):
        kl_estimate([-1.0, float("nan")], [-2.0, -1.0])


def test_kl_through_sampling_matches_the_exact_next_token_kl(tok):
    """One-token completions: KL(pi || ref) over the vocabulary is exact from two forwards."""
    def model(seed):
        m = tiny_causal_lm("gpt2", seed=seed, tie_word_embeddings=False)
        with torch.no_grad():
            m.lm_head.weight.mul_(10.0)
        return m

    policy, reference = model(1), model(2)
    prompts = ["The movie was", "A charming film", "Review:"]
    exact = []
    for prompt in prompts:
        ids = torch.tensor([tok(prompt)["input_ids"]])
        with torch.no_grad():
            lp = policy(input_ids=ids).logits[0, -1].double().log_softmax(-1)
            lq = reference(input_ids=ids).logits[0, -1].double().log_softmax(-1)
        exact.append(float((lp.exp() * (lp - lq)).sum()))
    curve, samples = checkpoint_curve(
        {"policy": policy}, reference, prompts, n_samples=2000, max_new_tokens=1, tokenizer=tok,
        progress=False, return_samples=True,
    )
    assert (samples["n_tokens"] == 1).all()
    for i, truth in enumerate(exact):
        rows = samples[samples["prompt_index"] == i]
        est = kl_estimate(rows["logp"], rows["ref_logp"])
        assert abs(est["kl"] - truth) < 4 * est["kl_se"], (i, est["kl"], truth)
        assert est["kl_se"] < 0.1 * truth
    assert curve["kl"].iloc[0] == pytest.approx(np.mean(exact), abs=4 * curve["kl_se"].iloc[0])


def test_checkpoint_curve_on_the_toy_world(world):
    tok = world.tokenizer
    cks = {"sft": world.sft, (0.1, 50): world.checkpoints[0.1][50], (0.1, 250): world.checkpoints[0.1][250]}
    prompts = world.prompts[:4]
    curve, samples = checkpoint_curve(
        cks, world.sft, prompts, proxy=world.reward_models[0], gold=world.gold, n_samples=6,
        max_new_tokens=64, seed=1, progress=False, return_samples=True,
    )
    assert curve["checkpoint"].tolist() == ["sft", "beta=0.1/step=50", "beta=0.1/step=250"]
    assert np.isnan(curve["beta"].iloc[0]) and curve["beta"].iloc[1:].tolist() == [0.1, 0.1]
    assert curve["step"].iloc[1:].tolist() == [50, 250]
    for col in ["kl", "kl_se", "sqrt_kl", "proxy", "proxy_se", "gold", "gold_se", "tokens", "finished"]:
        assert col in curve.columns
    assert (curve["n_samples"] == 6).all() and (curve["prompts"] == 4).all()
    # the SFT policy against itself: identical log-probs, KL exactly 0
    sft = samples[samples["checkpoint"] == "sft"]
    assert (sft["logp"] == sft["ref_logp"]).all()
    assert curve["kl"].iloc[0] == 0.0 and curve["kl_se"].iloc[0] == 0.0
    # DPO moved the policy: clearly positive KL at both checkpoints
    dpo = curve.iloc[1:]
    assert (dpo["kl"] > 3 * dpo["kl_se"]).all() and (dpo["kl"] > 1.0).all()
    np.testing.assert_allclose(curve["sqrt_kl"], np.sqrt(curve["kl"].clip(lower=0)))
    # one row per (checkpoint, prompt, sample)
    assert len(samples) == 3 * 4 * 6
    # gold and proxy are the scores of the samples, aligned row by row
    np.testing.assert_array_equal(samples["gold"], world.gold(list(samples["completion"])))
    nonempty = samples[samples["completion"].str.strip() != ""]
    direct = rmlab.reward_scores(
        world.reward_models[0], pd.DataFrame({"prompt": nonempty["prompt"], "completion": nonempty["completion"]}),
        tokenizer=tok, progress=False,
    )
    np.testing.assert_allclose(nonempty["proxy"], direct["score"], atol=1e-5)
    # the curve's means are per prompt, then over prompts, of the sample scores
    for col in ["gold", "proxy", "log_ratio"]:
        by = samples.groupby("checkpoint", sort=False).apply(lambda g: g.groupby("prompt_index")[col].mean().mean())
        target = "kl" if col == "log_ratio" else col
        np.testing.assert_allclose(curve[target], by.to_numpy(), atol=1e-9)
    # re-scoring saved samples without sampling again
    again = curve_from_samples(samples, proxy="gold", gold=lambda prompts, completions: [len(c) for c in completions], progress=False)
    np.testing.assert_allclose(again["proxy"], curve["gold"])
    np.testing.assert_allclose(again["kl"], curve["kl"])
    lengths = samples.assign(chars=samples["completion"].str.len()).groupby("checkpoint", sort=False)
    np.testing.assert_allclose(again["gold"], lengths.apply(lambda g: g.groupby("prompt_index")["chars"].mean().mean()).to_numpy())


def test_checkpoint_labels():
    paths = {0.1: {50: "/x/dpo_beta0.1/step_50"}}
    items = checkpoint_items({"a": tiny_causal_lm(), (0.5, 10): tiny_causal_lm(), 0.05: tiny_causal_lm()}, ("beta", "step"))
    assert [(name, fields) for name, fields, _ in items] == [
        ("a", {}), ("beta=0.5/step=10", {"beta": 0.5, "step": 10}), ("beta=0.05", {"beta": 0.05}),
    ]
    with pytest.raises(rmlab.DataError, match="does not exist"):
        checkpoint_items(paths, ("beta", "step"))
    m = tiny_causal_lm()
    m.name_or_path = "runs/dpo_beta0.1/step_50"
    items = checkpoint_items([m], ("beta", "step"))
    assert items[0][:2] == ("runs/dpo_beta0.1/step_50", {"beta": 0.1, "step": 50})


def test_toy_world_checkpoint_dict_is_accepted(world):
    items = checkpoint_items(world.checkpoints, ("beta", "step"))
    assert len(items) == sum(len(s) for s in world.checkpoints.values())
    assert items[0][1] == {"beta": min(world.checkpoints), "step": min(world.checkpoints[min(world.checkpoints)])}


def test_errors_before_sampling(tok, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("sampling started before the input was checked")

    monkeypatch.setattr(checkpoints_module, "sample", never)
    ref = tiny_causal_lm("gpt2", seed=0)
    ok = dict(tokenizer=tok, n_samples=2, max_new_tokens=3, progress=False)
    cases = [
        (dict(checkpoints={}), rmlab.ArgumentError, "empty"),
        (dict(checkpoints=ref), rmlab.ArgumentError, "dict"),
        (dict(checkpoints={"a": 3}), rmlab.ArgumentError, "causal LM"),
        (dict(checkpoints={"a": "./no/such/folder"}), rmlab.DataError, "does not exist"),
        (dict(checkpoints={(1, 2, 3): ref}), rmlab.ArgumentError, "label_names"),
        (dict(checkpoints={"a": rmlab.toy.tiny_reward_model()}), rmlab.ModelError, "not a causal"),
        (dict(n_samples=1, prompts=["only one"]), rmlab.ArgumentError, "at least 2"),
        (dict(n_samples=0), rmlab.ArgumentError, "n=0"),
        (dict(prompts=[]), rmlab.DataError, "empty"),
        (dict(proxy=[ref, ref]), rmlab.ArgumentError, "callable that combines"),
        (dict(proxy=ref), rmlab.ModelError, "not a reward model"),
        (dict(gold="./no_such_rm"), rmlab.DataError, "neither a column"),
        (dict(gold=3.0), rmlab.ArgumentError, "gold: cannot score with 3.0"),
    ]
    for change, error, message in cases:
        args = {"checkpoints": {"a": ref}, "reference": ref, "prompts": ["The movie was", "A"], **ok, **change}
        with pytest.raises(error, match=message):
            checkpoint_curve(**args)


def test_interrupt_keeps_finished_checkpoints(tok, monkeypatch):
    real = checkpoints_module.sample
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoints_module, "sample", flaky)
    ref = tiny_causal_lm("gpt2", seed=0)
    with pytest.raises(SamplingInterrupted, match="after 1 of 2 checkpoints") as info:
        checkpoint_curve({"a": ref, "b": tiny_causal_lm("gpt2", seed=1)}, ref, ["The movie was"], n_samples=3,
                         max_new_tokens=2, tokenizer=tok, progress=False)
    assert len(info.value.partial) == 3 and set(info.value.partial["checkpoint"]) == {"a"}


def test_curve_scorers_are_best_of_n_scorers(tok):
    """One resolver serves checkpoint curves and best-of-n: ensembles, arrays and TRL-style callables
    score a samples frame; a reward model's scores equal best_of_n's on the same rows, empty
    completions included."""
    rng = np.random.default_rng(0)
    n = 12
    samples = pd.DataFrame({
        "checkpoint": ["a"] * 6 + ["b"] * 6, "prompt_index": [0, 0, 0, 1, 1, 1] * 2,
        "prompt": (["The movie was"] * 3 + ["A"] * 3) * 2,
        "completion": ["", " great", " dull fun", " bad", " good good", " fine"] * 2,
        "n_tokens": rng.integers(1, 5, n), "finished": [True] * n, "log_ratio": rng.normal(size=n),
        "r0": rng.normal(size=n), "r1": rng.normal(size=n),
    })
    curve = curve_from_samples(
        samples, proxy=rmlab.ensemble(["r0", "r1"], "worst"),
        gold=lambda prompts, completions, **kw: [len(c) for c in completions], progress=False,
    )
    worst = np.minimum(samples["r0"], samples["r1"])
    np.testing.assert_allclose(curve["proxy"], worst.groupby([samples["checkpoint"], samples["prompt_index"]]).mean()
                               .groupby(level=0).mean().to_numpy())
    arrays = curve_from_samples(samples, proxy=worst.to_numpy(), progress=False)
    np.testing.assert_allclose(arrays["proxy"], curve["proxy"])

    rm = rmlab.toy.tiny_reward_model("gpt2", seed=3)
    _, scored = curve_from_samples(samples, proxy=rm, tokenizer=tok, progress=False, return_samples=True)
    bon = rmlab.best_of_n(samples.assign(n=1.0), proxy=rm, gold="n", n_values=[1], tokenizer=tok, progress=False)
    per_prompt = scored.groupby("prompt")["proxy"].mean().sort_index().to_numpy()
    np.testing.assert_allclose(bon["proxy_by_prompt"].iloc[0], per_prompt, rtol=1e-6)
    # the options object is taken as it is, flat keywords on top
    again = curve_from_samples(samples, proxy=rm, options=rmlab.Options(tokenizer=tok, progress=False))
    np.testing.assert_allclose(again["proxy"], curve_from_samples(samples, proxy=rm, tokenizer=tok, progress=False)["proxy"])
